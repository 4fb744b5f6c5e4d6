"""Photometric augmentation: colour jitter, Gaussian blur, sharpness, on the image only.

    steps = photometric_steps(job.data.augment)   # [] at strength 0

Masks and depth are untouched: these steps change how a scene looks, not where anything is.
Each range is the job's value times `augment.strength`. They run after the geometry, on the
image_size crop, while the image is still uint8 (cheaper than on the decoded photo).
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import functional as F

from segjob.job.schema import AugmentConfig

BLUR_PROBABILITY = 0.5  # as in the PSPNet authors' code: half the images are blurred


def uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    """One draw in [low, high) from the sample's own generator (the geometric steps draw with it too)."""
    return low + (high - low) * float(torch.rand((), generator=generator))


class ColorJitter:
    """Brightness, contrast and saturation factors in 1 ± range, hue shift in ± range, in that order."""

    random = True

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float):
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def __call__(self, sample: dict, generator: torch.Generator | None) -> dict:
        brightness = uniform(generator, 1 - self.brightness, 1 + self.brightness)
        contrast = uniform(generator, 1 - self.contrast, 1 + self.contrast)
        saturation = uniform(generator, 1 - self.saturation, 1 + self.saturation)
        hue = uniform(generator, -self.hue, self.hue)
        image = sample["image"]
        if self.brightness:
            image = F.adjust_brightness(image, brightness)
        if self.contrast:
            image = F.adjust_contrast(image, contrast)
        if self.saturation:
            image = F.adjust_saturation(image, saturation)
        if self.hue:  # the slowest of the four (an HSV round trip): skipped when off
            image = F.adjust_hue(image, hue)
        return {**sample, "image": image}


class GaussianBlur:
    """Blur half the images with a sigma drawn in [0.1, max_sigma] pixels."""

    random = True

    def __init__(self, max_sigma: float):
        self.max_sigma = max_sigma

    def __call__(self, sample: dict, generator: torch.Generator | None) -> dict:
        apply = uniform(generator, 0.0, 1.0) < BLUR_PROBABILITY
        sigma = uniform(generator, min(0.1, self.max_sigma), self.max_sigma)
        if not apply:
            return sample
        kernel = 2 * math.ceil(3 * sigma) + 1  # +-3 sigma holds 99.7 % of the weight
        return {**sample, "image": F.gaussian_blur(sample["image"], [kernel, kernel], [sigma, sigma])}


class Sharpness:
    """Sharpness factor in 1 ± range: below 1 softens, above 1 sharpens (PIL's ImageEnhance.Sharpness)."""

    random = True

    def __init__(self, amount: float):
        self.amount = amount

    def __call__(self, sample: dict, generator: torch.Generator | None) -> dict:
        factor = uniform(generator, 1 - self.amount, 1 + self.amount)
        return {**sample, "image": F.adjust_sharpness(sample["image"], factor)}


def photometric_steps(augment: AugmentConfig) -> list:
    """The image-only steps the job asks for at its strength; none at strength 0."""
    strength = augment.strength
    steps: list = []
    jitter = [strength * value for value in (augment.brightness, augment.contrast, augment.saturation, augment.hue)]
    if any(jitter):
        steps.append(ColorJitter(*jitter))
    if strength * augment.blur > 0:
        steps.append(GaussianBlur(strength * augment.blur))
    if strength * augment.sharpness > 0:
        steps.append(Sharpness(strength * augment.sharpness))
    return steps
