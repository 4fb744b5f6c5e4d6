"""Learning on the real samples in ../shared/data: a few CPU seconds of training beat the
majority-class baseline on held-out images (each test skips, with the reason, where a sample
is absent).

Oxford-IIIT Pet (trimaps) trains a plain U-Net on trainval.txt and is scored on test.txt; CamVid
(11 classes) trains a small SegNet on train/ and is scored on val/. Both train with the engine
itself (loop.run, LocalSession, no Ray) and are scored by `segjob evaluate`'s core on the label
files' own grid. The baseline predicts the training split's most frequent class everywhere and
is scored by the same code on the same pixels.

The check is on mIoU: the baseline's mIoU is weak (one class's IoU over the classes present;
about 0.18 on Pets, 0.03 on CamVid), while its pixel accuracy is strong (background is 55 % of
the Pets test pixels), so a margin in pixel accuracy would say little. Pixel accuracy is only
required not to fall below the baseline's. Models and images are tiny (64 px, widths 8), so
the figures are far from published ones: this says the pipeline learns, not how well.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from shared_data import shared_data
from torch import nn

from segjob.engine import loop
from segjob.engine.session import LocalSession
from segjob.job.schema import JobConfig
from segjob.learning.losses import count_classes
from segjob.results.evaluation import evaluate
from segjob.results.trained import load_trained

# Over seeds 0-4 the recipes below beat the baseline's mIoU by 0.163-0.189 (Pets) and 0.155-0.163
# (CamVid); half the smallest margin leaves room for noise and still fails a model that did not learn.
MIOU_MARGIN = 0.08
# The baseline gets one class right; a model that learned separates at least two (seen: Pets background
# 0.61+ and pet 0.37+; CamVid sky 0.62+, road 0.69+, building 0.47+).
LEARNED_IOU = 0.2


class MajorityClass(nn.Module):
    """Logits that pick one class at every pixel, whatever the image."""

    def __init__(self, label: int, num_classes: int):
        super().__init__()
        self.label, self.num_classes = label, num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = images.new_zeros(images.shape[0], self.num_classes, *images.shape[-2:])
        logits[:, self.label] = 1.0
        return logits


@dataclasses.dataclass
class Learned:
    reported: dict[str, Any]  # what training reported after its last epoch
    model: dict[str, float]  # evaluate() of the final weights on the held-out split
    baseline: dict[str, float]  # evaluate() of the majority class, same split and protocol
    majority: str


def learn(factory: pytest.TempPathFactory, root: Path, seed: int, **sections: Any) -> Learned:
    storage = factory.mktemp("runs")
    epochs = sections["train"]["epochs"]
    job = JobConfig.model_validate({
        "name": "learn", "seed": seed, "loss": {"name": "ce"},
        "scaling": {"num_workers": 1, "torch_threads": 1},
        "storage": {"uri": str(storage), "keep_best": 1},
        "preemption": {"aws_metadata_url": None, "gcp_metadata_url": None},  # tests talk to 127.0.0.1 only
        **sections,
        # scored once, after the last epoch: validating every epoch would double the cost
        "train": sections["train"] | {"eval_every_epochs": epochs, "checkpoint_every_steps": 0},
    })
    reported = loop.run(job, LocalSession("cpu"))

    trained = load_trained(str(storage / "learn"), data_root=str(root), pick="latest", need_data=True, device="cpu")
    model = evaluate(trained, split="val", with_assd=False, progress=False).summary()

    train_set = trained.datasets[0]
    class_pixels, _, _ = count_classes(train_set, trained.num_classes, len(train_set))
    majority = int(class_pixels.argmax())
    constant = dataclasses.replace(trained, model=MajorityClass(majority, trained.num_classes))
    baseline = evaluate(constant, split="val", with_assd=False, progress=False).summary()
    return Learned(reported, model, baseline, trained.class_names[majority])


@pytest.fixture(scope="module")
def pets(tmp_path_factory) -> Learned:
    root = shared_data("oxford-iiit-pet", "images")
    return learn(
        tmp_path_factory, root, seed=0,
        data={"name": "pets", "root": str(root), "split": "official", "classes": "trimap", "image_size": 64,
              "loader_workers": 0, "augment": {"hflip": 0.5}},
        model={"name": "unet", "base_channels": 8, "depth": 3},
        optim={"name": "adam", "lr": 0.003, "schedule": {"name": "poly"}},
        train={"epochs": 15, "batch_size": 6},
    )


@pytest.fixture(scope="module")
def camvid(tmp_path_factory) -> Learned:
    root = shared_data("camvid", "CamVid")
    return learn(
        tmp_path_factory, root, seed=0,
        data={"name": "camvid", "root": str(root), "split": "official", "image_size": 64,
              "loader_workers": 0, "augment": {"hflip": 0.5}},
        model={"name": "segnet", "stages": 3, "width": 8},
        optim={"name": "adam", "lr": 0.01, "schedule": {"name": "poly"}},
        train={"epochs": 8, "batch_size": 4},
    )


def assert_beats_the_majority_class(learned: Learned) -> None:
    model, baseline = learned.model, learned.baseline
    figures = (f"model miou {model['val/miou']:.3f} pixel_acc {model['val/pixel_acc']:.3f}; always "
               f"{learned.majority}: miou {baseline['val/miou']:.3f} pixel_acc {baseline['val/pixel_acc']:.3f}")
    assert model["val/miou"] >= baseline["val/miou"] + MIOU_MARGIN, figures
    assert model["val/pixel_acc"] >= baseline["val/pixel_acc"], figures
    learned_classes = [key for key, iou in model.items() if key.startswith("val/iou/") and iou >= LEARNED_IOU]
    assert len(learned_classes) >= 2, f"IoU >= {LEARNED_IOU} only for {learned_classes}; {figures}"


def test_pets_unet_beats_the_majority_class_on_the_test_list(pets):
    assert pets.majority == "background"
    assert_beats_the_majority_class(pets)


def test_camvid_segnet_beats_the_majority_class_on_val(camvid):
    assert camvid.majority == "road"
    assert_beats_the_majority_class(camvid)


@pytest.mark.parametrize("name", ["pets", "camvid"])
def test_evaluate_gives_the_scores_training_reported(name, request):
    """The same weights, split and protocol: evaluate's figures are the engine's last validation."""
    learned: Learned = request.getfixturevalue(name)
    for key in ("val/miou", "val/pixel_acc", "val/loss"):
        assert learned.model[key] == pytest.approx(learned.reported[key], abs=1e-6), key
