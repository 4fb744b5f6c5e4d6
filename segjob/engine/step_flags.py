"""A few flags every rank agrees on after each optimizer step, without making the step wait.

Each step every rank sends its flags (a preemption notice here, rank 0's upload finished, the
deadline checkpoint due by this rank's clock, the earliest deadline known here, the notice's
source) into one MAX all-reduce, and reads the agreed flags of the step before: the all-reduce
runs in the background meanwhile, on a CPU (gloo) group of its own, so a step never waits for it
and a GPU step never syncs the device for it. Every rank sends and reads at the same steps, so
all take the same decisions at the same step, one step after the flags were sent.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from segjob.engine.preemption.plan import Agreed

SOURCES = ("sigterm", "aws", "gcp")  # what a rank's own watcher can see, coded for the all-reduce


class StepFlags:
    def __init__(self, world_size: int):
        distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
        # a group of its own: its all-reduce runs beside the gradients' and never on a GPU stream
        self.group = dist.new_group(backend="gloo") if distributed else None
        self.pending: tuple[object, torch.Tensor] | None = None

    def exchange(self, notice: bool, upload_done: bool, due: bool, deadline: float | None,
                 source: str | None) -> Agreed | None:
        """Send this step's flags; return the agreed ones of the step before (None when there is none yet)."""
        code = SOURCES.index(source) + 1 if source in SOURCES else 0
        flags = torch.tensor([notice, upload_done, due, -deadline if deadline else -math.inf, code],
                             dtype=torch.float64)
        if self.group is None:  # one process: agreed at once
            return self._read(flags)
        previous = self.finish()
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self.pending = (work, flags)
        return previous

    def finish(self) -> Agreed | None:
        """Wait for the exchange in flight (every rank at the same point, e.g. an epoch's end) and read it."""
        if self.pending is None:
            return None
        work, flags = self.pending
        self.pending = None
        work.wait()
        return self._read(flags)

    @staticmethod
    def _read(flags: torch.Tensor) -> Agreed:
        notice, upload_done, due, negated, code = flags.tolist()
        deadline = -negated if math.isfinite(negated) else None
        source = SOURCES[int(code) - 1] if code else None
        return Agreed(bool(notice), bool(upload_done), bool(due), deadline, source)
