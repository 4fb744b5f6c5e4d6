"""Joint transforms: a sample's image and mask (later a depth map) change together.

A sample is a dict of tv_tensors, {"image": Image, "mask": Mask}. Every geometric step
applies one operation to every entry, and the entry's type picks the resampling:
bilinear for the image, nearest for everything else, so labels never blend. Random
parameters are drawn once per step from the torch.Generator the dataset passes in, never
from the global RNG (v2's own random transforms use it), so a sample's augmentation
depends only on (seed, epoch, index), whichever worker process or rank loads it.

`build_transform` turns the job's `data.augment` section into a list of steps. Later
augmentations (scale, rotation, crop, colour jitter under one `strength`) are more steps
in `augmentation_steps`; a step that pads fills masks with IGNORE_INDEX, images with 0.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ..config import AugmentConfig, DataBase

Sample = dict[str, torch.Tensor]  # "image": tv_tensors.Image, "mask": tv_tensors.Mask, later "depth"

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class Step(Protocol):
    random: bool  # draws from the generator: only allowed in training transforms

    def __call__(self, sample: Sample, generator: torch.Generator | None) -> Sample: ...


def uniform(generator: torch.Generator) -> float:
    """One draw in [0, 1) from the sample's own generator."""
    return float(torch.rand((), generator=generator))


class Resize:
    """Square resize without keeping the aspect ratio (the Pets recipe)."""

    random = False

    def __init__(self, size: int):
        self.size = [size, size]

    def __call__(self, sample: Sample, generator: torch.Generator | None) -> Sample:
        return {key: resize(value, self.size) for key, value in sample.items()}


def resize(value: torch.Tensor, size: list[int]) -> torch.Tensor:
    if list(value.shape[-2:]) == size:
        return value
    if isinstance(value, tv_tensors.Image):
        return F.resize(value, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    return F.resize(value, size, interpolation=InterpolationMode.NEAREST)  # labels (and depth) never blend


class RandomHorizontalFlip:
    random = True

    def __init__(self, probability: float):
        self.probability = probability

    def __call__(self, sample: Sample, generator: torch.Generator | None) -> Sample:
        # Drawn even when the probability is 0 or 1, so later steps see the same stream.
        if uniform(generator) >= self.probability:
            return sample
        return {key: F.horizontal_flip(value) for key, value in sample.items()}


class Normalize:
    """Image to float, then ImageNet mean/std (what pretrained encoders expect)."""

    random = False

    def __call__(self, sample: Sample, generator: torch.Generator | None) -> Sample:
        image = F.to_dtype(sample["image"], torch.float32, scale=True)  # uint8 0..255 -> 0..1; float kept
        return {**sample, "image": F.normalize(image, mean=IMAGENET_MEAN, std=IMAGENET_STD)}


class JointTransform:
    def __init__(self, steps: list[Step]):
        self.steps = steps
        self.random = any(step.random for step in steps)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        if self.random and generator is None:
            raise ValueError("a training transform needs the sample's torch.Generator")
        for step in self.steps:
            sample = step(sample, generator)
        return sample

    def __repr__(self) -> str:
        return f"JointTransform({[type(step).__name__ for step in self.steps]})"


def augmentation_steps(augment: AugmentConfig) -> list[Step]:
    """The random steps of a training transform, in the order they draw from the generator."""
    return [RandomHorizontalFlip(augment.hflip)]


def build_transform(cfg: DataBase, train: bool) -> JointTransform:
    """Resize, augment (training only), normalise: every sample leaves image_size square."""
    steps: list[Step] = [Resize(cfg.image_size)]  # first, so augmentation works on small tensors
    if train:
        steps += augmentation_steps(cfg.augment)
    steps.append(Normalize())
    return JointTransform(steps)
