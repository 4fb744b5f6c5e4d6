"""Retention never deletes the newest checkpoint that verifies; damaged checkpoints are quarantined,
never ranked, never returned by commit (issue 15). Local folder and moto S3; the resume case in the
engine (one plain process, no Ray).

Each case ends with latest() returning a checkpoint that loads and verifies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_engine import CrashAfter

from segjob.engine import loop
from segjob.engine.session import LocalSession
from segjob.job.schema import JobConfig
from segjob.results.trained import choose_checkpoint, run_history
from segjob.store import checkpoint
from segjob.store.storage import Storage, open_storage

RUN = "run"


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return open_storage(str(tmp_path / "runs"))
    return open_storage(f"s3://{request.getfixturevalue('s3_bucket')}/runs", request.getfixturevalue("s3_endpoint"))


def write(tmp_path: Path, step: int, miou: float | None, seed: int = 0) -> tuple[Path, dict]:
    torch.manual_seed(seed)
    folder = tmp_path / f"local-{step}-{seed}"
    train_state = {"progress": {"epoch": 1, "step": step, "position": 0}, "seed": seed}
    checkpoint.write_local(folder, {"w": torch.randn(8)}, train_state, [{"step": step, "seed": seed}])
    metrics = {"step": step} | ({"val/miou": miou} if miou is not None else {})
    meta = checkpoint.build_meta(folder, job={"name": RUN}, step=step, epoch=1, metrics=metrics, reason="test")
    return folder, meta


def commit(storage: Storage, tmp_path: Path, step: int, miou: float | None, seed: int = 0):
    return checkpoint.commit(storage, storage.path(RUN), *write(tmp_path, step, miou, seed))


def damage(storage: Storage, info: checkpoint.CheckpointInfo) -> None:
    storage.write_bytes(f"{info.path}/{checkpoint.MODEL_FILE}", b"bit rot")


def steps(storage: Storage) -> list[int]:
    return [info.step for info in checkpoint.list_committed(storage, storage.path(RUN))]


def quarantined(storage: Storage) -> dict[str, dict]:
    """Quarantine folder name -> its note."""
    base = f"{storage.path(RUN)}/{checkpoint.QUARANTINE_DIR}"
    return {name: json.loads(storage.read_bytes(f"{base}/{name}/{checkpoint.QUARANTINE_NOTE}"))
            for name in storage.list_dirs(base)}


def assert_latest_loads(storage: Storage, step: int, seed: int = 0) -> None:
    newest = checkpoint.latest(storage, storage.path(RUN))
    assert newest.step == step and checkpoint.verify(storage, newest) is None
    loaded = checkpoint.load(storage, newest, expected_run=RUN)
    assert loaded.train_state["seed"] == seed


def test_retention_never_deletes_the_only_good_checkpoint(storage, tmp_path):
    commit(storage, tmp_path, step=100, miou=0.5)
    damage(storage, commit(storage, tmp_path, step=120, miou=0.9))  # newest, and best by the metric
    removed = checkpoint.apply_retention(storage, storage.path(RUN), keep_best=1, metric="val/miou", mode="max")
    assert removed == []
    assert steps(storage) == [100], "the damaged one is out of the ranking"
    [(name, note)] = quarantined(storage).items()
    assert name.startswith("step-000000120-") and "model.safetensors: 7 bytes" in note["reason"]
    assert_latest_loads(storage, 100)


def test_a_damaged_best_gives_its_place_to_the_next_good_one(storage, tmp_path):
    infos = {step: commit(storage, tmp_path, step, miou) for step, miou in [(1, 0.2), (2, 0.9), (3, 0.7), (4, 0.1)]}
    damage(storage, infos[2])
    verified: set[str] = set()
    removed = checkpoint.apply_retention(storage, storage.path(RUN), 1, "val/miou", "max", verified)
    assert removed == [checkpoint.checkpoint_name(1)]
    assert steps(storage) == [3, 4], "the next best (3) and the newest (4) stay"
    assert len(verified) == 2 and list(quarantined(storage))[0].startswith("step-000000002-")
    assert_latest_loads(storage, 4)


def test_when_nothing_verifies_retention_touches_nothing(storage, tmp_path):
    for step in (1, 2, 3):
        damage(storage, commit(storage, tmp_path, step, miou=step / 10))
    assert checkpoint.apply_retention(storage, storage.path(RUN), 1, "val/miou", "max") == []
    assert steps(storage) == [1, 2, 3] and quarantined(storage) == {}


def test_committing_over_a_damaged_commit_of_the_same_step_replaces_it(storage, tmp_path):
    # the run resumed from step 100 (step 120 was committed, then damaged) and reaches step 120 again
    commit(storage, tmp_path, step=100, miou=0.5)
    old = commit(storage, tmp_path, step=120, miou=0.9, seed=1)
    damage(storage, old)
    new = commit(storage, tmp_path, step=120, miou=0.6, seed=2)
    assert new.path != old.path and new.metrics["val/miou"] == 0.6
    assert steps(storage) == [100, 120]
    assert [name[:15] for name in quarantined(storage)] == ["step-000000120-"]
    assert_latest_loads(storage, 120, seed=2)


def test_a_malformed_meta_json_of_the_step_is_quarantined_and_replaced(storage, tmp_path):
    step_path = f"{checkpoint.checkpoints_path(storage.path(RUN))}/{checkpoint.checkpoint_name(120)}"
    storage.write_bytes(f"{step_path}/{checkpoint.META_FILE}", b"{not json")
    assert steps(storage) == []
    commit(storage, tmp_path, step=120, miou=0.6, seed=2)
    [note] = quarantined(storage).values()
    assert "not valid JSON" in note["reason"]
    assert_latest_loads(storage, 120, seed=2)


def test_checkpoints_written_before_attempts_still_load(storage, tmp_path):
    """Today's layout: the payload beside meta.json, no 'attempt' key."""
    folder, meta = write(tmp_path, step=5, miou=0.4, seed=3)
    step_path = f"{checkpoint.checkpoints_path(storage.path(RUN))}/{checkpoint.checkpoint_name(5)}"
    (folder / checkpoint.META_FILE).write_text(json.dumps(meta))
    storage.put_folder(folder, step_path, [*checkpoint.PAYLOAD_FILES, checkpoint.META_FILE])
    [info] = checkpoint.list_committed(storage, storage.path(RUN))
    assert info.path == info.step_path == step_path and checkpoint.committed_folder(storage, step_path) == step_path
    assert checkpoint.remove_uncommitted(storage, storage.path(RUN), grace_s=0) == []
    assert_latest_loads(storage, 5, seed=3)

    newer = commit(storage, tmp_path, step=6, miou=0.1, seed=4)  # the new layout beside it
    assert checkpoint.committed_folder(storage, newer.step_path) == newer.path
    assert checkpoint.apply_retention(storage, storage.path(RUN), 1, "val/miou", "max") == []
    commit(storage, tmp_path, step=7, miou=0.2, seed=5)
    assert checkpoint.apply_retention(storage, storage.path(RUN), 1, "val/miou", "max") == [newer.name]
    damage(storage, info)
    commit(storage, tmp_path, step=8, miou=0.3, seed=6)
    removed = checkpoint.apply_retention(storage, storage.path(RUN), 1, "val/miou", "max")
    assert removed == [checkpoint.checkpoint_name(7)], "the damaged best (5) is quarantined, not kept"
    assert steps(storage) == [8] and [name[:15] for name in quarantined(storage)] == ["step-000000005-"]
    assert not storage.files(step_path), "the old layout's payload moved to quarantine with its meta.json"
    assert_latest_loads(storage, 8, seed=6)


