"""Tiny runs trained once per test session (no Ray), shared by the evaluate, predict and report tests.

    run = synthetic_run(tmp_path_factory)        # TinyRun: storage root, run folder, checkpoint folder
    run = pets_run(tmp_path_factory)              # skips when ../shared/data is absent

Each is trained by `segjob.engine.loop.run(job, LocalSession())` at toy sizes, the first time a
test asks for it in this process; later callers get the same folders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from segjob.engine import loop
from segjob.engine.session import LocalSession
from segjob.job.schema import JobConfig
from segjob.store import checkpoint
from segjob.store.storage import Storage, open_storage

PETS_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "oxford-iiit-pet"

_trained: dict[str, TinyRun] = {}


@dataclass
class TinyRun:
    job: JobConfig
    storage_root: Path
    run_dir: Path  # <storage>/<name>
    checkpoint_dir: Path  # the newest committed checkpoint
    metrics: dict[str, Any]


def tiny_job(name: str, storage: Path, **sections: Any) -> JobConfig:
    raw = {
        "name": name,
        "seed": 5,
        "data": {"name": "synthetic", "num_classes": 3, "train_samples": 48, "val_samples": 9, "image_size": 32},
        "model": {"name": "unet", "base_channels": 4, "depth": 2},
        "optim": {"name": "adam", "lr": 0.02},
        "train": {"epochs": 3, "batch_size": 8, "checkpoint_every_steps": 0, "log_every_steps": 2},
        "scaling": {"num_workers": 1, "torch_threads": 1},
        "storage": {"uri": str(storage), "keep_best": 1},
        "preemption": {"aws_metadata_url": None, "gcp_metadata_url": None},  # no network polls in tests
    }
    raw.update(sections)
    return JobConfig.model_validate(raw)


def train(key: str, factory: pytest.TempPathFactory, name: str, **sections: Any) -> TinyRun:
    if key not in _trained:
        storage = factory.mktemp(key)
        job = tiny_job(name, storage, **sections)
        metrics = loop.run(job, LocalSession("cpu"))
        store = open_storage(str(storage))
        newest = checkpoint.latest(store, store.path(name))
        _trained[key] = TinyRun(job, storage, storage / name, Path(newest.path), metrics)
    return _trained[key]


def synthetic_run(factory: pytest.TempPathFactory) -> TinyRun:
    """3 classes (background, disc, square), 32 px, U-Net base 4: three epochs, about a second."""
    return train("synthetic", factory, "tiny-synthetic")


def binary_run(factory: pytest.TempPathFactory) -> TinyRun:
    """Two classes with a one-channel sigmoid output (bce+dice)."""
    return train("binary", factory, "tiny-binary",
                 data={"name": "synthetic", "num_classes": 2, "train_samples": 16, "val_samples": 5, "image_size": 32},
                 loss={"name": "bce+dice", "threshold": 0.5})


def pets_run(factory: pytest.TempPathFactory) -> TinyRun:
    """The Oxford-IIIT Pet sample in ../shared/data (60 images), trimaps, 32 px, one epoch."""
    if not (PETS_ROOT / "images").is_dir():
        pytest.skip(f"the Oxford-IIIT Pet sample is not at {PETS_ROOT}")
    return train("pets", factory, "tiny-pets",
                 data={"name": "pets", "root": str(PETS_ROOT), "image_size": 32, "loader_workers": 0},
                 train={"epochs": 1, "batch_size": 8, "checkpoint_every_steps": 0, "log_every_steps": 1})


# --- checks shared by the tests ---------------------------------------------------------


def assert_figure(path: Path, min_width: int = 200, min_height: int = 150) -> None:
    """A PNG that opens, is at least this big, and is not blank (many colours, real contrast)."""
    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG", path
        assert image.width >= min_width and image.height >= min_height, (path, image.size)
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 5, f"{path} is blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 8, f"{path} has almost no content"


class SegjobLog(logging.Handler):
    """The "segjob" logger's messages, whatever setup_logging() did to propagation (caplog sees
    only what reaches the root logger)."""

    def __init__(self, level: int = logging.INFO):
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.messages)

    def __enter__(self) -> SegjobLog:
        logger = logging.getLogger("segjob")
        self._level = logger.level
        logger.addHandler(self)
        logger.setLevel(min(self.level, self._level or self.level))
        return self

    def __exit__(self, *exc) -> None:
        logger = logging.getLogger("segjob")
        logger.removeHandler(self)
        logger.setLevel(self._level)


def upload_checkpoint(local: Path, storage: Storage, remote: str) -> None:
    """Copy a committed checkpoint folder into object storage, meta.json last (as a commit does)."""
    storage.put_folder(local, remote, [*checkpoint.PAYLOAD_FILES, checkpoint.META_FILE])
