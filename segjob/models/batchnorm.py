"""Synchronised BatchNorm for DDP: batch statistics over every rank's images, not one GPU's few.

Segmentation trains on a few images per GPU, where per-rank BatchNorm statistics are noisy.
torch's SyncBatchNorm refuses CPU tensors, so CPU (gloo) runs keep plain BatchNorm. The
conversion keeps every parameter and buffer (the optimizer's references stay valid) and the
state dict's keys, so checkpoints hold plain BatchNorm state either way.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

log = logging.getLogger("segjob")


def sync_batchnorm(model: torch.nn.Module, setting: Literal["auto"] | bool, device: torch.device, world_size: int,
                   announce: bool = True) -> torch.nn.Module:
    """The model to wrap in DDP: BatchNorm layers converted when `setting` asks and the device allows."""
    has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if setting is False or world_size < 2 or not has_batchnorm:
        return model
    if device.type != "cuda":
        if announce:
            log.log(logging.WARNING if setting is True else logging.INFO,
                    "BatchNorm is not synchronised across the %d CPU workers (torch's SyncBatchNorm needs GPUs)",
                    world_size)
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
