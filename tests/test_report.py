"""python -m segjob.report: learning curves from a run's stored history, local and on S3."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
from trained_runs import SegjobLog, assert_figure, synthetic_run, upload_checkpoint

from segjob.report import epoch_records, learning_curves, main, series
from segjob.store import checkpoint
from segjob.store.storage import open_storage

FIGURES = ("loss.png", "miou.png", "lr.png", "scores.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return synthetic_run(tmp_path_factory)


def test_learning_curves_and_a_page_from_a_local_run(run, tmp_path):
    out = tmp_path / "report"
    assert main([str(run.run_dir), "--out", str(out)]) == 0
    for name in FIGURES:
        assert_figure(out / name)
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(FIGURES)  # self-contained
    assert "<h1>tiny-synthetic</h1>" in page and "val/miou" in page
    assert f"<td>{run.metrics['epoch']}</td>" in page  # the last epoch's row


def test_from_the_moto_s3_server(run, s3_endpoint, s3_bucket, tmp_path):
    storage = open_storage(f"s3://{s3_bucket}", endpoint_url=s3_endpoint)
    upload_checkpoint(run.checkpoint_dir, storage, storage.path("runs", "tiny", "checkpoints", run.checkpoint_dir.name))
    out = tmp_path / "report"
    assert main([f"s3://{s3_bucket}/runs/tiny", "--endpoint-url", s3_endpoint, "--out", str(out)]) == 0
    for name in FIGURES:
        assert_figure(out / name)
    assert f"s3://{s3_bucket}/runs/tiny/checkpoints/{run.checkpoint_dir.name}" in (out / "report.html").read_text()


def test_a_damaged_newest_history_falls_back_to_the_one_before(run, tmp_path):
    local = tmp_path / "runs" / "copy"
    older = local / "checkpoints" / run.checkpoint_dir.name
    shutil.copytree(run.checkpoint_dir, older)
    newer = local / "checkpoints" / checkpoint.checkpoint_name(999)
    shutil.copytree(run.checkpoint_dir, newer)
    meta = json.loads((newer / checkpoint.META_FILE).read_text())
    meta["step"] = 999
    (newer / checkpoint.META_FILE).write_text(json.dumps(meta))
    with open(newer / checkpoint.HISTORY_FILE, "a") as file:
        file.write('{"epoch": 99, "checkpoint": "epoch", "val/miou": 1.0}\n')  # not what meta.json vouches for
    out = tmp_path / "report"
    with SegjobLog(logging.WARNING) as log:
        assert main([str(local), "--out", str(out)]) == 0
    assert "history.jsonl: sha256 does not match meta.json; trying the checkpoint before" in log.text
    page = (out / "report.html").read_text()
    assert str(older) in page and "<td>99</td>" not in page


def test_a_checkpoint_folder_reports_its_own_history(run, tmp_path):
    out = tmp_path / "report"
    assert main([str(run.checkpoint_dir), "--out", str(out)]) == 0
    assert "<h1>tiny-synthetic</h1>" in (out / "report.html").read_text()


def test_nothing_finished_yet_still_draws(tmp_path):
    history = [{"step": 1, "epoch": 0.25, "train/step_loss": 1.2}, {"step": 2, "epoch": 0.5, "train/step_loss": 1.0},
               {"epoch": 0, "step": 2, "train/loss": 1.1, "lr": 0.01, "checkpoint": "steps"}]
    written = learning_curves(history, tmp_path, "young")
    assert set(written) == {"loss", "miou", "lr"}  # no validation scores yet: no scores.png
    for path in written.values():
        assert_figure(path)


def test_epoch_records_keep_the_last_per_epoch_and_skip_the_rest():
    history = [
        {"step": 1, "epoch": 0.5, "train/step_loss": 2.0},
        {"epoch": 1, "step": 2, "val/miou": 0.1, "checkpoint": "epoch"},
        {"epoch": 1, "step": 3, "checkpoint": "steps"},
        {"epoch": 2, "step": 4, "val/miou": float("nan"), "checkpoint": "epoch"},
        {"epoch": 1, "step": 2, "val/miou": 0.2, "checkpoint": "epoch"},  # written again after a resume
        {"epoch": 3, "step": 6, "val/miou": 0.4, "checkpoint": "preemption (sigterm)"},
    ]
    records = epoch_records(history)
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 2), (2, 4)]
    assert series(records, "val/miou") == ([1.0], [0.2])  # nan is no point


def test_a_missing_run_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err
    assert re.fullmatch(r"error: .*empty: no committed checkpoints .*\n", error)
