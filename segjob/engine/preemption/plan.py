"""What the training loop does about a preemption notice, decided the same way on every rank.

    a notice (any rank's watcher, or Ray's drain info)  -> checkpoint at once, keep training
    the deadline comes near                             -> one more checkpoint, keep training
    the deadline passes                                 -> Ray restarts the group (smaller, when
                                                           elastic) and it resumes from that checkpoint

The loop never raises or returns because of a notice: a rank that raises while Ray is
waiting out a preemption is charged to `failure.max_failures`, and a run whose ranks all
return ends as finished. The last checkpoint starts at deadline - (measured commit time +
two steps + `preemption.deadline_margin_s`), so the steps trained after the notice are kept.

Every decision reads only `Agreed` values (an all-reduce of every rank's flags, or Ray's
`get_preemption_info()`, which Ray broadcasts), so all ranks checkpoint at the same steps.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from segjob.engine.preemption.notice import Notice

log = logging.getLogger("segjob")


@dataclasses.dataclass(frozen=True)
class Agreed:
    """One step's view, identical on every rank."""

    notice: bool  # some rank has a notice
    upload_done: bool  # rank 0's background upload has finished
    deadline_due: bool  # some rank says the last checkpoint before the deadline must start now
    deadline: float | None  # the earliest deadline any rank knows (Unix time)
    source: str | None = None  # where some rank's own notice came from (sigterm, aws, gcp), for the others' logs


class PreemptionPlan:
    def __init__(self, margin_s: float):
        self.margin_s = margin_s
        self.ray_notice: Notice | None = None  # Ray's drain info, as last asked (same on every rank)
        self.active = False  # a notice was acted on in this worker group
        self.deadline: float | None = None
        self.final_done = False
        self.expired = False  # the deadline passed and no restart came: back to the usual checkpoints
        self.commit_seconds = 0.0  # the slowest preemption checkpoint so far, notice to committed
        self.step_seconds = 0.0  # the slowest recent optimizer step on this rank
        self.source_elsewhere: str | None = None  # a notice's source on some rank (for the log of the others)

    def observe_step(self, seconds: float) -> None:
        # the slowest of the recent steps, decaying: one slow step (a checkpoint copy) must not stick forever
        self.step_seconds = max(seconds, 0.9 * self.step_seconds)

    def local_view(self, watcher_notice: Notice | None) -> tuple[bool, bool, float | None]:
        """(a notice here, the deadline checkpoint is due by this rank's clock, the earliest deadline known here)."""
        notices = [n for n in (watcher_notice, self.ray_notice) if n is not None]
        deadlines = [n.deadline for n in notices if n.deadline]
        deadline = min(deadlines, default=None)
        # two steps: the one that sends this flag, and the one after, when every rank has read it
        due = (self.active and not self.final_done and self.deadline is not None
               and time.time() >= self.deadline - (self.commit_seconds + 2 * self.step_seconds + self.margin_s))
        return bool(notices), due, deadline

    def decide(self, agreed: Agreed) -> str | None:
        """'now', 'deadline' or None: which preemption checkpoint this step takes."""
        if not agreed.notice:
            if self.active:
                # only a notice that drained nothing can go away (a drain is never undone)
                log.warning("preemption notice withdrawn; training goes on")
                self.active, self.deadline, self.final_done, self.expired = False, None, False, False
            return None
        if agreed.deadline is not None:
            self.deadline = agreed.deadline if self.deadline is None else min(self.deadline, agreed.deadline)
        if not self.active:
            self.active = True
            return "now"
        if agreed.deadline_due and not self.final_done:
            self.final_done = True
            return "deadline"
        return None

    def under_way(self) -> bool:
        """A preemption is coming: the deadline checkpoint is the one that matters, no other upload is queued."""
        return self.active and not self.expired

    def seconds_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()
