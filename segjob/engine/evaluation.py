"""Scoring a model on a split: the one evaluation core the engine and `evaluate` share."""

from __future__ import annotations

import torch

from segjob.data.labels import IGNORE_INDEX


def labels_of(target: torch.Tensor) -> torch.Tensor:
    """Label maps from either target form (soft: the likeliest class; ignored where all zero)."""
    if not target.is_floating_point():
        return target.long()
    return target.argmax(dim=1).masked_fill(target.sum(dim=1) <= 0, IGNORE_INDEX)


def logits_of(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    outputs = model(images)
    return outputs["out"] if isinstance(outputs, dict) else outputs
