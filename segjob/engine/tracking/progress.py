"""Rank 0's progress line inside a long epoch, at most every `tracking.progress_every_s` seconds.

    12:04:31 segjob: epoch 3/12  step 240/1250 of the epoch  train/step_loss 0.4121  37.5 img/s  epoch ends in 7m 10s

On a full dataset minutes pass between two epoch lines; this says the run is alive, how fast it goes and
when the epoch ends. Images per second count the global batch (every rank's samples) since the last line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("segjob")


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


class ProgressLine:
    def __init__(self, every_s: float, epoch: int, epochs: int, steps_per_epoch: int, global_batch: int,
                 first_step: int, clock: Callable[[], float] = time.monotonic):
        """`first_step`: steps of this epoch already done (a resumed epoch); `epoch` counts from 0."""
        self.every_s, self.epoch, self.epochs = every_s, epoch, epochs
        self.steps_per_epoch, self.global_batch = steps_per_epoch, global_batch
        self.clock = clock
        self.started = self.last_time = clock()
        self.first_step = self.last_step = first_step

    def after_step(self, step_in_epoch: int, loss: Callable[[], float]) -> str | None:
        """The line, logged, when one is due; `loss` is asked only then (it may wait for the device)."""
        now = self.clock()
        if not self.every_s or now - self.last_time < self.every_s or step_in_epoch >= self.steps_per_epoch:
            return None  # the epoch's own line follows its last step
        images_per_s = (step_in_epoch - self.last_step) * self.global_batch / max(now - self.last_time, 1e-9)
        seconds_per_step = (now - self.started) / max(step_in_epoch - self.first_step, 1)
        left = (self.steps_per_epoch - step_in_epoch) * seconds_per_step
        line = (f"epoch {self.epoch + 1}/{self.epochs}  step {step_in_epoch}/{self.steps_per_epoch} of the epoch  "
                f"train/step_loss {loss():.4f}  {images_per_s:.1f} img/s  epoch ends in {duration(left)}")
        self.last_time, self.last_step = now, step_in_epoch
        log.info(line)
        return line
