"""Scoring a model on a split: the one evaluation core the engine and `evaluate` share.

    scorer = Scorer(model, loss_fn, threshold, device)
    for images, targets in loader:
        labels, predicted = scorer.score(images, targets)   # keep what you need: a matrix, per-image scores
    scorer.all_reduce()                                      # once, after the last batch (DDP)
    metrics = summary(matrix, class_names, "val", scorer.loss)

The loss is the job's own (the one training minimises), weighted by the labelled pixels
each batch averaged over, so it does not depend on how the split was cut into batches or ranks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from segjob.data.labels import IGNORE_INDEX
from segjob.learning.metrics import ConfusionMatrix, predict_labels


def labels_of(target: torch.Tensor) -> torch.Tensor:
    """Label maps from either target form (soft: the likeliest class; ignored where all zero)."""
    if not target.is_floating_point():
        return target.long()
    return target.argmax(dim=1).masked_fill(target.sum(dim=1) <= 0, IGNORE_INDEX)


def logits_of(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    outputs = model(images)
    return outputs["out"] if isinstance(outputs, dict) else outputs


class Scorer:
    """Runs a model over evaluation batches, summing the weighted loss and counting samples; each
    batch's label maps and predictions go back to the caller, who keeps the scores it needs."""

    def __init__(self, model: torch.nn.Module, loss_fn: torch.nn.Module, threshold: float, device: torch.device,
                 precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.model, self.loss_fn, self.threshold, self.device = model, loss_fn, threshold, device
        self.precision = precision  # autocast, when training runs in bf16/fp16
        # loss x labelled pixels, labelled pixels, samples: float64, so sums over a large split stay exact
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)

    @torch.no_grad()
    def score(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(label maps, predicted label maps) of one batch, on the device."""
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        with self.precision():
            logits = logits_of(self.model, images)
        labels = labels_of(targets)
        labelled = (labels != IGNORE_INDEX).sum()
        self.totals[0] += self.loss_fn(logits, targets).double() * labelled
        self.totals[1] += labelled
        self.totals[2] += images.shape[0]
        return labels, predict_labels(logits, self.threshold)

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
