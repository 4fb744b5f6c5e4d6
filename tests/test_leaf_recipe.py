"""jobs/leaf_pspnet.yaml on the real soybean-rust photos (../shared/data; skips where absent): the job as
written, shrunk to CPU size by --set keys only, trains end to end on the expert votes and predicts a lesion
probability map. A wiring check in seconds, not a learning check."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image
from shared_data import shared_data

from segjob.engine import loop
from segjob.engine.session import LocalSession
from segjob.job.load import load_job
from segjob.predict import main as predict_main
from segjob.store import checkpoint
from segjob.store.storage import open_storage

JOB = Path(__file__).resolve().parents[1] / "jobs" / "leaf_pspnet.yaml"


def test_the_leaf_recipe_trains_on_votes_and_predicts_a_lesion_map(tmp_path):
    root = shared_data("soybean-rust-asrdnet")
    job = load_job(JOB, [
        f"data.root={root}", "data.image_size=64", "data.loader_workers=0",
        "model.encoder=resnet18", "model.encoder_weights=null", "model.freeze_encoder=0",
        "train.epochs=1", "train.batch_size=4", "train.max_steps_per_epoch=2", "train.preview_every_epochs=1",
        "train.preview_images=4", "scaling.num_workers=1", "scaling.torch_threads=1", f"storage.uri={tmp_path}",
        "preemption.aws_metadata_url=null", "preemption.gcp_metadata_url=null",
    ])
    assert job.loss.name == "bce" and job.data.soft_targets and job.model.name == "pspnet"

    started = time.perf_counter()
    metrics = loop.run(job, LocalSession("cpu"))
    seconds = time.perf_counter() - started
    assert seconds < 60, f"the CPU check took {seconds:.0f} s"
    assert metrics["step"] == 2 and math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    assert 0.0 <= metrics["val/iou/lesion"] <= 1.0  # the job's metric, scored on the binary (majority) masks
    storage = open_storage(str(tmp_path))
    saved = checkpoint.load(storage, checkpoint.latest(storage, storage.path("leaf_pspnet")))
    # one output channel, the lesion logit, in the head and in the auxiliary head (their last 1x1 convs)
    assert saved.model_state["head.2.weight"].shape[0] == saved.model_state["aux_head.2.weight"].shape[0] == 1
    assert (tmp_path / "leaf_pspnet" / "previews" / "epoch-001.png").is_file()

    photo = root / "original_images" / "image1.jpeg"
    out = tmp_path / "predicted"
    assert predict_main([str(tmp_path / "leaf_pspnet"), str(photo), "--out", str(out), "--no-progress"]) == 0
    with Image.open(out / f"{photo.stem}.prob.png") as probability, Image.open(photo) as original:
        assert probability.mode == "L" and probability.size == original.size
        grey = np.asarray(probability)
    with Image.open(out / f"{photo.stem}.mask.png") as mask:
        labels = np.asarray(mask)
    clear = np.abs(grey / 255 - 0.5) > 1 / 255  # the mask is the map above loss.threshold (8-bit rounding aside)
    assert np.array_equal(labels[clear], (grey[clear] / 255 > 0.5).astype(np.uint8))
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["class_names"] == ["background", "lesion"] and summary["threshold"] == 0.5
