"""train.preview_every_epochs: prediction grids on fixed validation images in the run's storage, written by
the engine (one plain process, no Ray) at the due epochs, and `segjob.report`'s GIF of them."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import numpy as np
from PIL import Image
from test_engine import tiny_job
from trained_runs import SegjobLog

from segjob.data import build_datasets
from segjob.engine import loop
from segjob.engine.previews import Previews
from segjob.engine.session import LocalSession
from segjob.job.schema import JobConfig
from segjob.models import create_model
from segjob.report import main as report_main
from segjob.results import figures
from segjob.store.storage import Storage, open_storage


def test_previews_are_written_at_the_due_epochs_and_animated_by_report(tmp_path):
    job = tiny_job(str(tmp_path / "runs"), epochs=5, preview_every_epochs=2, preview_images=3,
                   checkpoint_every_steps=0)
    loop.run(job, LocalSession("cpu"))
    folder = tmp_path / "runs" / "tiny" / "previews"
    # every 2nd epoch, and the last one
    assert sorted(path.name for path in folder.iterdir()) == ["epoch-002.png", "epoch-004.png", "epoch-005.png"]
    sizes = set()
    for path in folder.iterdir():
        with Image.open(path) as picture:
            sizes.add(picture.size)
            assert picture.format == "PNG" and np.asarray(picture.convert("L")).std() > 10  # a picture, not blank
    assert len(sizes) == 1  # the same images every time: frames of one animation

    out = tmp_path / "report"
    assert report_main([str(tmp_path / "runs" / "tiny"), "--out", str(out)]) == 0
    with Image.open(out / "previews.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == 3 and gif.size == sizes.pop()
        assert gif.info["loop"] == 0
    assert (out / "report.html").read_text().count('src="data:image/gif;base64,') == 1


def test_no_previews_by_default_and_no_gif(tmp_path):
    loop.run(tiny_job(str(tmp_path / "runs"), epochs=1), LocalSession("cpu"))
    assert not (tmp_path / "runs" / "tiny" / "previews").exists()
    assert report_main([str(tmp_path / "runs" / "tiny"), "--out", str(tmp_path / "report")]) == 0
    assert not (tmp_path / "report" / "previews.gif").exists()


class NoPreviewUploads(Storage):
    """The run's storage, except that every preview upload fails."""

    def write_bytes(self, path, data, create_only=False):
        if "/previews/" in path:
            raise ConnectionError("the store refused the preview")
        return super().write_bytes(path, data, create_only)


def test_a_failed_preview_upload_never_fails_training(tmp_path, monkeypatch):
    from segjob.store import storage as storage_module

    original = storage_module.open_storage

    def open_failing(uri, endpoint_url=None):
        opened = original(uri, endpoint_url)
        return NoPreviewUploads(opened.uri, opened.fs, opened.root, opened.is_local, opened.endpoint_url)

    monkeypatch.setattr(loop, "open_storage", open_failing)
    job = tiny_job(str(tmp_path / "runs"), epochs=2, preview_every_epochs=1, checkpoint_every_steps=0)
    with SegjobLog(logging.WARNING) as log:
        metrics = loop.run(job, LocalSession("cpu"))
    assert metrics["epoch"] == 2
    assert log.text.count("could not store the preview") == 1  # said once, not every epoch
    assert "ConnectionError: the store refused the preview" in log.text
    assert not (tmp_path / "runs" / "tiny" / "previews").exists()


def test_previews_may_be_turned_on_or_off_when_a_run_is_resubmitted(tmp_path):
    from segjob.store.run_folder import changed_keys

    before = tiny_job(str(tmp_path)).model_dump(mode="json")
    del before["train"]["preview_every_epochs"], before["train"]["preview_images"]  # recorded before they existed
    after = tiny_job(str(tmp_path), preview_every_epochs=2, preview_images=4).model_dump(mode="json")
    assert changed_keys(before, after) == []
    assert changed_keys(before, tiny_job(str(tmp_path), batch_size=4).model_dump(mode="json")) == ["train.batch_size"]


def test_a_one_channel_model_s_preview_shows_its_probability_map(tmp_path):

    raw = tiny_job(str(tmp_path), data={"num_classes": 2}, preview_every_epochs=1, preview_images=3).model_dump()
    job = JobConfig.model_validate(raw | {"loss": {"name": "bce", "threshold": 0.3}})
    _, val_set = build_datasets(job.data, job.seed)
    previews = Previews(job, open_storage(str(tmp_path)), str(tmp_path / "tiny"), val_set, LocalSession("cpu").device)
    try:
        rows = previews.predict(create_model(job.model, 3, 1), precision=contextlib.nullcontext)
    finally:
        previews.close()
    assert len(rows) == 3
    for row in rows:
        assert row.probability.shape == row.prediction.shape == row.target.shape == row.image.shape[:2]
        assert np.array_equal(row.prediction, (row.probability > 0.3).astype(row.prediction.dtype))
    figure = figures.sample_tiles(rows, ["background", "disc"], [(0, 0, 0), (200, 0, 0)], "t")
    assert len(figure.axes) == 3 * 4  # image, ground truth, prediction, probability per sample
    assert len(figures.sample_tiles([dataclasses.replace(r, probability=None) for r in rows], ["b", "d"],
                                    [(0, 0, 0), (200, 0, 0)], "t").axes) == 3 * 3
