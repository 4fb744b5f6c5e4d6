"""Logits for whole images at any size: the job's scale, sliding windows, test-time augmentation.

    protocol = protocol_of(job, flip=True, scales=(0.75, 1.0, 1.25))
    predictor = Predictor(model, protocol, fill=padding_fill(job.data, 3), device=device)
    logits = predictor(images, sizes)      # images [C, h, w] at the job's scale; logits [K, H, W] at `sizes`

An image arrives at the job's scale (data.image_size, squashed or fitted, unpadded). Without
crop mode the model sees it whole, padded to a square of its longer side as in training (fit
mode pads there too); with data.crop it sees crop x crop windows with data.crop.overlap, whose
logits are blended with Gaussian or uniform weights (the image is padded up to one window where
it is smaller). Padding is a black pixel after normalisation (`fill`), which is what training's
padding before normalisation gives. The logits of the image's own pixels are then upsampled
(bilinear) to the size asked for: the label's, or the photo's.

Test-time augmentation runs every (scale, flip) view, upsamples each view's logits to the output
size and averages the probabilities (softmax, or sigmoid for one-channel models); the result is
returned as logits again (log-probabilities; the logit of the mean probability for one channel),
so the argmax, the threshold and the loss read it as they read a single view.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

PROBABILITY_FLOOR = 1e-7  # log(0) would make the loss infinite where every view was certain of another class
GAUSSIAN_SIGMA = 1 / 8  # of the window: nnU-Net's choice
GAUSSIAN_FLOOR = 1e-4  # the weight of a window's corners, relative to its centre: never zero


@dataclass(frozen=True)
class Protocol:
    """How a split is scored: the grid pixels are counted on, and how the model is run over an image."""

    grid: str = "original"  # "original": the label's own pixels; "input": labels resized to the model's input
    window: int | None = None  # sliding windows of this side (data.crop.size); None: the whole image
    overlap: float = 0.5
    blend: str = "gaussian"  # "gaussian" or "uniform"
    flip: bool = False  # test-time augmentation: a horizontally flipped view of every scale too
    scales: tuple[float, ...] = (1.0,)  # test-time augmentation: views at these multiples of the job's scale
    image_size: int | None = None  # the job's scale, for the record
    resize: str | None = None

    @property
    def views(self) -> list[tuple[float, bool]]:
        return [(scale, flipped) for scale in self.scales for flipped in ((False, True) if self.flip else (False,))]

    @property
    def stride(self) -> int:
        return max(1, round(self.window * (1.0 - self.overlap))) if self.window else 0

    def record(self) -> dict[str, Any]:
        """What meta.json and evaluate's metrics.json say about the figures."""
        inference: dict[str, Any] = {"mode": "sliding window" if self.window else "whole image"}
        if self.window:
            inference.update(window=self.window, overlap=self.overlap, blend=self.blend)
        return {
            "grid": self.grid,
            "scale": {"image_size": self.image_size, "resize": self.resize},
            "inference": inference,
            "tta": {"flip": self.flip, "scales": list(self.scales)},
        }

    def describe(self) -> str:
        """One phrase for log lines: 'original grid, sliding window 240, flip + scales 0.75/1/1.25'."""
        parts = [f"{self.grid} grid", f"sliding window {self.window}" if self.window else "whole image"]
        tta = (["flip"] if self.flip else []) + ([f"scales {'/'.join(f'{s:g}' for s in self.scales)}"]
                                                 if self.scales != (1.0,) else [])
        return ", ".join(parts + ([" + ".join(tta)] if tta else []))


def protocol_of(job: Any, grid: str | None = None, flip: bool = False,
                scales: tuple[float, ...] | None = None) -> Protocol:
    """The job's protocol (eval.grid, data.crop), with what a command's flags change."""
    crop = getattr(job.data, "crop", None)
    return Protocol(
        grid=grid or job.eval.grid,
        window=crop.size if crop else None,
        overlap=crop.overlap if crop else 0.5,
        blend=crop.blend if crop else "gaussian",
        flip=flip,
        scales=tuple(scales) if scales else (1.0,),
        image_size=job.data.image_size,
        resize=job.data.resize,
    )


def window_starts(extent: int, window: int, stride: int) -> list[int]:
    """First pixels of windows that cover 0..extent (extent >= window); the last one ends at the edge."""
    count = math.ceil((extent - window) / stride) + 1
    return sorted({min(i * stride, extent - window) for i in range(count)})


def blend_weights(window: int, blend: str, device: torch.device) -> torch.Tensor:
    """[window, window] weights of a window's logits: all 1, or a Gaussian around its centre."""
    if blend == "uniform":
        return torch.ones(window, window, device=device)
    centre = (window - 1) / 2
    coords = torch.arange(window, dtype=torch.float32, device=device) - centre
    profile = torch.exp(-(coords**2) / (2 * (GAUSSIAN_SIGMA * window) ** 2))
    return torch.outer(profile, profile).clamp(min=GAUSSIAN_FLOOR)


