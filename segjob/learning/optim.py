"""Optimizers and learning-rate schedules from the job, each knowing when it moves.

    optimizer = build_optimizer(job.optim, model.parameters())
    schedule = Schedule(job.optim.schedule, optimizer, total_steps=steps_per_epoch * epochs)
    ...  schedule.after_step()          # every optimizer step
    ...  schedule.after_eval(metrics)   # after each evaluation (plateau)
    ...  schedule.after_epoch()         # at each epoch end (step)
    state = schedule.state_dict()       # plain ints and floats; load_state_dict() resumes exactly

Poly and cosine move every optimizer step (the PSPNet recipe's poly is per iteration),
step moves every epoch (the SegNet recipe's StepLR 7/0.7), plateau after each evaluation
on a chosen validation metric (the NYUv2 recipe's ReduceLROnPlateau). A linear warmup
over the first `warmup_steps` optimizer steps multiplies any of them; poly and cosine then
run over the steps after the warmup.

The lr is computed from counters (steps, epochs, plateau reductions) rather than by
multiplying the previous lr, so resuming restores it exactly, and each param group's lr
is its initial lr times one factor. Adding a schedule is one function from those counters
to the lr and one `ScheduleEntry` in `SCHEDULES` (its name is its config class's `name` tag).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from segjob.errors import UserError
from segjob.job.registry import Entry, Registry
from segjob.job.schema import (
    ConstantSchedule,
    CosineSchedule,
    OptimConfig,
    PlateauSchedule,
    PolySchedule,
    StepSchedule,
)

# ReduceLROnPlateau's default: an improvement must beat the best by this relative margin.
PLATEAU_THRESHOLD = 1e-4


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


# --- the schedules: each one's lr from the counters, before the warmup ----------------------


def _progress(schedule: Schedule) -> float:
    """0 to 1 over the steps after the warmup (poly, cosine)."""
    warmup = schedule.cfg.warmup_steps
    span = max(1, schedule.total_steps - warmup)
    return min(max(schedule.steps - warmup, 0), span) / span


def _constant(cfg: ConstantSchedule, schedule: Schedule, base_lr: float) -> float:
    return base_lr


def _poly(cfg: PolySchedule, schedule: Schedule, base_lr: float) -> float:
    return base_lr * (1.0 - _progress(schedule)) ** cfg.power


def _step(cfg: StepSchedule, schedule: Schedule, base_lr: float) -> float:
    return base_lr * cfg.gamma ** (schedule.epochs // cfg.step_epochs)


def _cosine(cfg: CosineSchedule, schedule: Schedule, base_lr: float) -> float:
    return cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * _progress(schedule)))


def _plateau(cfg: PlateauSchedule, schedule: Schedule, base_lr: float) -> float:
    return max(base_lr * cfg.plateau_factor ** schedule.reductions, min(cfg.min_lr, base_lr))


@dataclass(frozen=True)
class ScheduleEntry(Entry):
    lr: Callable[[Any, Schedule, float], float]  # (config, the schedule's counters, base lr) -> lr before warmup


SCHEDULES: Registry[ScheduleEntry] = Registry(
    "schedule",
    (
        ScheduleEntry("constant", ConstantSchedule, _constant),
        ScheduleEntry("poly", PolySchedule, _poly),
        ScheduleEntry("step", StepSchedule, _step),
        ScheduleEntry("cosine", CosineSchedule, _cosine),
        ScheduleEntry("plateau", PlateauSchedule, _plateau),
    ),
    where="optim.schedule.name",
)


class Schedule:
    """Sets each param group's lr to initial lr x warmup factor x the schedule's factor."""

    def __init__(self, cfg: Any, optimizer: torch.optim.Optimizer, total_steps: int):
        self.entry = SCHEDULES.lookup(cfg.name)
        self.cfg = cfg
        self.optimizer = optimizer
        self.total_steps = max(1, total_steps)
        # The lr each group started from: optimizer.load_state_dict() later restores the
        # *current* lr into the groups, so keep the base apart from them.
        self.base_lrs = [float(group.setdefault("initial_lr", group["lr"])) for group in optimizer.param_groups]
        self.steps = 0  # optimizer steps taken
        self.epochs = 0  # epochs finished
        self.reductions = 0  # plateau: times the lr was lowered
        self.best: float | None = None  # plateau: the best value seen
        self.bad_evals = 0  # plateau: evaluations since the best
        self._apply()

    # --- events -------------------------------------------------------------------------

    def after_step(self) -> None:
        self.steps += 1
        self._apply()

    def after_epoch(self) -> None:
        self.epochs += 1
        self._apply()

    def after_eval(self, metrics: dict[str, float]) -> None:
        if self.cfg.name != "plateau":
            return
        name = self.cfg.plateau_metric
        if name not in metrics:
            raise UserError(
                f"optim.schedule.plateau_metric: '{name}' is not reported; "
                f"choose one of {', '.join(sorted(k for k in metrics if k.startswith('val/')))}"
            )
        value = float(metrics[name])
        if self._improves(value):
            self.best, self.bad_evals = value, 0
        else:  # nan (a class absent so far) never counts as an improvement
            self.bad_evals += 1
        if self.bad_evals > self.cfg.plateau_patience:
            self.reductions += 1
            self.bad_evals = 0
        self._apply()

    def _improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        margin = abs(self.best) * PLATEAU_THRESHOLD
        return value < self.best - margin if self.cfg.plateau_mode == "min" else value > self.best + margin

    # --- the lr -------------------------------------------------------------------------

    def warmup_factor(self) -> float:
        warmup = self.cfg.warmup_steps
        if self.steps >= warmup:
            return 1.0
        start = self.cfg.warmup_start_factor
        return start + (1.0 - start) * self.steps / warmup

    def lr_for(self, base_lr: float) -> float:
        return self.entry.lr(self.cfg, self, base_lr) * self.warmup_factor()

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = self.lr_for(base)

    # --- resume -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.cfg.name,
            "steps": self.steps,
            "epochs": self.epochs,
            "reductions": self.reductions,
            "best": self.best,
            "bad_evals": self.bad_evals,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [key for key in self.state_dict() if key != "name" and key not in state]
        if missing:
            raise UserError(f"optim.schedule: the checkpoint's schedule state has no {', '.join(missing)}; it was not "
                            f"written by this segjob: start the run again with --restart")
        if state.get("name", self.cfg.name) != self.cfg.name:
            raise UserError(
                f"optim.schedule.name: the checkpoint was trained with '{state['name']}', not '{self.cfg.name}'"
            )
        self.steps = int(state["steps"])
        self.epochs = int(state["epochs"])
        self.reductions = int(state["reductions"])
        self.best = None if state["best"] is None else float(state["best"])
        self.bad_evals = int(state["bad_evals"])
        self._apply()


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
