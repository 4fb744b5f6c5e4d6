"""The console is for people: what a real `python -m segjob.train` on local Ray prints (segjob's lines,
not Ray's per-report chatter), and cloud metadata polled, and talked about, only on that cloud."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from metadata_servers import FakeAwsMetadata, FakeGcpMetadata
from test_ray_train import SMALL

from segjob.engine.preemption.watcher import PreemptionWatcher
from segjob.engine.tracking import tensorboard
from segjob.job.schema import PreemptionSection

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ray
def test_a_training_run_prints_segjobs_lines_and_none_of_rays_reports(tmp_path):
    """Its own Ray (as a user's laptop run starts one, workers' output sent to the driver's console):
    2 workers, checkpoints every step, so both ranks report several times."""
    overrides = [*SMALL, "train.epochs=1", "train.max_steps_per_epoch=3", "train.checkpoint_every_steps=1",
                 "scaling.num_workers=2", "tracking.progress_every_s=0.001", f"storage.uri={tmp_path}"]
    command = [sys.executable, "-m", "segjob.train", "jobs/quickstart.yaml",
               *[arg for override in overrides for arg in ("--set", override)]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}  # a local Ray of its own, never the tests'
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-3000:]

    assert "segjob: epoch 1/1  step 3  train/loss" in console
    assert "segjob: epoch 1/1  step 1/3 of the epoch  train/step_loss" in console  # the progress line
    assert "Reporting training result" not in console and "TrainingReport(" not in console, console[-3000:]
    assert console.count("Failed to query Ray Train Controller actor state") <= 1  # said once, not every 2 s
    assert "preemption poll failed" not in console
    assert list((tmp_path / "quickstart" / tensorboard.FOLDER).glob("events.out.tfevents.*"))  # written on Ray too


def test_the_silenced_logger_is_the_one_ray_reports_on():
    """Ray names it after its file's path; the setup hook computes that path without importing ray.train."""
    pytest.importorskip("ray")
    from ray.train.v2._internal.execution import context

    from segjob.cluster import process_setup

    assert process_setup.train_report_logger_name() == context.__file__
    assert context.logger is logging.getLogger(context.__file__)


def test_repeated_ray_warnings_are_said_once():
    from segjob.cluster.process_setup import OncePerMessage

    logger = logging.getLogger("segjob-test-once")
    logger.addFilter(OncePerMessage())
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    for _ in range(3):
        logger.warning("State API may be temporarily unavailable")
    logger.warning("another message")
    assert [r.getMessage() for r in records] == ["State API may be temporarily unavailable", "another message"]


# --- cloud metadata: polled and announced only on that cloud -------------------------------


def watched(caplog, **urls) -> PreemptionWatcher:
    caplog.set_level(logging.DEBUG, logger="segjob")
    watcher = PreemptionWatcher(PreemptionSection(**{"aws_metadata_url": None, "gcp_metadata_url": None,
                                                     "poll_interval_s": 0.05, **urls}))
    watcher.start()
    return watcher


def settle(watcher: PreemptionWatcher, polling: list[str], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while sorted(watcher.polling()) != polling:
        assert time.monotonic() < deadline, watcher.polling()
        time.sleep(0.02)


def test_another_server_at_the_metadata_address_is_not_a_cloud_and_no_warning(caplog):
    """A laptop's answer at the address (here: GCE's server refusing EC2's token request with 403, and EC2's
    refusing GCE's request with 401) means "not on that cloud": nothing polled, nothing above debug said."""
    with FakeGcpMetadata() as gcp_server, FakeAwsMetadata() as aws_server:
        watcher = watched(caplog, aws_metadata_url=gcp_server.url, gcp_metadata_url=aws_server.url)
        try:
            settle(watcher, [])
            time.sleep(0.2)  # several poll intervals: still nothing
            assert gcp_server.requests == 1 and aws_server.requests == 1  # asked once each, then left alone
        finally:
            watcher.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.INFO], caplog.text
    assert "not AWS EC2: IMDSv2 token request answered HTTP 403" in caplog.text
    assert "not GCP Compute Engine: instance/preempted answered HTTP 401 without Metadata-Flavor: Google" in caplog.text


def test_on_a_cloud_it_says_so_once_and_keeps_polling(caplog):
    with FakeAwsMetadata() as aws_server:
        watcher = watched(caplog, aws_metadata_url=aws_server.url)
        try:
            settle(watcher, ["aws"])
            while aws_server.requests < 6:
                time.sleep(0.02)
        finally:
            watcher.stop()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert said == ["on AWS EC2 (IMDSv2 answered): polling its preemption notices every 0.05 s"]


def test_only_the_announcing_rank_says_it(caplog):
    caplog.set_level(logging.DEBUG, logger="segjob")
    with FakeGcpMetadata() as gcp_server:
        watcher = PreemptionWatcher(PreemptionSection(aws_metadata_url=None, gcp_metadata_url=gcp_server.url,
                                                      poll_interval_s=0.05), announce=False)
        watcher.start()
        try:
            settle(watcher, ["gcp"])
            while gcp_server.requests < 3:
                time.sleep(0.02)
        finally:
            watcher.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.INFO], caplog.text
