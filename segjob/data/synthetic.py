"""Shapes on textured backgrounds, generated on the fly: no files, no download.

Sample i of a split is a pure function of (seed, split, i). Each image has one to four
shapes (one class per kind: disc, square, triangle, ...) over a background of gradients,
stripes or blotchy noise. Shape and background colours are random and every shape is
shaded, so colour alone does not tell the classes apart; outline does. A small U-Net
gets well above chance in a few CPU minutes.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import torch
from torchvision import tv_tensors

from ..config import SyntheticData
from .base import SegmentationDataset, mix_seed
from .transforms import JointTransform, Sample, build_transform

SHAPE_KINDS = ("disc", "square", "triangle", "bar", "ring", "cross", "diamond")  # class 1, 2, ...


class SyntheticShapes(SegmentationDataset):
    def __init__(
        self,
        split: str,
        num_samples: int,
        num_classes: int,
        image_size: int,
        seed: int,
        transform: JointTransform,
        train: bool,
    ):
        super().__init__(transform, seed, train)
        if not 2 <= num_classes <= len(SHAPE_KINDS) + 1:
            raise ValueError(f"num_classes must be 2..{len(SHAPE_KINDS) + 1}, got {num_classes}")
        self.split, self.num_samples, self.image_size = split, num_samples, image_size
        self.class_names = ["background", *SHAPE_KINDS[: num_classes - 1]]
        self.in_channels = 3
        self._split_id = zlib.crc32(split.encode())  # stable across processes, unlike hash()

    def __len__(self) -> int:
        return self.num_samples

    def sample_name(self, index: int) -> str:
        return f"synthetic-{self.split}-{index:05d}"

    def load(self, index: int) -> Sample:
        rng = np.random.default_rng(mix_seed(self.seed, self._split_id, index))
        image, mask = render_sample(rng, self.image_size, self.num_classes)
        return {
            "image": tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)),
            "mask": tv_tensors.Mask(torch.from_numpy(mask)),
        }


def build(cfg: SyntheticData, seed: int) -> tuple[SyntheticShapes, SyntheticShapes]:
    common = dict(num_classes=cfg.num_classes, image_size=cfg.image_size, seed=seed)
    train = SyntheticShapes("train", cfg.train_samples, transform=build_transform(cfg, train=True), train=True, **common)
    val = SyntheticShapes("val", cfg.val_samples, transform=build_transform(cfg, train=False), train=False, **common)
    return train, val


# --- rendering --------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in units of the image side, 0..1."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    return axis[:, None], axis[None, :]  # broadcast to (size, size) on use


@functools.lru_cache(maxsize=32)
def _upsample_weights(size: int, cells: int) -> np.ndarray:
    """(size, cells) bilinear weights: W @ grid @ W.T stretches a cells x cells grid to size x size."""
    positions = np.linspace(0, cells - 1, size, dtype=np.float32)
    return np.stack([np.interp(positions, np.arange(cells), np.eye(cells)[c]) for c in range(cells)], 1).astype(np.float32)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.random(3, dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) blend factor in 0..1: a gradient, stripes or blotchy noise."""
    y, x = _pixel_grid(size)
    kind = rng.integers(3)
    if kind == 2:
        cells = int(rng.integers(3, 9))
        weights = _upsample_weights(size, cells)
        return weights @ rng.random((cells, cells), dtype=np.float32) @ weights.T
    angle = rng.uniform(0, 2 * np.pi)
    along = np.cos(angle) * x + np.sin(angle) * y
    if kind == 0:
        return np.clip(along - along.min() + rng.uniform(-0.3, 0.3), 0, 1)
    frequency = rng.uniform(2, 7)
    return 0.5 + 0.5 * np.sin(2 * np.pi * frequency * along + rng.uniform(0, 2 * np.pi))


def _shape(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of one shape at a random place, size and angle."""
    y, x = _pixel_grid(size)
    cy, cx = rng.uniform(0.12, 0.88, 2)
    radius = rng.uniform(0.09, 0.22)
    if kind == "square":
        angle = np.deg2rad(rng.uniform(-15, 15))  # kept away from the diamond's 30..60 degrees
    elif kind == "diamond":
        angle = np.deg2rad(45 + rng.uniform(-15, 15))
    else:
        angle = rng.uniform(0, 2 * np.pi)
    dy, dx = y - cy, x - cx
    u = np.cos(angle) * dx + np.sin(angle) * dy  # shape-aligned coordinates
    v = -np.sin(angle) * dx + np.cos(angle) * dy
    if kind == "disc":
        return dx * dx + dy * dy < radius * radius
    if kind in ("square", "diamond"):
        half = 0.8 * radius
        return (np.abs(u) < half) & (np.abs(v) < half)
    if kind == "triangle":  # equilateral: three half-planes, circumradius 1.2 * radius
        inside = np.ones((size, size), dtype=bool)
        for k in range(3):
            theta = angle + k * 2 * np.pi / 3
            inside &= np.cos(theta) * dx + np.sin(theta) * dy < 0.6 * radius
        return inside
    if kind == "bar":
        return (np.abs(u) < 1.2 * radius) & (np.abs(v) < 0.3 * radius)
    if kind == "ring":
        distance2 = dx * dx + dy * dy
        return (distance2 < radius * radius) & (distance2 > (0.55 * radius) ** 2)
    if kind == "cross":
        arm = 0.3 * radius
        return ((np.abs(u) < radius) & (np.abs(v) < arm)) | ((np.abs(u) < arm) & (np.abs(v) < radius))
    raise ValueError(f"unknown shape kind {kind!r}")


def render_sample(rng: np.random.Generator, size: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Image float32 (size, size, 3) in 0..1 and mask uint8 (size, size) with 0 = background."""
    low, high = _random_colour(rng), _random_colour(rng)
    image = low + (high - low) * _background(rng, size)[..., None]
    mask = np.zeros((size, size), dtype=np.uint8)
    background_mean = image.reshape(-1, 3).mean(0)
    for _ in range(int(rng.integers(1, 5))):
        label = int(rng.integers(1, num_classes))
        inside = _shape(rng, SHAPE_KINDS[label - 1], size)
        for _attempt in range(8):  # a visible shape: its colour away from the background's mean
            colour = _random_colour(rng)
            if np.abs(colour - background_mean).sum() > 0.45:
                break
        shading = colour + rng.uniform(-0.2, 0.2, 3).astype(np.float32) * _background(rng, size)[..., None]
        image[inside] = shading[inside]
        mask[inside] = label
    image += rng.normal(0.0, rng.uniform(0.01, 0.06), image.shape).astype(np.float32)  # sensor-like noise
    return np.clip(image, 0.0, 1.0, out=image), mask
