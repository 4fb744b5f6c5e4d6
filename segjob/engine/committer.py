"""Checkpoints leave the training loop at once and are committed in the background.

Rank 0 copies the training state in memory (the only part training waits for) and hands
it to one background thread, which writes the folder, hashes it and uploads it. One upload is in
flight at a time: a new checkpoint first waits for the previous one. A checkpoint is
reported (to Ray, and so to Tune) only once it is committed, so Ray never points at a
folder that isn't there; every rank makes that report together (the engine agrees on
"rank 0's upload is done" with its per-step all-reduce). An upload that fails after its
retries is warned about, reported without a checkpoint, and training goes on. Retention (which
reads back the checkpoints it keeps to verify them) runs on a thread of its own after a commit, so
neither the report nor the next upload waits for it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from segjob.engine.inference import protocol_of
from segjob.engine.session import Session
from segjob.job.schema import JobConfig
from segjob.store import checkpoint
from segjob.store.lease import Fence, Superseded
from segjob.store.storage import Storage

log = logging.getLogger("segjob")


@dataclasses.dataclass
class Pending:
    metrics: dict[str, Any]
    step: int
    upload: Future | None  # rank 0 only: resolves to the committed path, or None if it failed


class Committer:
    def __init__(self, job: JobConfig, session: Session, storage: Storage, run_path: str, fence: Fence | None = None):
        self.job, self.session, self.storage, self.run_path = job, session, storage, run_path
        self.fence = fence  # the driver lease's: commits carry its generation, and stop once a newer one holds it
        self.is_chief = session.rank == 0
        self.executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="segjob-commit", initializer=_lower_priority)
            if self.is_chief else None
        )
        self.retention = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="segjob-retention", initializer=_lower_priority)
            if self.is_chief else None
        )
        self.retention_queued: Future | None = None
        self.pending: Pending | None = None
        self.last_committed: str | None = None  # rank 0: path of the newest checkpoint known committed
        self.verified: set[str] = set()  # rank 0: checkpoints retention has verified, so each is read back once

    def save(self, metrics: dict[str, Any], step: int, epoch: int, reason: str,
             snapshot: Callable[[], tuple[dict, dict, list, dict | None]]) -> None:
        """Every rank calls this at the same step. Rank 0 takes `snapshot()` (model state, train
        state, history, EMA state or None: copies, so training may go on) and writes, hashes and uploads it
        in the background."""
        self.flush()
        upload = None
        if self.is_chief:
            state = snapshot()
            upload = self.executor.submit(self._write_and_commit, state, metrics, step, epoch, reason)
        self.pending = Pending(metrics, step, upload)

    def upload_finished_here(self) -> bool:
        """Rank 0: the pending upload is over (either way). Other ranks: False."""
        return bool(self.pending and self.pending.upload and self.pending.upload.done())

    def flush(self) -> str | None:
        """Wait for the pending upload (rank 0) and report it (every rank). Returns the committed path."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        path = pending.upload.result() if pending.upload else None
        if self.is_chief:
            self.last_committed = path
        self.session.report(pending.metrics, path)
        return path

    def close(self) -> None:
        if self.executor:
            self.executor.shutdown(wait=True)
        if self.retention:
            self.retention.shutdown(wait=True)

    def _write_and_commit(self, state: tuple[dict, dict, list, dict | None], metrics: dict[str, Any], step: int,
                          epoch: int, reason: str) -> str | None:
        folder = Path(tempfile.mkdtemp(prefix="segjob-checkpoint-"))
        try:
            if self.fence:
                self.fence.check(self.storage)
            checkpoint.write_local(folder, *state)
            meta = checkpoint.build_meta(folder, job=self.job.model_dump(mode="json"), step=step, epoch=epoch,
                                         metrics=metrics, reason=reason,
                                         generation=self.fence.generation if self.fence else 0)
            meta["scoring"] = protocol_of(self.job).record()  # how the val/ metrics were counted
            info = checkpoint.commit(self.storage, self.run_path, folder, meta)
        except Superseded:
            raise  # a newer driver runs this run: this rank stops at its next flush
        except Exception as error:  # storage errors come in many types; none may stop training
            log.warning("checkpoint at step %d NOT committed (%s: %s); training goes on, "
                        "the next checkpoint tries again", step, type(error).__name__, error)
            return None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        queued = self.retention_queued
        if queued is None or queued.running() or queued.done():  # one still waiting to start lists this commit too
            self.retention_queued = self.retention.submit(self._apply_retention, step)
        return info.path

    def _apply_retention(self, step: int) -> None:
        # alongside later uploads: a commit it does not list yet only makes it keep more than it must
        try:
            removed = checkpoint.apply_retention(self.storage, self.run_path, self.job.storage.keep_best,
                                                 self.job.ranked_metric, self.job.metric.mode, self.verified,
                                                 self.fence)
            if removed:
                log.debug("retention removed %s", ", ".join(removed))
        except Exception as error:
            log.warning("retention after step %d failed (%s); old checkpoints stay for now", step, error)


def _lower_priority() -> None:
    """Let training threads win the CPU over hashing and uploading (Linux sets nice per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # other platforms, or not permitted: run at normal priority
        pass
