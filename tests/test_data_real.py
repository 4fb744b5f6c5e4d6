"""The loaders on the real sample files in ../shared/data (each test skips, with the reason, where they are absent).

The Oxford-IIIT Pet files are covered in test_data.py.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from shared_data import shared_data

from segjob.data import build_datasets
from segjob.data.audit import check_data
from segjob.data.labels import IGNORE_INDEX
from segjob.job.schema import CamVidData, LeafData, VOCData


def names(dataset) -> list[str]:
    return [dataset.sample_name(i) for i in range(len(dataset))]


def test_real_camvid_splits_labels_and_check():
    root = shared_data("camvid")
    cfg = CamVidData(root=str(root), image_size=96)
    train, val = build_datasets(cfg, seed=0)
    listed = [line.split()[0].rsplit("/", 1)[-1][:-4] for line in (root / "CamVid/train.txt").read_text().splitlines()]
    assert names(train) == listed and (len(train), len(val)) == (46, 13)
    raw = np.asarray(Image.open(root / "CamVid/trainannot" / f"{listed[0]}.png"))
    mask = train.load(0)["mask"].numpy()
    assert mask.shape == raw.shape == (360, 480)
    assert (mask[raw == 11] == IGNORE_INDEX).all() and np.array_equal(mask[raw < 11], raw[raw < 11])
    image, target = val[0]
    assert image.shape == (3, 96, 96) and target.shape == (96, 96) and (target[72:] == IGNORE_INDEX).all()
    report = check_data(cfg, seed=0)
    assert report.errors == [] and report.checked == 59


def test_real_camvid_trainval_trains_on_train_and_val():
    train, val = build_datasets(CamVidData(root=str(shared_data("camvid") / "CamVid"), split="trainval"), seed=0)
    assert (len(train), len(val)) == (59, 29)


def test_real_voc_palette_masks_and_void():
    root = shared_data("voc2012-mini")
    cfg = VOCData(root=str(root), image_size=64, augment={"strength": 1.0, "scale": [0.5, 2.0], "rotation": 10})
    train, val = build_datasets(cfg, seed=0)
    assert names(train) == ["2007_000032", "2007_000063"] and names(val) == ["2007_000033"]
    assert set(train.load(0)["mask"].unique().tolist()) == {0, 1, 15, IGNORE_INDEX}
    assert set(train.load(1)["mask"].unique().tolist()) == {0, 9, 12, IGNORE_INDEX}
    for epoch in range(3):
        image, target = train[(epoch, 1)]
        assert image.shape == (3, 64, 64) and set(target.unique().tolist()) <= {0, 9, 12, IGNORE_INDEX}
    report = check_data(cfg, seed=0)
    assert report.errors == [] and report.checked == 3


def test_real_leaf_split_soft_targets_and_check():
    root = shared_data("soybean-rust-asrdnet")
    cfg = LeafData(root=str(root), soft_targets=True, image_size=64)
    train, val = build_datasets(cfg, seed=0)
    assert (len(train), len(val)) == (50, 13) and not set(names(train)) & set(names(val))
    assert names(val) == names(build_datasets(cfg, seed=0)[1]) != names(build_datasets(cfg, seed=1)[1])
    sample = train.load(0)
    assert max(sample["image"].shape) == 160  # a 1280-pixel photo decoded at 1/8
    assert sample["mask"].shape == sample["image"].shape[1:]
    image, target = train[(0, 0)]
    assert target.shape == (2, 64, 64) and target.dtype == torch.float32
    labelled = target.sum(0) > 0
    assert torch.allclose(target.sum(0)[labelled], torch.ones(())) and target[1].max() > 0
    _, val_target = val[0]
    assert val_target.dtype == torch.int64 and set(val_target.unique().tolist()) <= {0, 1, IGNORE_INDEX}
    report = check_data(cfg, seed=0)
    assert report.errors == [] and report.checked == 63
