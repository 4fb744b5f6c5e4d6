"""What a run tells people while it trains, beside its checkpoints: TensorBoard event files in the run's
storage, an optional MLflow run, and rank 0's progress lines inside long epochs.

    trackers = Trackers.open(job, storage, run_path, resumed_step)   # rank 0, after resume
    trackers.update(history)      # after each checkpoint: the history records not sent yet
    trackers.close(finished)

Both trackers read the run's history (segjob.store.checkpoint's history.jsonl records), so what they show
is what the checkpoints hold: per-step `train/step_loss`, and every metric, loss and lr reported at each
checkpoint. A tracker that fails says so once and never stops training.
"""

from __future__ import annotations

import logging
from typing import Any

from segjob.engine.tracking.mlflow_runs import MlflowTracker, check_mlflow
from segjob.engine.tracking.progress import ProgressLine
from segjob.engine.tracking.tensorboard import TensorBoardTracker
from segjob.job.schema import JobConfig
from segjob.store.storage import Storage

log = logging.getLogger("segjob")

__all__ = ["ProgressLine", "Trackers", "check_mlflow", "scalars"]

# history keys that place a record, not measure anything
_PLACE_KEYS = ("step", "epoch", "position")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers a history record measured (bools and strings, such as a checkpoint's reason, left out)."""
    return {key: float(value) for key, value in record.items()
            if key not in _PLACE_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)}


class Trackers:
    """Rank 0's trackers for one run; sends each history record once, from the step training resumed at."""

    def __init__(self, trackers: list, sent_through_step: int):
        self.trackers = trackers
        self.sent_through_step = sent_through_step

    @classmethod
    def open(cls, job: JobConfig, storage: Storage, run_path: str, resumed_step: int) -> Trackers:
        trackers: list = []
        if job.tracking.tensorboard:
            trackers.append(TensorBoardTracker(storage, run_path))
        if job.tracking.mlflow_uri:
            check_mlflow(job)
            try:
                trackers.append(MlflowTracker(job, storage, run_path))
            except Exception as error:  # an unreachable tracking server never stops training
                log.warning("MLflow at %s: %s: %s; training goes on without it", job.tracking.mlflow_uri,
                            type(error).__name__, str(error).splitlines()[0][:200])
        return cls(trackers, resumed_step)

    def update(self, history: list[dict[str, Any]]) -> None:
        # events (a resize) are facts for the history, not curves
        records = [r for r in history
                   if r.get("step", 0) > self.sent_through_step and "event" not in r and scalars(r)]
        if not records:
            return
        for tracker in self.trackers:
            tracker.send(records)
        self.sent_through_step = max(r["step"] for r in records)

    def close(self, finished: bool = False) -> None:
        for tracker in self.trackers:
            tracker.close(finished)