# --- the engine resumes from the newest good checkpoint ------------------------------------


def tiny_job(storage_uri: str) -> JobConfig:
    return JobConfig.model_validate({
        "name": "tiny",
        "seed": 3,
        "data": {"name": "synthetic", "num_classes": 3, "train_samples": 48, "val_samples": 10, "image_size": 32},
        "model": {"name": "unet", "base_channels": 4, "depth": 2},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 2, "batch_size": 8, "checkpoint_every_steps": 4, "log_every_steps": 1},
        "scaling": {"num_workers": 1, "torch_threads": 1},
        "storage": {"uri": storage_uri, "keep_best": 1},
        "preemption": {"aws_metadata_url": None, "gcp_metadata_url": None},  # tests talk to loopback only
    })


def test_resume_quarantines_a_damaged_newest_and_goes_on_from_the_good_one(tmp_path, caplog):
    uri = str(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        loop.run(tiny_job(uri), CrashAfter(reports=3))  # commits at steps 4, 6 (best, epoch end) and 8
    storage = open_storage(uri)
    run_path = storage.path("tiny")
    assert [info.step for info in checkpoint.list_committed(storage, run_path)] == [6, 8]
    damage(storage, checkpoint.latest(storage, run_path))

    worker = loop.setup(tiny_job(uri), LocalSession("cpu"))
    worker.watcher.stop()
    assert worker.progress.step == 6
    [line] = [r.getMessage() for r in caplog.records if "cannot resume from step-000000008" in r.getMessage()]
    assert "sha256 does not match" in line and f"{run_path}/quarantine/step-000000008-" in line
    assert line.endswith("resuming from step-000000006")
    assert [info.step for info in checkpoint.list_committed(storage, run_path)] == [6]

    loop.run(tiny_job(uri), LocalSession("cpu"))  # trains on through step 8 again, to the end
    newest = checkpoint.latest(storage, run_path)
    assert newest.step == 12 and checkpoint.verify(storage, newest) is None
    assert checkpoint.load(storage, newest, expected_run="tiny").train_state["progress"]["step"] == 12


def test_an_attempt_folder_is_a_whole_checkpoint_wherever_it_is_copied(storage, tmp_path):
    """What pull, evaluate and predict rely on: the step folder a user names leads to its committed attempt,
    and a copy of that attempt loads on its own (its meta.json has no 'attempt' key)."""
    info = commit(storage, tmp_path, step=9, miou=0.3, seed=7)
    assert choose_checkpoint(storage, info.step_path) == info.path
    history, where = run_history(storage.display(info.step_path), storage.endpoint_url)
    assert history == [{"step": 9, "seed": 7}] and where == storage.display(info.path)
    storage.get_folder(info.path, tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == sorted([*checkpoint.PAYLOAD_FILES, "meta.json"])
    assert checkpoint.load_folder(tmp_path / "copy", expected_run=RUN).train_state["seed"] == 7
