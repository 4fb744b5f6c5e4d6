"""Optimizers and learning-rate schedules from the job, each knowing when it steps.

Poly and cosine move every optimizer step (the PSPNet recipe's poly is per iteration),
step moves every epoch (the SegNet recipe's StepLR 7/0.7), plateau moves after each
evaluation on a chosen validation metric (the NYUv2 recipe's ReduceLROnPlateau).
All of them are resumable through state_dict().
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .config import OptimConfig, ScheduleConfig
from .errors import UserError


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    raise UserError(f"optim.name: unknown optimizer '{cfg.name}'; valid: adam, adamw, sgd")


class Schedule:
    """A torch LR scheduler plus the moment it steps: after a step, an epoch or an evaluation."""

    def __init__(self, cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, total_steps: int):
        self.cfg = cfg
        total_steps = max(1, total_steps)
        if cfg.name == "constant":
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        elif cfg.name == "poly":
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: (1.0 - min(step, total_steps) / total_steps) ** cfg.power
            )
        elif cfg.name == "cosine":
            base = [group["lr"] for group in optimizer.param_groups]
            ratio = [cfg.min_lr / lr for lr in base]
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                [
                    (lambda step, r=r: r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
                    for r in ratio
                ],
            )
        elif cfg.name == "step":
            self.scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_epochs, gamma=cfg.gamma)
        elif cfg.name == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=cfg.plateau_mode, factor=cfg.plateau_factor, patience=cfg.plateau_patience
            )
        else:
            raise UserError(f"optim.schedule.name: unknown schedule '{cfg.name}'")

    def after_step(self) -> None:
        if self.cfg.name in ("constant", "poly", "cosine"):
            self.scheduler.step()

    def after_epoch(self) -> None:
        if self.cfg.name == "step":
            self.scheduler.step()

    def after_eval(self, metrics: dict[str, float]) -> None:
        if self.cfg.name != "plateau":
            return
        if self.cfg.plateau_metric not in metrics:
            raise UserError(
                f"optim.schedule.plateau_metric: '{self.cfg.plateau_metric}' is not reported; "
                f"choose one of {', '.join(sorted(k for k in metrics if k.startswith('val/')))}"
            )
        self.scheduler.step(metrics[self.cfg.plateau_metric])

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
