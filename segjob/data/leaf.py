"""Soybean-rust leaf lesions (the ASRDNet dataset) in its published layout.

    root/original_images/imageN.jpeg     close-up leaf photos, 1280x960 and 1280x1280
    root/binary_mask/imageN.png          0 = background, 255 = lesion (>= 2 of 3 experts)
    root/probabilistic_mask/imageN.png   0 / 85 / 170 / 255 = 0 to 3 expert votes for "lesion"

255 is the lesion here, not "ignore": it becomes class 1. With data.soft_targets, training
targets are the expert votes as lesion probabilities (float [2, H, W]: 1 - v/3, v/3), so a
model learns an analogue lesion map; validation keeps the binary mask, so metrics stay hard.
No split ships: a seeded random one is made. The photos are large, so JPEG decoding runs
at reduced size whenever the job's image_size allows.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from segjob.data.labels import IGNORE_INDEX, IndexCoding
from segjob.data.paired import PairedFileDataset
from segjob.data.remote import local_root
from segjob.data.splits import random_split, without
from segjob.data.transforms import build_transform
from segjob.errors import UserError
from segjob.job.schema import LeafData

CLASS_NAMES = ["background", "lesion"]
PALETTE = [(0, 0, 0), (230, 90, 20)]
VOTES = 3  # experts per pixel
BINARY = IndexCoding({0: 0, 255: 1})
VOTE_COUNTS = IndexCoding({round(votes * 255 / VOTES): votes for votes in range(VOTES + 1)})  # 0, 85, 170, 255 -> 0..3
LAYOUT = "original_images/imageN.jpeg, binary_mask/imageN.png, probabilistic_mask/imageN.png"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


class LeafDataset(PairedFileDataset):
    dataset_name = "leaf"

    def __init__(self, root: Path, images: dict[str, Path], soft: bool, **common):
        super().__init__(list(images), VOTE_COUNTS if soft else BINARY, CLASS_NAMES, palette=PALETTE, **common)
        self.root, self.images, self.soft = root, images, soft
        self.label_kind = "vote mask" if soft else "mask"

    def image_path(self, name: str) -> Path:
        return self.images[name]

    def label_path(self, name: str) -> Path:
        return self.root / ("probabilistic_mask" if self.soft else "binary_mask") / f"{name}.png"

    def target(self, mask: torch.Tensor) -> torch.Tensor:
        if not self.soft:
            return super().target(mask)
        votes = mask.as_subclass(torch.Tensor)
        labelled = (votes != IGNORE_INDEX).float()  # padding and rotation fill: all-zero probabilities
        lesion = votes.clamp(max=VOTES).float() / VOTES * labelled
        return torch.stack([labelled - lesion, lesion])


def natural_key(name: str) -> list:
    """image2 before image10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def build(cfg: LeafData, seed: int) -> tuple[LeafDataset, LeafDataset]:
    root = local_root(cfg.root, cfg.endpoint_url)
    for folder in ("original_images", "binary_mask") + (("probabilistic_mask",) if cfg.soft_targets else ()):
        if not (root / folder).is_dir():
            raise UserError(f"data.root: {root / folder} not found; the leaf-lesion layout under root is {LAYOUT}")
    images = {path.stem: path for path in (root / "original_images").iterdir() if path.suffix.lower() in IMAGE_SUFFIXES}
    train_names, val_names = random_split(sorted(images), cfg.val_fraction, seed)

    def subset(names: list[str]) -> dict[str, Path]:
        return {name: images[name] for name in sorted(without(names, cfg.exclude), key=natural_key)}

    train = LeafDataset(root, subset(train_names), cfg.soft_targets, transform=build_transform(cfg, train=True),
                        seed=seed, train=True)
    val = LeafDataset(root, subset(val_names), False, transform=build_transform(cfg, train=False),
                      seed=seed, train=False)
    return train, val
