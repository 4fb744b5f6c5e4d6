"""Joint transforms: a sample's image, mask and depth map change together.

    transform = build_transform(job.data, train=True)
    sample = transform({"image": Image(uint8), "mask": Mask(labels)}, generator)

A sample is a dict of tv_tensors: "image" (Image), "mask" (Mask), optionally "depth"
(Depth). Every geometric step applies one operation to every entry, and the entry's type
picks the resampling: bilinear for the image, nearest for masks and depth, so labels never
blend. Padding fills masks with IGNORE_INDEX, images and depth with 0. Photometric steps
(photometric.py) touch the image only.

Random parameters are drawn from the torch.Generator the dataset passes in, never from the
global RNG (v2's own random transforms use it), so a sample's augmentation depends only on
(seed, epoch, index), whichever worker process or rank loads it. Each random step draws the
same number of values whatever it decides, so one step's outcome never shifts the draws of
the steps after it.

Training: one geometric step (zoom, rotation and crop to image_size, drawn together and done
as one crop-then-resize, so the work is proportional to the output, not to the zoomed image),
the flip, the photometric steps, normalisation. In crop mode (data.crop) the same step cuts
crop-sized squares out of the image at the job's scale, zoomed by data.crop.scale. Evaluation:
a deterministic resize (squash, or fit and pad), normalisation. Scoring (build_scoring_transform)
resizes the image alone and leaves the padding to the inference (segjob.engine.inference), which
knows the model's input; the label stays on its own grid.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from segjob.data.labels import IGNORE_INDEX
from segjob.data.photometric import photometric_steps, uniform
from segjob.job.schema import AugmentConfig, DataBase

Sample = dict[str, torch.Tensor]  # "image": tv_tensors.Image, "mask": tv_tensors.Mask, optional "depth": Depth

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class Depth(tv_tensors.Mask):
    """A depth map [1, H, W] in metres. A Mask subclass, so every v2 kernel resamples it with
    nearest (depth at an object's edge must not blend foreground and background); padded with 0,
    which depth sensors use for "no reading"."""


class Step(Protocol):
    random: bool  # draws from the generator: only allowed in training transforms

    def __call__(self, sample: Sample, generator: torch.Generator | None) -> Sample: ...


def fill_for(value: torch.Tensor) -> float:
    if isinstance(value, tv_tensors.Mask) and not isinstance(value, Depth):
        return float(IGNORE_INDEX)
    return 0.0


def resize(value: torch.Tensor, size: list[int]) -> torch.Tensor:
    if list(value.shape[-2:]) == size:
        return value
    if isinstance(value, tv_tensors.Image):
        return F.resize(value, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    # nearest-exact samples at pixel centres, like bilinear, so labels stay on the image's grid
    return F.resize(value, size, interpolation=InterpolationMode.NEAREST_EXACT)


def pad(value: torch.Tensor, left: int, top: int, right: int, bottom: int) -> torch.Tensor:
    if left == top == right == bottom == 0:
        return value
    return F.pad(value, [left, top, right, bottom], fill=fill_for(value))


def spatial_size(sample: Sample) -> tuple[int, int]:
    """(height, width), the same for every entry (datasets resample to the image's grid on load)."""
    return tuple(sample["image"].shape[-2:])


def base_factors(height: int, width: int, size: int, fit: bool) -> tuple[float, float]:
    """(vertical, horizontal) factors that bring an image to `size`: both sides, or the longer one."""
    if fit:
        factor = size / max(height, width)
        return factor, factor
    return size / height, size / width


class Resize:
    """Deterministic resize to the job's size: squash to size x size, or fit the longer side."""

    random = False

    def __init__(self, size: int, fit: bool = False):
        self.size, self.fit = size, fit

    def __call__(self, sample: Sample, generator: torch.Generator | None) -> Sample:
        height, width = spatial_size(sample)
        factor_y, factor_x = base_factors(height, width, self.size, self.fit)
        target = [max(1, round(height * factor_y)), max(1, round(width * factor_x))]
        return {key: resize(value, target) for key, value in sample.items()}


class PadTo:
    """Pad on the right and bottom to size x size (fit mode), so predictions crop back with [:h, :w]."""

    random = False

    def __init__(self, size: int):
        self.size = size

    def __call__(self, sample: Sample, generator: torch.Generator | None) -> Sample:
        height, width = spatial_size(sample)
        right, bottom = max(0, self.size - width), max(0, self.size - height)
        return {key: pad(value, 0, 0, right, bottom) for key, value in sample.items()}


class RandomGeometry:
    """Zoom, rotate and crop (or pad) to crop x crop, drawn once for the whole sample.

    The zoom is relative to the image at the job's scale (`size`, squashed or fitted); the crop
    is `size` itself unless crop mode asks for smaller windows. The output square is a window on
    the zoomed image at a random position (when the zoomed image is smaller than the window, the
    image lands at a random place in it and the rest is padding). For a rotation the window grows
    by |cos a| + |sin a| so the corners are filled from the image, not from padding, where the
    image extends that far; it is rotated and then cut back to the centre. Only the part of the
    source under the window is resized.
    """

    random = True

    def __init__(self, size: int, fit: bool, scale: tuple[float, float], rotation: float, crop: int | None = None):
        self.size, self.fit, self.scale, self.rotation = size, fit, scale, rotation
        self.crop = crop or size

    def __call__(self, sample: Sample, generator: torch.Generator | None) -> Sample:
        zoom = uniform(generator, *self.scale)
        angle = uniform(generator, -self.rotation, self.rotation)
        along_y, along_x = uniform(generator), uniform(generator)

        height, width = spatial_size(sample)
        factor_y, factor_x = base_factors(height, width, self.size, self.fit)
        factor_y, factor_x = factor_y * zoom, factor_x * zoom
        radians = math.radians(angle)
        grow = abs(math.cos(radians)) + abs(math.sin(radians))
        margin = math.ceil((self.crop * grow - self.crop) / 2) if angle else 0
        window = self.crop + 2 * margin
        # window position in zoomed-image pixels: inside the image when it is larger, around it when smaller
        top = _place(height * factor_y, self.crop, along_y) - margin
        left = _place(width * factor_x, self.crop, along_x) - margin
        rows = _covered(top, height, factor_y, window)
        cols = _covered(left, width, factor_x, window)
        out = {key: _crop_resize_pad(value, rows, cols, window) for key, value in sample.items()}
        if angle:
            out = {key: _rotate(value, angle) for key, value in out.items()}
            out = {key: F.center_crop(value, [self.crop, self.crop]) for key, value in out.items()}
        return out


def _place(extent: float, size: int, fraction: float) -> float:
    """Top (or left) of a size-long window on an extent-long image, at fraction of the free play."""
    low, high = min(0.0, extent - size), max(0.0, extent - size)
    return low + fraction * (high - low)


def _covered(start: float, source: int, factor: float, window: int) -> tuple[int, int, int, int]:
    """(first, end) source pixels under a window starting at `start` (zoomed pixels), and the
    (first, end) window pixels they fill. Integers, so every entry gets identical operations."""
    out_first = min(window, max(0, round(-start)))
    out_end = max(out_first, min(window, round(source * factor - start)))
    src_first = min(source - 1, max(0, round((out_first + start) / factor)))
    src_end = max(src_first + 1, min(source, round((out_end + start) / factor)))
    return src_first, src_end, out_first, out_end


def _crop_resize_pad(value: torch.Tensor, rows: tuple, cols: tuple, window: int) -> torch.Tensor:
    src_top, src_bottom, out_top, out_bottom = rows
    src_left, src_right, out_left, out_right = cols
    if out_bottom <= out_top or out_right <= out_left:  # the window misses the image (a tiny zoom): all padding
        shape = (*value.shape[:-2], window, window)
        return tv_tensors.wrap(torch.full(shape, fill_for(value), dtype=value.dtype), like=value)
    part = F.crop(value, src_top, src_left, src_bottom - src_top, src_right - src_left)
    part = resize(part, [out_bottom - out_top, out_right - out_left])
    return pad(part, out_left, out_top, window - out_right, window - out_bottom)


def _rotate(value: torch.Tensor, angle: float) -> torch.Tensor:
    # Mask and Depth kernels always rotate with nearest; the image with bilinear
    return F.rotate(value, angle, interpolation=InterpolationMode.BILINEAR, fill=fill_for(value))


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
    """Image to float, then ImageNet mean/std (what pretrained encoders expect); depth to (d - mean) / std."""

    random = False

    def __init__(self, depth_mean: float = 0.0, depth_std: float = 1.0):
        self.depth_mean, self.depth_std = depth_mean, depth_std

    def __call__(self, sample: Sample, generator: torch.Generator | None) -> Sample:
        image = F.to_dtype(sample["image"], torch.float32, scale=True)  # uint8 0..255 -> 0..1; float kept
        out = {**sample, "image": F.normalize(image, mean=IMAGENET_MEAN, std=IMAGENET_STD)}
        if "depth" in sample:
            depth = sample["depth"].as_subclass(torch.Tensor).to(torch.float32)
            out["depth"] = Depth((depth - self.depth_mean) / self.depth_std)
        return out


class JointTransform:
    def __init__(self, steps: list[Step], size: int, fit: bool, max_zoom: float = 1.0):
        self.steps = steps
        self.size, self.fit, self.max_zoom = size, fit, max_zoom
        self.random = any(step.random for step in steps)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        if self.random and generator is None:
            raise ValueError("a training transform needs the sample's torch.Generator")
        for step in self.steps:
            sample = step(sample, generator)
        return sample

    def decode_size(self, width: int, height: int) -> tuple[int, int]:
        """The smallest (width, height) an image may be decoded at without losing output detail
        (PIL's JPEG draft decodes at 1/2, 1/4 or 1/8 when that still covers it)."""
        factor_y, factor_x = base_factors(height, width, self.size, self.fit)
        return math.ceil(width * factor_x * self.max_zoom), math.ceil(height * factor_y * self.max_zoom)

    def __repr__(self) -> str:
        return f"JointTransform({[type(step).__name__ for step in self.steps]})"


def scaled_range(low: float, high: float, strength: float) -> tuple[float, float]:
    """A zoom range moved toward 1 (no zoom) by strength: 0 gives (1, 1), 1 gives (low, high)."""
    return 1.0 + strength * (low - 1.0), 1.0 + strength * (high - 1.0)


def geometric_steps(augment: AugmentConfig, size: int, fit: bool) -> list[Step]:
    """The training geometry: deterministic resize at strength 0, else one RandomGeometry; then the flip."""
    zoom = scaled_range(*augment.scale, augment.strength)
    rotation = augment.strength * augment.rotation
    if zoom == (1.0, 1.0) and rotation == 0.0:
        steps: list[Step] = [Resize(size, fit), RandomHorizontalFlip(augment.hflip)]
        return steps + [PadTo(size)] if fit else steps
    return [RandomGeometry(size, fit, zoom, rotation), RandomHorizontalFlip(augment.hflip)]


def crop_steps(cfg: DataBase, fit: bool) -> list[Step]:
    """Crop mode's training geometry: a crop-sized window on the image at the job's scale, zoomed by
    crop.scale (not scaled by strength: it defines the mode), rotated by strength x rotation; the flip."""
    rotation = cfg.augment.strength * cfg.augment.rotation
    return [RandomGeometry(cfg.image_size, fit, cfg.crop.scale, rotation, crop=cfg.crop.size),
            RandomHorizontalFlip(cfg.augment.hflip)]


def build_transform(cfg: DataBase, train: bool) -> JointTransform:
    """Training: geometry, flip, photometric, normalise. Evaluation: resize (and pad), normalise.
    Every sample leaves image_size square (crop.size in crop mode's training); depth is normalised
    with the config's statistics (RGB-D datasets carry depth_mean and depth_std)."""
    fit = cfg.resize == "fit"
    if train and cfg.crop is not None:
        steps = crop_steps(cfg, fit) + photometric_steps(cfg.augment)
        max_zoom = cfg.crop.scale[1]
    elif train:
        steps = geometric_steps(cfg.augment, cfg.image_size, fit) + photometric_steps(cfg.augment)
        max_zoom = scaled_range(*cfg.augment.scale, cfg.augment.strength)[1]
    else:
        steps = [Resize(cfg.image_size, fit)] + ([PadTo(cfg.image_size)] if fit else [])
        max_zoom = 1.0
    steps.append(Normalize(getattr(cfg, "depth_mean", 0.0), getattr(cfg, "depth_std", 1.0)))
    return JointTransform(steps, cfg.image_size, fit, max(1.0, max_zoom))


def build_scoring_transform(cfg: DataBase) -> JointTransform:
    """The image (and depth) at the job's scale, normalised, without padding: what scoring feeds the
    inference (segjob.engine.inference pads it to the model's input). The mask is not part of it."""
    fit = cfg.resize == "fit"
    steps = [Resize(cfg.image_size, fit), Normalize(getattr(cfg, "depth_mean", 0.0), getattr(cfg, "depth_std", 1.0))]
    return JointTransform(steps, cfg.image_size, fit)


def padding_fill(cfg: DataBase, channels: int) -> torch.Tensor:
    """float32 [channels]: a black pixel (depth 0, "no reading") after this job's normalisation, what
    padding before normalising gives; padding a normalised image with it is padding the raw one."""
    black = {"image": tv_tensors.Image(torch.zeros(3, 1, 1, dtype=torch.uint8))}
    if channels > 3:
        black["depth"] = Depth(torch.zeros(1, 1, 1))
    out = Normalize(getattr(cfg, "depth_mean", 0.0), getattr(cfg, "depth_std", 1.0))(black, None)
    parts = [out[key].as_subclass(torch.Tensor).reshape(-1) for key in ("image", "depth") if key in out]
    return torch.cat(parts)[:channels]
