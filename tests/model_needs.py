"""The check behind every model's stated minimum input size: it trains there, and one pixel less fails."""

from __future__ import annotations

import pytest
import torch

from segjob.job.schema import JobConfig
from segjob.models import MODELS, create_model

ONE_VALUE = "Expected more than 1 value per channel"  # BatchNorm over a single value


def assert_smallest_inputs(section: dict, smallest: int, smallest_alone: int | None,
                           below: str | None = None) -> None:
    """`smallest`: a batch of 2; `smallest_alone`: one sample (None: never, e.g. a 1x1 pooling bin's BatchNorm).
    `below`: what the error one pixel below says (None: any ValueError)."""
    cfg = JobConfig.model_validate({"name": "x", "model": section}).model
    needs = MODELS[cfg.name].needs(cfg)
    assert (needs.smallest, needs.smallest_alone) == (smallest, smallest_alone)
    model = create_model(cfg, 3, 2).train()
    for batch, size in ((2, smallest), (1, smallest_alone)):
        if size is None:
            with pytest.raises(ValueError, match=ONE_VALUE):
                model(torch.zeros(1, 3, 64, 64))
            continue
        out = model(torch.zeros(batch, 3, size, size))
        assert (out["out"] if isinstance(out, dict) else out).shape == (batch, 2, size, size)
        if size > 1:
            with pytest.raises(ValueError, match=below):
                model(torch.zeros(batch, 3, size - 1, size - 1))
