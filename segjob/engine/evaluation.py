"""Scoring a model on a split: the one evaluation core the engine and `evaluate` share.

    scorer = Scorer(model, loss_fn, threshold, device, protocol=protocol_of(job), fill=padding_fill(job.data, 3))
    for indices, images, targets in loader:                  # a ScoringView's batches (segjob.data.scoring)
        for labels, predicted in scorer.score(images, targets):   # per image: keep what you need
            matrix.update(labels, predicted)
    scorer.all_reduce()                                      # once, after the last batch (DDP)
    metrics = summary(matrix, class_names, "val", scorer.loss)

Images come at the job's scale, targets on their label file's own grid. The protocol says which
grid pixels are counted on: "original" upsamples the logits (bilinear) to each label's size, so
every labelled pixel of the dataset counts once, as published figures are counted; "input"
resizes the labels (nearest) to the model's input instead. The loss is the job's own (the one
training minimises) on that grid, weighted by the labelled pixels of each image, so it does not
depend on how the split was cut into batches or ranks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchvision import tv_tensors

from segjob.data.labels import IGNORE_INDEX
from segjob.data.transforms import resize
from segjob.engine.inference import Predictor, Protocol
from segjob.learning.metrics import ConfusionMatrix, predict_labels


def labels_of(target: torch.Tensor) -> torch.Tensor:
    """Label maps from either target form (soft: the likeliest class; ignored where all zero)."""
    if not target.is_floating_point():
        return target.long()
    return target.argmax(dim=1).masked_fill(target.sum(dim=1) <= 0, IGNORE_INDEX)


def logits_of(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    outputs = model(images)
    return outputs["out"] if isinstance(outputs, dict) else outputs


def on_input_grid(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A target ([H, W] labels or [K, H, W] probabilities) resized (nearest) to the model's input grid,
    as the evaluation transform resizes masks."""
    return resize(tv_tensors.Mask(target), list(size)).as_subclass(torch.Tensor)


class Scorer:
    """Runs a model over evaluation batches, summing the weighted loss (without a loss_fn: none) and
    counting samples; each image's label map and prediction go back to the caller, who keeps the
    scores it needs."""

    def __init__(self, model: torch.nn.Module, loss_fn: torch.nn.Module | None, threshold: float, device: torch.device,
                 precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 protocol: Protocol | None = None, fill: torch.Tensor | None = None):
        self.model, self.loss_fn, self.threshold, self.device = model, loss_fn, threshold, device
        self.protocol = protocol or Protocol()
        # padding: the normalised black pixel of the job's data (segjob.data.transforms.padding_fill)
        self.predictor = Predictor(model, self.protocol, torch.zeros(1) if fill is None else fill, device, precision)
        # loss x labelled pixels, labelled pixels, samples: float64, so sums over a large split stay exact
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)
        # the last batch's loss per image (nan without a labelled pixel), on the device: no host sync per batch
        self.image_losses: torch.Tensor | None = None

    @torch.no_grad()
    def score(self, images: list[torch.Tensor], targets: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(label map [1, H, W], predicted label map [1, H, W]) per image, on the protocol's grid, on the device.
        images: [C, h, w] at the job's scale; targets: on the label's own grid."""
        targets = [target.to(self.device, non_blocking=True) for target in targets]
        if self.protocol.grid == "input":
            targets = [on_input_grid(target, image.shape[-2:]) for image, target in zip(images, targets)]
        all_logits = self.predictor(images, [tuple(target.shape[-2:]) for target in targets])
        scored, losses = [], []
        for logits, target in zip(all_logits, targets):
            logits, target = logits[None], target[None]
            labels = labels_of(target)
            if self.loss_fn is not None:
                labelled = (labels != IGNORE_INDEX).sum()
                loss = self.loss_fn(logits, target).double()  # this image's mean over its labelled pixels
                # an image without a labelled pixel adds nothing (its mean loss is 0/0)
                self.totals[0] += torch.where(labelled > 0, loss * labelled, 0.0)
                self.totals[1] += labelled
                losses.append(torch.where(labelled > 0, loss, math.nan))
            scored.append((labels, predict_labels(logits, self.threshold)))
        self.totals[2] += len(images)
        self.image_losses = torch.stack(losses) if losses else None
        return scored

    def all_reduce(self) -> None:
        """Sum over every rank (in place); a no-op without torch.distributed. Call it once."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.totals)

    @property
    def samples(self) -> int:
        return int(self.totals[2])

    @property
    def loss(self) -> float:
        """The mean loss per labelled pixel."""
        return float(self.totals[0] / self.totals[1].clamp(min=1))


def summary(matrix: ConfusionMatrix, class_names: list[str], prefix: str, loss: float,
            assd: np.ndarray | None = None) -> dict[str, float]:
    """Flat names as training reports them (val/miou, val/loss, ...); with per-image ASSD [images,
    classes], its mean per class over the images and the mean of those."""
    result = matrix.summary(class_names, prefix=prefix)
    result[f"{prefix}/loss"] = loss
    if assd is not None:
        per_class = [nanmean(assd[:, column]) for column in range(assd.shape[1])]
        result[f"{prefix}/assd"] = nanmean(per_class)
        for name, value in zip(class_names, per_class):
            result[f"{prefix}/assd/{name}"] = value
    return result


def nanmean(values: Any) -> float:
    """The mean of the defined values; nan when there are none (without numpy's warning)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan
