"""The baseline for bench/loader.py: torchvision's references/segmentation training preset.

    transform = SegmentationPresetTrain(base_size=360, crop_size=480)
    dataset = ReferenceDataset(pairs, transform, label_table)

Written from the published steps of torchvision's references/segmentation (presets.py and
transforms.py, PIL backend, the default): those scripts are not a package. Per sample:
PIL decode and convert("RGB"); resize the shorter side to a random integer in
[0.5, 2.0] x base_size (image antialiased bilinear, mask nearest); horizontal flip with
probability 0.5; pad to crop_size if smaller (image 0, mask 255); random crop_size square;
PIL to tensor; float in 0..1; ImageNet normalisation. Randomness from Python's `random`,
as there. The label map is remapped through a 256-entry table after loading (CamVid's
unlabelled 11 -> 255), which a user of the references would have to add for CamVid too.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pad_if_smaller(image: Image.Image, size: int, fill: int = 0) -> Image.Image:
    width, height = image.size
    if min(width, height) < size:
        image = F.pad(image, [0, 0, max(0, size - width), max(0, size - height)], fill=fill)
    return image


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image, target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target


class RandomResize:
    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target):
        size = random.randint(self.min_size, self.max_size)
        image = F.resize(image, size, antialias=True)
        target = F.resize(target, size, interpolation=T.InterpolationMode.NEAREST)
        return image, target


class RandomHorizontalFlip:
    def __init__(self, flip_prob: float):
        self.flip_prob = flip_prob

    def __call__(self, image, target):
        if random.random() < self.flip_prob:
            image, target = F.hflip(image), F.hflip(target)
        return image, target


class RandomCrop:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, image, target):
        image = pad_if_smaller(image, self.size)
        target = pad_if_smaller(target, self.size, fill=255)
        crop = T.RandomCrop.get_params(image, (self.size, self.size))
        return F.crop(image, *crop), F.crop(target, *crop)


class PILToTensor:
    def __call__(self, image, target):
        return F.pil_to_tensor(image), torch.as_tensor(np.array(target), dtype=torch.int64)


class ToDtype:
    def __call__(self, image, target):
        return F.convert_image_dtype(image, torch.float), target


class Normalize:
    def __call__(self, image, target):
        return F.normalize(image, mean=IMAGENET_MEAN, std=IMAGENET_STD), target


class SegmentationPresetTrain:
    def __init__(self, *, base_size: int, crop_size: int, hflip_prob: float = 0.5):
        self.transforms = Compose([
            RandomResize(int(0.5 * base_size), int(2.0 * base_size)),
            RandomHorizontalFlip(hflip_prob),
            RandomCrop(crop_size),
            PILToTensor(),
            ToDtype(),
            Normalize(),
        ])

    def __call__(self, image, target):
        return self.transforms(image, target)


class ReferenceDataset(torch.utils.data.Dataset):
    """(image path, mask path) pairs loaded the way torchvision's VOCSegmentation does."""

    def __init__(self, pairs: list[tuple[Path, Path]], transform, label_table: np.ndarray):
        self.pairs, self.transform, self.label_table = pairs, transform, label_table

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        image_path, mask_path = self.pairs[index % len(self.pairs)]
        image = Image.open(image_path).convert("RGB")
        target = Image.fromarray(self.label_table[np.asarray(Image.open(mask_path))])
        return self.transform(image, target)
