"""Preemption tolerance, proven with real faults on local Ray (2 CPU workers, gloo).

Every interrupted run is compared with one uninterrupted reference run of the same job:
the final weights must be bit-identical and the history must have every step exactly once.
Preemption notices and drains need nodes that can go: they are in test_multinode.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
from faults import assert_same_as_reference, committed_steps, final_state, kill, train_worker_pids, wait_for
from servers import create_s3_bucket, start_moto_process, stop_process

from segjob.store.storage import open_storage
from segjob.train import main

pytestmark = pytest.mark.ray

JOB = "jobs/quickstart.yaml"
RUN = "quickstart"
# 24 steps per epoch, 2 epochs, a checkpoint every 3 steps: slow enough to be hit mid-epoch
FAULT_JOB = [
    "data.train_samples=384", "data.val_samples=16", "data.image_size=64",
    "model.base_channels=8", "model.depth=2", "train.batch_size=8", "train.epochs=2",
    "train.checkpoint_every_steps=3", "train.log_every_steps=1", "failure.max_failures=3",
    "preemption.aws_metadata_url=null", "preemption.gcp_metadata_url=null",
]


def args(*overrides: str) -> list[str]:
    return [JOB, *[arg for override in [*FAULT_JOB, *overrides] for arg in ("--set", override)]]


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    storage_dir = tmp_path_factory.mktemp("reference")
    assert main(args(f"storage.uri={storage_dir}")) == 0
    return final_state(open_storage(str(storage_dir)), RUN)


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_sigkill_a_worker_mid_epoch_and_the_run_ends_identical(store, reference, request):
    endpoint = request.getfixturevalue(f"{store}_endpoint")
    bucket = request.getfixturevalue(f"{store}_bucket")
    uri = f"{'s3' if store == 's3' else 'gs'}://{bucket}/runs"
    storage = open_storage(uri, endpoint_url=endpoint)
    killed = {}

    def kill_a_worker():
        wait_for(lambda: committed_steps(storage, RUN), 180, "the first committed checkpoint")
        victim = train_worker_pids()[-1]
        killed["pid"], killed["after_step"] = victim, max(committed_steps(storage, RUN))
        kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    assert main(args(f"storage.uri={uri}", f"storage.endpoint_url={endpoint}")) == 0
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    assert killed["after_step"] < 48, "killed before the run could finish"
    assert_same_as_reference(final_state(storage, RUN), reference)


def test_sigkill_the_driver_and_the_same_command_resumes(reference, s3_env, tmp_path):
    url, server = start_moto_process()  # its own process: it outlives the driver
    try:
        bucket = "segjob-driver-kill"
        create_s3_bucket(url, bucket)
        uri = f"s3://{bucket}/runs"
        storage = open_storage(uri, endpoint_url=url)
        command = [sys.executable, "-m", "segjob.train", *args(f"storage.uri={uri}", f"storage.endpoint_url={url}")]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        with open(tmp_path / "first.log", "w") as log:
            driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: committed_steps(storage, RUN) or driver.poll() is not None, 240, "the first checkpoint")
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            killed_after = max(committed_steps(storage, RUN))
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        finally:
            driver.wait(timeout=30)
        wait_for(lambda: not train_worker_pids(), 60, "the killed run's workers to go")

        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"resuming run '{RUN}' from step-" in again.stderr
        assert killed_after < 48
        assert_same_as_reference(final_state(storage, RUN), reference)
    finally:
        stop_process(server)
