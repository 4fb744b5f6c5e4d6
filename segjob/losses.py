"""Losses, built by name from the job's `loss` section.

    loss_fn = build_loss(job.loss, num_classes).to(device)
    loss = loss_fn(logits, target)   # logits [N, C, H, W], target int64 [N, H, W] -> scalar

Pixels labelled IGNORE_INDEX (padding, void) count for nothing. A batch where every pixel
is ignored gives 0 with a zero gradient for every parameter rather than NaN: DDP ranks
must all run backward through the same graph, and a NaN would poison every rank.

Adding a loss is one `LossEntry` in `LOSSES`: its name (the `name` in config.py), the
config class it reads, and a builder taking (config, num_classes).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import LossConfig
from .constants import IGNORE_INDEX
from .errors import UserError


class CrossEntropy(nn.Module):
    """Pixel-wise cross-entropy, mean over the pixels that are not ignored (weighted like torch's)."""

    def __init__(
        self,
        num_classes: int,
        class_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        ignore_index: int = IGNORE_INDEX,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weight, persistent=False)  # follows .to(device); not in state dicts

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # a bf16/fp16 log-softmax summed over many pixels loses precision
        target = target.long()
        weight = None if self.class_weights is None else self.class_weights.to(logits.dtype)
        total = F.cross_entropy(
            logits,
            target,
            weight=weight,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )
        # torch's "mean" divides by the counted pixels (or their summed class weights) and
        # gives 0/0 = NaN when there are none; computing the same divisor ourselves lets an
        # all-ignored batch divide 0 by 1 instead, without a host sync.
        counted = target != self.ignore_index
        if self.class_weights is None:
            divisor = counted.sum()
        else:
            divisor = (weight[target.masked_fill(~counted, 0)] * counted).sum()
        return total / torch.where(divisor > 0, divisor, torch.ones_like(divisor))


def _build_cross_entropy(cfg: LossConfig, num_classes: int) -> nn.Module:
    weights = cfg.class_weights
    if weights is not None:
        if len(weights) != num_classes:
            raise UserError(
                f"loss.class_weights: {len(weights)} weights given but the dataset has {num_classes} classes; "
                f"give one weight per class"
            )
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise UserError(f"loss.class_weights: weights must be >= 0 and not all 0 (got {weights})")
    return CrossEntropy(num_classes, class_weights=weights, label_smoothing=cfg.label_smoothing)


@dataclass(frozen=True)
class LossEntry:
    name: str
    config_class: type
    build: Callable[[Any, int], nn.Module]


LOSSES: dict[str, LossEntry] = {
    entry.name: entry
    for entry in (
        LossEntry("ce", LossConfig, _build_cross_entropy),
    )
}


def build_loss(cfg: LossConfig, num_classes: int, train_set: Any = None) -> nn.Module:
    entry = LOSSES.get(cfg.name)
    if entry is None:
        hint = difflib.get_close_matches(str(cfg.name), LOSSES, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise UserError(f"loss.name: unknown loss '{cfg.name}'{suggestion}; valid: {', '.join(sorted(LOSSES))}")
    return entry.build(cfg, num_classes)


def output_channels(cfg: LossConfig, num_classes: int) -> int:
    """Channels the model must output for this loss: num_classes (softmax losses)."""
    return num_classes
