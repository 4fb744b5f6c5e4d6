"""The interface every dataset implements, and the per-sample seeding behind augmentation.

A dataset is indexed by `index` or by `(epoch, index)` (the training samplers yield the
latter). A training dataset augments with a torch.Generator seeded from
(seed, epoch, index), so a sample looks the same whichever DataLoader process or Ray rank
loads it, and a resumed run sees the augmentations the interrupted one would have seen.
Validation datasets ignore the epoch and are deterministic.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod

import torch
from torch.utils.data import Dataset

from segjob.data.files import Finding
from segjob.data.labels import default_palette
from segjob.data.transforms import JointTransform, Sample

MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, identical in every process and Python version.

    Python's hash() is salted per process for strings, so it cannot be used here.
    """
    state = 0x243F6A8885A308D3
    for part in parts:
        state = _splitmix64(state ^ (operator.index(part) & MASK64))
    return state >> 1


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(seed, epoch, index))


def split_key(key: int | tuple[int, int]) -> tuple[int, int]:
    """(epoch, index) from a dataset key; a bare index means epoch 0."""
    if isinstance(key, (tuple, list)):
        epoch, index = key
        return operator.index(epoch), operator.index(index)
    return 0, operator.index(key)


class SegmentationDataset(Dataset, ABC):
    """Pairs of (image float32 [C,H,W], normalised; target).

    The target is int64 [H,W] labels 0..num_classes-1 or IGNORE_INDEX, or, where a dataset
    trains on soft labels, float32 [K,H,W] class probabilities (all zero where ignored);
    validation sets always give labels. C is in_channels: 3, or 4 with depth as the 4th
    channel. Every sample of one dataset has the same square size, so the default collate
    stacks them. Subclasses set class_names (and in_channels, palette) and implement
    load(), sample_name() and inspect().
    """

    class_names: list[str]
    in_channels: int = 3

    def __init__(self, transform: JointTransform, seed: int, train: bool):
        self.transform = transform
        self.seed = seed
        self.train = train  # True: augment, seeded per (seed, epoch, index)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        """One RGB colour per class, for figures and colour overlays."""
        return default_palette(self.num_classes)

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> Sample:
        """The raw sample as tv_tensors on one pixel grid: {"image": Image (uint8 or float 0..1),
        "mask": Mask, optionally "depth": Depth}."""

    @abstractmethod
    def sample_name(self, index: int) -> str:
        """A short name for messages and reports (a file stem)."""

    @abstractmethod
    def inspect(self, index: int) -> list[Finding]:
        """Everything wrong with sample `index`, each naming its file; [] when it is fine.
        Reads the files fully (python -m segjob.check and the check before training call it)."""

    def load_original(self, index: int) -> Sample:
        """The raw sample with its mask on the label file's own grid, the one scores are counted on
        (the image may be decoded smaller). Datasets whose load() keeps the label's grid inherit this."""
        return self.load(index)

    def scoring_item(self, index: int, transform: JointTransform) -> tuple[torch.Tensor, torch.Tensor]:
        """(image [C, h, w] at the job's scale through `transform`, unpadded; target on the label's own
        grid [H, W] (or [K, H, W] soft)). Never augmented, whichever split this is."""
        sample = self.load_original(index)
        mask = sample.pop("mask")
        sample = transform(sample)
        image = sample["image"].as_subclass(torch.Tensor)
        if "depth" in sample:
            image = torch.cat([image, sample["depth"].as_subclass(torch.Tensor)])
        return image, self.target(mask)

    def target(self, mask: torch.Tensor) -> torch.Tensor:
        """The training target from the transformed mask: int64 labels (soft-label datasets override)."""
        return mask.as_subclass(torch.Tensor).to(torch.int64)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = split_key(key)
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        generator = sample_generator(self.seed, epoch, index) if self.train else None
        sample = self.transform(self.load(index), generator)
        image = sample["image"].as_subclass(torch.Tensor)
        if "depth" in sample:
            image = torch.cat([image, sample["depth"].as_subclass(torch.Tensor)])
        return image, self.target(sample["mask"])

    def __repr__(self) -> str:
        split = "train" if self.train else "val"
        return f"{type(self).__name__}({split}, {len(self)} samples, classes={self.class_names})"
