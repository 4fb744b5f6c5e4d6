"""Predictions on fixed validation images as training goes (the SegNet article's picture of learning).

    previews = Previews.open(job, storage, run_path, val_set, device)   # rank 0, with train.preview_every_epochs
    previews.after_epoch(model, epochs_done, metrics, precision)        # in the loop, after validation
    previews.close()

Every `train.preview_every_epochs` epochs (and after the last), the first `train.preview_images`
validation images, loaded once so that every frame shows the same ones, are predicted with the
current weights at the model's input grid (the job's scale; sliding windows in crop mode) and drawn
as one grid into <run>/previews/epoch-NNN.png; a one-channel model's probability map (the leaf
recipe's lesion map) gets a row of its own. `segjob.report` turns those into an animated GIF.

Only the forward passes run in the loop's thread (a few images, in eval mode, no gradient); drawing
and uploading run in a daemon thread, one preview after another, so a slow store never holds a step
up. A preview that cannot be drawn or stored is a warning (once), never a failed run.
"""

from __future__ import annotations

import contextlib
import io
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from segjob.data.scoring import ScoringView
from segjob.data.transforms import padding_fill
from segjob.engine.evaluation import labels_of, on_input_grid
from segjob.engine.inference import Predictor, protocol_of
from segjob.job.schema import JobConfig
from segjob.learning.losses import binary_threshold
from segjob.learning.metrics import predict_labels
from segjob.results import figures
from segjob.store.storage import Storage

log = logging.getLogger("segjob")

FOLDER = "previews"
CLOSE_WAIT_S = 30.0  # at the end of training, how long the last previews may take to reach storage


def preview_name(epoch: int) -> str:
    """epoch-001.png ...: names sort in epoch order (up to 999 epochs, and past that by length)."""
    return f"epoch-{epoch:03d}.png"


def is_due(job: JobConfig, epochs_done: int) -> bool:
    every = job.train.preview_every_epochs
    return bool(every) and (epochs_done % every == 0 or epochs_done == job.train.epochs)


class Previews:
    def __init__(self, job: JobConfig, storage: Storage, run_path: str, val_set: Any, device: torch.device):
        self.job, self.storage, self.folder = job, storage, f"{run_path}/{FOLDER}"
        self.class_names, self.palette = list(val_set.class_names), list(val_set.palette)
        view = ScoringView(val_set, job.data, count=job.train.preview_images)
        self.samples = [view[index] for index in range(len(view))]  # (index, image, target), loaded once
        name = getattr(val_set, "sample_name", None)
        self.names = [name(index) if name else f"val-{index:05d}" for index, _, _ in self.samples]
        self.threshold = binary_threshold(job.loss)
        self.fill = padding_fill(job.data, val_set.in_channels)
        self.device = device
        self._warned = False
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._drain, name="segjob-previews", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, job: JobConfig, storage: Storage, run_path: str, val_set: Any,
             device: torch.device) -> Previews | None:
        return cls(job, storage, run_path, val_set, device) if job.train.preview_every_epochs else None

    def after_epoch(self, model: torch.nn.Module, epochs_done: int, metrics: dict[str, Any],
                    precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        if not is_due(self.job, epochs_done):
            return
        try:
            rows = self.predict(model, precision)
        except Exception as error:  # a picture is never worth a run
            self._warn(f"could not predict the preview of epoch {epochs_done}", error)
            return
        self._queue.put((epochs_done, self.title(epochs_done, metrics), rows))

    def predict(self, model: torch.nn.Module,
                precision: Callable[[], contextlib.AbstractContextManager]) -> list[figures.SampleRow]:
        """The samples' rows on the model's input grid, from the weights as they are now."""
        # the input grid: a picture at the job's scale, however large the label files are
        predictor = Predictor(model, protocol_of(self.job, grid="input"), self.fill, self.device, precision)
        images = [image for _, image, _ in self.samples]
        was_training = model.training
        model.eval()
        try:
            all_logits = predictor(images, [tuple(image.shape[-2:]) for image in images])
        finally:
            model.train(was_training)
        rows = []
        for name, (_, image, target), logits in zip(self.names, self.samples, all_logits):
            labels = labels_of(on_input_grid(target, tuple(image.shape[-2:]))[None])[0]
            probability = torch.sigmoid(logits[0]).cpu().numpy() if logits.shape[0] == 1 else None
            rows.append(figures.SampleRow(name, figures.display_image(image[:3]), labels.numpy(),
                                          predict_labels(logits[None], self.threshold)[0].cpu().numpy(), probability))
        return rows

    def title(self, epochs_done: int, metrics: dict[str, Any]) -> str:
        shown = [f"{key} {metrics[key]:.3f}" for key in ("val/miou", "val/loss") if isinstance(metrics.get(key), float)]
        return "  ".join([f"{self.job.name}: epoch {epochs_done}/{self.job.train.epochs}", *shown])

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            epochs_done, title, rows = item
            try:
                self.store(epochs_done, title, rows)
            except Exception as error:  # storage errors come in many types
                self._warn(f"could not store the preview of epoch {epochs_done} in {self.storage.display(self.folder)}",
                           error)

    def store(self, epochs_done: int, title: str, rows: list[figures.SampleRow]) -> None:
        figure = figures.sample_tiles(rows, self.class_names, self.palette, title)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=figures.DPI, facecolor="white")
        self.storage.write_bytes(f"{self.folder}/{preview_name(epochs_done)}", buffer.getvalue())

    def _warn(self, what: str, error: Exception) -> None:
        if not self._warned:
            log.warning("%s (%s: %s); training goes on", what, type(error).__name__, str(error)[:200])
            self._warned = True

    def close(self) -> None:
        """Let the previews queued so far reach storage, for at most CLOSE_WAIT_S."""
        self._queue.put(None)
        self._thread.join(CLOSE_WAIT_S)
        if self._thread.is_alive():
            log.warning("previews still uploading after %.0f s; the last ones may be missing from %s",
                        CLOSE_WAIT_S, self.storage.display(self.folder))
