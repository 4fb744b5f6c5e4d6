"""An exponential moving average of a model's weights (EMA), BatchNorm's running statistics included.

    average = WeightAverage(model, job.train.ema)   # a copy of the model, in eval mode
    average.after_step(model, step)                  # after every optimizer step: updates every update_every_steps
    average.model                                    # evaluated like the model; its state dict has the same keys
    average.model.state_dict(), average.updates      # what a checkpoint keeps (ema.safetensors, state.pt)

The average is what torch.optim.swa_utils.AveragedModel(model, use_buffers=True,
multi_avg_fn=get_ema_multi_avg_fn(decay)) computes (the first update copies the weights, each later one
moves the average (1 - decay) of the way to them; tests/test_ema.py checks it against that), with two
differences: the decay ramps up over the first updates (EmaConfig.warmup_steps), and integer buffers
(BatchNorm's num_batches_tracked, a count) are copied rather than averaged and truncated. One fused
`_foreach_lerp_` over every floating tensor per update, on the model's device.

Under DDP every rank holds the same parameters after a step, so every rank's average of them is the same
without any collective. BatchNorm's running statistics are not: DDP hands rank 0's to every rank at the
start of each forward, and each rank's own batch then moves them. `broadcast_buffers` gives every rank
rank 0's averaged buffers before an evaluation, so the weights every rank scores are the ones rank 0
checkpoints.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from segjob.job.schema import EmaConfig


class WeightAverage:
    def __init__(self, model: nn.Module, config: EmaConfig):
        self.config = config
        self.model = copy.deepcopy(model).eval().requires_grad_(False)  # a deep copy drops torch.compile's wrapper
        self.updates = 0  # updates so far: the warm-up's n, and whether the next one copies
        self._source: nn.Module | None = None
        self._pairs: tuple[list[torch.Tensor], ...] = ()

    def decay(self) -> float:
        """The decay of the next update: 0 for the first (a copy), then ramping up to config.decay."""
        if self.updates == 0:
            return 0.0
        warmup, n = self.config.warmup_steps, self.updates
        return self.config.decay if warmup <= 1 else min(self.config.decay, (1 + n) / (warmup + n))

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimizer step with the step count: updates on every update_every_steps-th."""
        if step % self.config.update_every_steps == 0:
            self.update(model)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model` (unwrapped: no DDP `module.` prefix)."""
        averaged, source, averaged_counts, source_counts = self._tensors(model)
        weight = 1.0 - self.decay()
        if averaged:
            torch._foreach_lerp_(averaged, source, weight)
        for mine, theirs in zip(averaged_counts, source_counts):
            mine.copy_(theirs)
        self.updates += 1

    def _tensors(self, model: nn.Module) -> tuple[list[torch.Tensor], ...]:
        """(averaged floats, model floats, averaged others, model others), paired by state-dict key. Built once
        per source model: the optimizer and load_state_dict change its tensors in place."""
        if self._source is not model:
            mine, theirs = self.model.state_dict(), model.state_dict()
            if mine.keys() != theirs.keys():
                raise ValueError("the model's state dict has other keys than the average's")
            floats = [key for key, tensor in mine.items() if tensor.is_floating_point()]
            others = [key for key, tensor in mine.items() if not tensor.is_floating_point()]
            self._pairs = ([mine[k] for k in floats], [theirs[k] for k in floats],
                           [mine[k] for k in others], [theirs[k] for k in others])
            self._source = model
        return self._pairs

    def load(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.model.load_state_dict(state)
        self.updates = updates

    def restart_from(self, model: nn.Module) -> None:
        """Start the average over at `model`'s weights (EMA turned on for a run whose checkpoint has none)."""
        self.model.load_state_dict(model.state_dict())
        self.updates = 0

    def broadcast_buffers(self) -> None:
        """Every rank takes rank 0's averaged buffers (BatchNorm statistics); a no-op in one process. Every
        rank calls it at the same point, from the training thread."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        for buffer in self.model.buffers():
            dist.broadcast(buffer, src=0)