def pad_to(image: torch.Tensor, height: int, width: int, fill: torch.Tensor) -> torch.Tensor:
    """[C, h, w] to [C, height, width], filled with `fill` [C] below and to the right."""
    channels, rows, cols = image.shape
    if (rows, cols) == (height, width):
        return image
    padded = fill.to(image.device, image.dtype).view(-1, 1, 1).expand(channels, height, width).clone()
    padded[:, :rows, :cols] = image
    return padded


def rescale(image: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return image
    size = [max(1, round(image.shape[-2] * scale)), max(1, round(image.shape[-1] * scale))]
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=scale < 1)[0]


class Predictor:
    """Runs a model (in the mode the caller set) over images at the job's scale, per the protocol."""

    def __init__(self, model: torch.nn.Module, protocol: Protocol, fill: torch.Tensor, device: torch.device,
                 precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 window_batch: int = 8):
        self.model, self.protocol, self.device, self.precision = model, protocol, device, precision
        self.fill = fill.to(device)
        self.window_batch = window_batch  # windows per forward pass

    @torch.no_grad()
    def __call__(self, images: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """float32 logits [K, H, W] per image, at its size in `sizes`."""
        images = [image.to(self.device, non_blocking=True) for image in images]
        views = self.protocol.views
        totals: list[torch.Tensor | None] = [None] * len(images)
        for scale, flipped in views:
            inputs = [rescale(image, scale) for image in images]
            if flipped:
                inputs = [image.flip(-1) for image in inputs]
            for i, logits in enumerate(self.logits_at_scale(inputs)):
                logits = logits.flip(-1) if flipped else logits
                logits = upsample(logits, sizes[i])
                if len(views) == 1:
                    totals[i] = logits
                else:
                    probabilities = probabilities_of(logits)
                    totals[i] = probabilities if totals[i] is None else totals[i] + probabilities
        if len(views) == 1:
            return totals
        return [logits_from_probabilities(total / len(views)) for total in totals]

    def logits_at_scale(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """[K, h, w] per image [C, h, w]: the logits of its own pixels."""
        if self.protocol.window:
            return [self.sliding(image) for image in images]
        return self.whole(images)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        with self.precision():
            outputs = self.model(batch)
        logits = outputs["out"] if isinstance(outputs, dict) else outputs
        return logits.float()

    def whole(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each image padded to a square of its longer side (as training saw it); images that end up the
        same shape run in one forward pass."""
        groups: dict[int, list[int]] = {}  # square side -> the images padded to it
        for i, image in enumerate(images):
            groups.setdefault(max(image.shape[-2:]), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        for side, members in groups.items():
            batch = torch.stack([pad_to(images[i], side, side, self.fill) for i in members])
            for i, logits in zip(members, self.forward(batch)):
                out[i] = logits[:, :images[i].shape[-2], :images[i].shape[-1]]
        return out

    def sliding(self, image: torch.Tensor) -> torch.Tensor:
        """Blended logits of overlapping windows over one image, padded up to a window where smaller."""
        window, stride = self.protocol.window, self.protocol.stride
        rows, cols = image.shape[-2:]
        height, width = max(rows, window), max(cols, window)
        padded = pad_to(image, height, width, self.fill)
        places = [(top, left) for top in window_starts(height, window, stride)
                  for left in window_starts(width, window, stride)]
        weights = blend_weights(window, self.protocol.blend, self.device)
        total = weight_sum = None
        for begin in range(0, len(places), self.window_batch):
            chunk = places[begin:begin + self.window_batch]
            batch = torch.stack([padded[:, top:top + window, left:left + window] for top, left in chunk])
            for (top, left), logits in zip(chunk, self.forward(batch)):
                if total is None:
                    total = torch.zeros(logits.shape[0], height, width, device=self.device)
                    weight_sum = torch.zeros(height, width, device=self.device)
                total[:, top:top + window, left:left + window] += logits * weights
                weight_sum[top:top + window, left:left + window] += weights
        return (total / weight_sum)[:, :rows, :cols]


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[K, h, w] to [K, *size], bilinear (pixel centres aligned, as the images were resized)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


def probabilities_of(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, dim=0)


def logits_from_probabilities(probabilities: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax (sigmoid for one channel) gives these probabilities back."""
    probabilities = probabilities.clamp(PROBABILITY_FLOOR, 1.0 - PROBABILITY_FLOOR)
    if probabilities.shape[0] == 1:
        return torch.log(probabilities) - torch.log1p(-probabilities)
    return torch.log(probabilities)
