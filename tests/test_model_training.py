"""One short epoch per architecture through the real engine, to catch wiring mistakes:
dict outputs, frozen stages, AMP and channels_last, checkpoints that load back."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.models as tv

from segjob.engine import loop
from segjob.engine.session import LocalSession
from segjob.job.schema import JobConfig
from segjob.models import create_model
from segjob.store import checkpoint
from segjob.store.storage import open_storage

ARCHITECTURES = {
    "unet-resnet18-se": {"name": "unet", "encoder": "resnet18", "decoder_channels": [16, 16, 8, 8, 8], "se": True},
    "unet-mobilenet_v2-frozen": {"name": "unet", "encoder": "mobilenet_v2", "decoder_channels": [16, 16, 8, 8, 8],
                                 "freeze_encoder": 2},
    "pspnet-resnet18-aux": {"name": "pspnet", "encoder": "resnet18", "aux_weight": 0.4},
    "pspnet-mobilenet_v3-os16": {"name": "pspnet", "encoder": "mobilenet_v3_large", "output_stride": 16,
                                 "channels_last": True},
    "segnet-narrow": {"name": "segnet", "width": 4},
    "segnet-pets": {"name": "segnet", "stages": 4, "width": 4, "input_batchnorm": True},
}


def tiny_job(storage_uri: str, model: dict, **train) -> JobConfig:
    return JobConfig.model_validate({
        "name": "zoo",
        "seed": 5,
        "data": {"name": "synthetic", "num_classes": 3, "train_samples": 8, "val_samples": 4, "image_size": 32},
        "model": model,
        "optim": {"name": "sgd", "lr": 0.01, "schedule": {"name": "poly"}},
        "train": {"epochs": 1, "batch_size": 4, "log_every_steps": 1} | train,
        "scaling": {"num_workers": 1, "torch_threads": 1},
        "storage": {"uri": storage_uri, "keep_best": 1},
        "preemption": {"aws_metadata_url": None, "gcp_metadata_url": None},  # tests talk to 127.0.0.1 only
    })


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_one_epoch_trains_evaluates_and_checkpoints(architecture, tmp_path):
    job = tiny_job(str(tmp_path), ARCHITECTURES[architecture], amp="bf16" if "os16" in architecture else "off")
    metrics = loop.run(job, LocalSession("cpu"))
    assert metrics["step"] == 2
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    assert 0.0 <= metrics["val/miou"] <= 1.0

    storage = open_storage(str(tmp_path))
    saved = checkpoint.load(storage, checkpoint.latest(storage, storage.path("zoo")), expected_run="zoo")
    rebuilt = create_model(JobConfig.model_validate(saved.meta["job"]).model, 3, 3)
    rebuilt.load_state_dict(saved.model_state)  # strict: the checkpoint fits the model its job describes


def test_frozen_pretrained_stages_do_not_move_in_training(tmp_path):
    """The transfer-learning recipe: weights from a file, the first stages frozen, BatchNorm statistics included."""
    torch.manual_seed(0)
    pretrained = tv.mobilenet_v2(weights=None).state_dict()
    weights = tmp_path / "mobilenet_v2.pth"
    torch.save(pretrained, weights)
    model = ARCHITECTURES["unet-mobilenet_v2-frozen"] | {"encoder_weights": str(weights)}
    loop.run(tiny_job(str(tmp_path / "runs"), model), LocalSession("cpu"))

    storage = open_storage(str(tmp_path / "runs"))
    trained = checkpoint.load(storage, checkpoint.latest(storage, storage.path("zoo"))).model_state
    stage_1_and_2 = [k for k in pretrained
                     if k.startswith(("features.0.", "features.1.", "features.2.", "features.3."))]
    for key in stage_1_and_2:
        assert torch.equal(trained[f"encoder.{key}"], pretrained[key]), f"{key} changed in a frozen stage"
    for key in ("features.4.conv.0.0.weight", "features.4.conv.0.1.running_mean"):
        assert not torch.equal(trained[f"encoder.{key}"], pretrained[key]), f"{key} did not train"
