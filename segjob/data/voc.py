"""PASCAL VOC 2012 segmentation in its published layout.

    root/VOCdevkit/VOC2012/ (or root/VOC2012/, or root itself)
        JPEGImages/ID.jpg
        SegmentationClass/ID.png            palette PNG: index = class 0..20, 255 = void
        ImageSets/Segmentation/train.txt    one ID per line; val.txt likewise

Void (255, object outlines and hard regions) is ignored in the loss and the metrics. The
SBD-augmented training set (10 582 images) comes as a list file, `data.train_list`: lines
of IDs (masks then come from SegmentationClassAug/ when that folder exists, else
SegmentationClass/), or of "image mask" paths relative to VOC2012/ such as
"/JPEGImages/2008_000002.jpg /SegmentationClassAug/2008_000002.png". A mask may also be one
of SBD's own cls/ID.mat files (GTcls.Segmentation). IDs of the validation list are taken
out of the training list, since SBD's sets overlap VOC's val. With data.split: random, both
lists are pooled and split at random, seeded (the PSPNet recipe held out a random share).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.io

from segjob.data.files import READ_ERRORS, Finding, label_value_findings
from segjob.data.labels import IGNORE_INDEX, IndexCoding, Palette
from segjob.data.paired import PairedFileDataset
from segjob.data.remote import local_root
from segjob.data.splits import random_split, without
from segjob.data.transforms import build_transform
from segjob.errors import UserError
from segjob.job.schema import FileDataBase, VOCData

log = logging.getLogger("segjob")

CLASS_NAMES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
LAYOUT = "VOCdevkit/VOC2012/ with JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/{train,val}.txt"


Pairs = dict[str, tuple[Path, Path]]  # {sample name: (image file, label file)}


class ListedPairsDataset(PairedFileDataset):
    """Samples found as (image, label file) pairs, whose label values are the class indices
    (VOC, CamVid). A subclass names its classes, the label value it ignores and its colours."""

    classes: list[str] = []
    ignored_label = IGNORE_INDEX
    colours: Palette | None = None  # None: the PASCAL VOC colour map

    def __init__(self, pairs: Pairs, **common):
        coding = IndexCoding({label: label for label in range(len(self.classes))}, ignore=[self.ignored_label])
        super().__init__(list(pairs), coding, self.classes, palette=self.colours, **common)
        self.pairs = pairs

    def image_path(self, name: str) -> Path:
        return self.pairs[name][0]

    def label_path(self, name: str) -> Path:
        return self.pairs[name][1]


def train_and_val(dataset: type[ListedPairsDataset], cfg: FileDataBase, seed: int, train_pairs: Pairs,
                  val_pairs: Pairs) -> tuple[ListedPairsDataset, ListedPairsDataset]:
    """(train, val) datasets of the pairs data.exclude leaves, each with its split's transform."""

    def kept(pairs: Pairs) -> Pairs:
        return {name: pairs[name] for name in without(list(pairs), cfg.exclude)}

    return (dataset(kept(train_pairs), transform=build_transform(cfg, train=True), seed=seed, train=True),
            dataset(kept(val_pairs), transform=build_transform(cfg, train=False), seed=seed, train=False))


class VOCDataset(ListedPairsDataset):
    dataset_name, label_kind = "voc", "mask"
    classes = CLASS_NAMES  # void (255) is ignored

    def read_raw_labels(self, path: Path, grid: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
        if path.suffix != ".mat":
            return super().read_raw_labels(path, grid)
        raw = read_sbd_mat(path)
        return raw, (raw.shape[1], raw.shape[0])

    def inspect_label_file(self, path: Path) -> tuple[tuple[int, int] | None, list[Finding]]:
        if path.suffix != ".mat":
            return super().inspect_label_file(path)
        if not path.is_file():
            return None, [Finding(f"mask {path} is missing")]
        try:
            raw = read_sbd_mat(path)
        except READ_ERRORS + (KeyError, AttributeError) as error:
            return None, [Finding(f"mask {path} is not an SBD GTcls file ({type(error).__name__}: {error})")]
        return (raw.shape[1], raw.shape[0]), label_value_findings(raw, self.coding, f"mask {path}")


def read_sbd_mat(path: Path) -> np.ndarray:
    """SBD's cls/ID.mat: the class map in GTcls.Segmentation (MATLAB v5, read with scipy)."""
    content = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    return np.asarray(content["GTcls"].Segmentation)


def find_voc2012(root: Path) -> Path:
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise UserError(f"data.root: no VOC2012 folder under {root}; expected {LAYOUT}")


def list_pairs(voc: Path, list_file: Path, default_masks: str) -> Pairs:
    """{ID: (image, mask)} from a list of IDs or of 'image mask' path pairs (relative to VOC2012/)."""
    if not list_file.is_file():
        raise UserError(f"data: {list_file} not found; the layout is {LAYOUT}")
    pairs = {}
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) == 1:
            name = words[0]
            pairs[name] = (voc / "JPEGImages" / f"{name}.jpg", voc / default_masks / f"{name}.png")
        elif len(words) == 2:
            image, mask = (voc / word.lstrip("/") for word in words)
            pairs[image.stem] = (image, mask)
        else:
            raise UserError(f"{list_file}:{number}: expected an ID or 'image mask', got '{line.strip()}'")
    return pairs


def build(cfg: VOCData, seed: int) -> tuple[VOCDataset, VOCDataset]:
    voc = find_voc2012(local_root(cfg.root, cfg.endpoint_url))
    lists = voc / "ImageSets" / "Segmentation"
    val_pairs = list_pairs(voc, lists / "val.txt", "SegmentationClass")
    if cfg.train_list:
        train_list = Path(cfg.train_list) if Path(cfg.train_list).is_absolute() else voc / cfg.train_list
        masks = "SegmentationClassAug" if (voc / "SegmentationClassAug").is_dir() else "SegmentationClass"
        train_pairs = list_pairs(voc, train_list, masks)
        overlap = sorted(set(train_pairs) & set(val_pairs))
        if overlap:
            log.warning("data: %d IDs of %s are in the validation list too (e.g. %s); they are left out of training",
                        len(overlap), train_list.name, overlap[0])
            train_pairs = {name: pair for name, pair in train_pairs.items() if name not in val_pairs}
    else:
        train_pairs = list_pairs(voc, lists / "train.txt", "SegmentationClass")

    if cfg.split == "random":
        pool = {**train_pairs, **val_pairs}
        train_names, val_names = random_split(list(pool), cfg.val_fraction, seed)
        train_pairs, val_pairs = ({name: pool[name] for name in names} for names in (train_names, val_names))
    return train_and_val(VOCDataset, cfg, seed, train_pairs, val_pairs)

