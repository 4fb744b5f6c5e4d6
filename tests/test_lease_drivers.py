"""Two real `python -m segjob.train` drivers on one run (each with its own local Ray), storage a local folder.

The first trains; a second started beside it is refused. The first driver is then paused (SIGSTOP: cut
off, as far as the store can tell) while its Ray workers go on; a third driver takes the run over once the
lease has stood still for the stale period, resumes from the newest checkpoint and finishes. Resumed with
SIGCONT, the first driver finds its lease taken, stops its workers and exits 2. What the superseded
workers committed after the takeover is never listed; the run ends with every step exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from faults import committed_steps, wait_for

from segjob.store import checkpoint, run_folder
from segjob.store.lease import HEARTBEAT_ENV, LEASE_FILE, STALE_ENV, Holder, read_fences
from segjob.store.storage import open_storage

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
RUN = "quickstart"
JOB = [  # 24 steps per epoch, 2 epochs: long enough to be paused mid-run on 2 shared cores
    "data.train_samples=384", "data.val_samples=16", "data.image_size=64", "model.base_channels=8",
    "model.depth=2", "train.batch_size=8", "train.epochs=2", "train.checkpoint_every_steps=3",
    "train.log_every_steps=1", "scaling.num_workers=1", "failure.max_failures=1",
    "preemption.aws_metadata_url=null", "preemption.gcp_metadata_url=null",
]


def command(storage_dir: Path) -> list[str]:
    sets = [*JOB, f"storage.uri={storage_dir}"]
    return [sys.executable, "-m", "segjob.train", "jobs/quickstart.yaml", *[a for s in sets for a in ("--set", s)]]


@pytest.mark.timeout(600)
def test_a_paused_driver_is_taken_over_and_its_workers_commits_do_not_count(tmp_path):
    env = {**os.environ, HEARTBEAT_ENV: "0.5", STALE_ENV: "5", "RAY_USAGE_STATS_ENABLED": "0"}
    storage = open_storage(str(tmp_path / "runs"))
    run = storage.path(RUN)
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in ("first", "third")}
    first = subprocess.Popen(command(tmp_path / "runs"), env=env, cwd=ROOT, stdout=logs["first"],
                             stderr=subprocess.STDOUT, start_new_session=True)
    third = None
    try:
        wait_for(lambda: committed_steps(storage, RUN) or first.poll() is not None, 300, "the first checkpoint")
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]

        second = subprocess.run(command(tmp_path / "runs"), env=env, cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        assert "being driven by" in second.stderr and f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr

        os.kill(first.pid, signal.SIGSTOP)  # the driver only: its Ray and workers go on
        third = subprocess.Popen(command(tmp_path / "runs"), env=env, cwd=ROOT, stdout=logs["third"],
                                 stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: 2 in read_fences(storage, run) or third.poll() is not None, 300,
                 "the third driver to take over and resume")
        assert third.poll() is None, (tmp_path / "third.log").read_text()[-3000:]
        resumed_from = read_fences(storage, run)[2]

        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=120) == 2, (tmp_path / "first.log").read_text()[-3000:]
        first_log = (tmp_path / "first.log").read_text()
        # its lease renewal refused, or its workers' own check (whichever told it first)
        assert "took over this run" in first_log
        assert third.wait(timeout=400) == 0, (tmp_path / "third.log").read_text()[-3000:]
    finally:
        for process in (first, third):
            if process and process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        for log in logs.values():
            log.close()

    third_log = (tmp_path / "third.log").read_text()
    assert "taking over the run from a driver that is gone" in third_log
    assert f"resuming run '{RUN}' from step-" in third_log

    listed = checkpoint.list_committed(storage, run)
    assert all(info.generation == 2 or info.step <= resumed_from for info in listed), \
        "nothing the superseded driver committed after the takeover is listed"
    final = checkpoint.latest(storage, run)
    assert final.generation == 2 and final.epoch == 2 and checkpoint.verify(storage, final) is None
    loaded = checkpoint.load(storage, final, expected_run=RUN)
    steps = [record["step"] for record in loaded.history if "train/step_loss" in record]
    assert steps == list(range(1, final.step + 1)), "every step exactly once"
    assert run_folder.read_done(storage, run)["epochs"] == 2
    lease = Holder.parse(storage.read_bytes(f"{run}/{LEASE_FILE}"), LEASE_FILE)
    assert lease.generation == 2 and lease.released
