"""TensorBoard event files in the run's storage, written as training goes.

Object stores cannot append, so each update is a new, complete event file, uploaded whole into
<run>/tensorboard/ and named so that files sort in the order they were written (TensorBoard reads
every event file of a folder, in name order, and `tensorboard --logdir` on a sweep's folder shows
each trial as a run). A local folder gets the same files.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from typing import Any

from segjob.store.storage import Storage

log = logging.getLogger("segjob")

FOLDER = "tensorboard"


class TensorBoardTracker:
    def __init__(self, storage: Storage, run_path: str):
        # imported here: a run with tracking.tensorboard off needs no tensorboard package
        from torch.utils.tensorboard import SummaryWriter

        self._writer_class = SummaryWriter
        self.storage = storage
        self.folder = f"{run_path}/{FOLDER}"
        self._local = tempfile.TemporaryDirectory(prefix="segjob-tensorboard-")
        self._written = 0
        self._warned = False

    def send(self, records: list[dict[str, Any]]) -> None:
        from segjob.engine.tracking import scalars

        self._written += 1
        local_dir = os.path.join(self._local.name, str(self._written))
        writer = self._writer_class(log_dir=local_dir)
        for record in records:
            for tag, value in scalars(record).items():
                writer.add_scalar(tag, value, global_step=record["step"])
        writer.close()
        (event_file,) = os.listdir(local_dir)
        try:
            self.storage.put_file(os.path.join(local_dir, event_file), f"{self.folder}/{self.file_name()}")
        except Exception as error:  # storage errors come in many types; curves are never worth a run
            if not self._warned:
                log.warning("could not upload TensorBoard events to %s (%s: %s); training goes on",
                            self.storage.display(self.folder), type(error).__name__, error)
                self._warned = True
        finally:
            os.remove(os.path.join(local_dir, event_file))

    def file_name(self) -> str:
        # TensorBoard reads files whose names hold "tfevents"; time first, then a zero-padded counter: name order
        # is write order, within a second too
        host = socket.gethostname().replace("/", "_")
        return f"events.out.tfevents.{time.time():013.2f}.{host}.{os.getpid()}.{self._written:06d}.segjob"

    def close(self, finished: bool = False) -> None:
        self._local.cleanup()
