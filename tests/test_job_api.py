"""Sweeps through Ray's real job API, the way a cluster runs them.

The module starts one Ray head with `ray start --head` on 127.0.0.1 (2 CPUs, dashboard, token
auth as Ray 2.60 has it on by default) and submits `python -m segjob.tune jobs/tune_quickstart.yaml`,
shrunk with --set, with `ray job submit --working-dir .`; storage is the moto S3 server. Then:

- one sweep of 4 trials (1 worker each, 2 at a time): the running workers are SIGKILLed and a
  trial resumes from its checkpoint without failing, ASHA stops the poor trials early,
  results.csv / best.json / search.png land in the bucket, and the best checkpoint is pulled
  (verified) and evaluated;
- one sweep whose driver is SIGKILLed while its second trial trains: submitting the same command
  again restores it (Optuna's and ASHA's state included), the finished trial is not trained
  again, the interrupted one continues from its checkpoint, and the sweep completes.

Each costs a couple of minutes on 2 shared cores; the cluster is stopped at the end.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from faults import committed_steps, kill, train_worker_pids, wait_for
from servers import free_port, wait_until_answers

from segjob import pull
from segjob.store import checkpoint, run_folder
from segjob.store.lease import LEASE_FILE, Holder, read_fences
from segjob.store.storage import open_storage

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
SWEEP_FILE = "jobs/tune_quickstart.yaml"
# The quickstart sweep, shrunk: 32x32 shapes, a small U-Net, 3 epochs; val/loss separates a
# learning trial from a stalled one after the first epoch (on val/miou they can tie that early).
SMALL = [
    "data.train_samples=64", "data.val_samples=16", "data.image_size=32", "model.base_channels=8", "model.depth=2",
    "train.epochs=3", "train.batch_size=8", "train.checkpoint_every_steps=4", "train.log_every_steps=1",
    "preemption.aws_metadata_url=null", "preemption.gcp_metadata_url=null", "tune.metric=val/loss", "tune.mode=min",
]
GOOD = ["{optim.lr: 0.01, optim.name: adam, model.base_channels: 8}",
        "{optim.lr: 0.003, optim.name: adam, model.base_channels: 16}"]
STALLED = ["{optim.lr: 0.0003, optim.name: sgd, model.base_channels: 8}",
           "{optim.lr: 0.0003, optim.name: sgd, model.base_channels: 16}"]


@dataclass
class Cluster:
    address: str  # the dashboard's, where jobs are submitted
    env: dict[str, str]
    process: subprocess.Popen

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(RAY), *args], env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def submit(self, job_id: str, sets: list[str], wait: bool = True,
               timeout: float = 600) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir . -- python -m segjob.tune jobs/tune_quickstart.yaml --set ...`."""
        entrypoint = ["python", "-m", "segjob.tune", SWEEP_FILE, *[arg for s in sets for arg in ("--set", s)]]
        # the job's own env vars: segjob's driver must not name them again (Ray refuses a conflict)
        runtime_env = {"env_vars": {name: os.environ[name] for name in
                                    ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}}
        command = ["job", "submit", "--address", self.address, "--working-dir", ".", "--submission-id", job_id,
                   "--runtime-env-json", json.dumps(runtime_env), *([] if wait else ["--no-wait"]),
                   "--", *entrypoint]  # the CLI quotes it (shlex.join)
        deadline = time.monotonic() + 90
        while True:
            submitted = self.ray(*command, timeout=timeout)
            # the dashboard answers before its job agent has registered (seen on a loaded machine)
            if "No available agent to submit job" not in submitted.stderr or time.monotonic() > deadline:
                return submitted
            time.sleep(2)

    def status(self, job_id: str) -> str:
        out = self.ray("job", "status", "--address", self.address, job_id).stdout
        for status in ("succeeded", "failed", "was stopped"):
            if f"Job '{job_id}' {status}" in out:
                return status.upper().replace("WAS ", "")
        found = re.search(rf"Status for job '{job_id}': (\w+)", out)
        return found.group(1) if found else "UNKNOWN"

    def logs(self, job_id: str) -> str:
        return self.ray("job", "logs", "--address", self.address, job_id).stdout


@pytest.fixture(scope="module")
def cluster(s3_env):
    """`ray start --head` in its own session on 127.0.0.1; stopped (the whole process group) at the end."""
    from ray._private.utils import get_dashboard_dependency_error

    if get_dashboard_dependency_error():  # the job API lives in the dashboard
        pytest.skip(f"the job API needs ray[default]: {get_dashboard_dependency_error()}")
    temp = tempfile.mkdtemp(prefix="segjob-ray-")  # short: Ray's socket paths must stay under 108 bytes
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),  # clients and drivers read it here
        "HOME": temp,  # nothing lands in the developer's ~/.ray
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in the entrypoint
    }
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    command = [str(RAY), "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
               "--port", str(free_port()), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(dashboard), "--temp-dir", f"{temp}/ray",
               # the agent's default ports are taken while another Ray runs here (the suite's own
               # ray_cluster): it then never starts, and every submission gets "No available agent"
               "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
               "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]
    log = open(f"{temp}/ray-start.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        wait_until_answers(address, timeout=90, process=process)
        yield Cluster(address, env, process)
    finally:
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=grace)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def read_csv(storage, path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(storage.read_bytes(path).decode())))


def test_a_sweep_through_the_job_api_stops_early_survives_a_lost_worker_and_pulls_the_best(
        cluster, s3_endpoint, s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/runs"
    storage = open_storage(uri, s3_endpoint)
    sweep = storage.path("tune_quickstart")
    points = f"tune.points_to_evaluate=[{', '.join(GOOD + STALLED)}]"  # the stalled ones start once a rung has values
    sets = [*SMALL, "tune.num_samples=4", points, f"storage.uri={uri}", f"storage.endpoint_url={s3_endpoint}"]

    killed = {}

    def kill_a_worker_once_a_trial_has_a_checkpoint():
        def trial_with_a_checkpoint():
            return next((name for name in storage.list_dirs(f"{sweep}/trials")
                         if committed_steps(storage, f"tune_quickstart/trials/{name}")), None)

        killed["trial"] = wait_for(trial_with_a_checkpoint, 400, "a trial's first checkpoint", interval=0.5)
        # every running trial's worker: a pid does not say which trial it serves, and the one
        # with a checkpoint must be among those hit
        killed["pids"] = train_worker_pids()
        for pid in killed["pids"]:
            kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker_once_a_trial_has_a_checkpoint, daemon=True)
    killer.start()
    submitted = cluster.submit("sweep-asha", sets, timeout=900)
    killer.join(timeout=5)
    logs = submitted.stdout
    assert submitted.returncode == 0, logs[-4000:] + submitted.stderr[-2000:]
    assert killed.get("pids"), "no worker was killed"

    results = read_csv(storage, f"{sweep}/results.csv")
    assert len(results) == 4 and {row["status"] for row in results} <= {"finished", "stopped early"}, results
    stopped = [row for row in results if row["status"] == "stopped early"]
    assert stopped and all(int(row["epochs"]) < 3 for row in stopped), "ASHA stopped at least one trial early"
    assert {row["optim.name"] for row in stopped} >= {"sgd"}, "the stalled trials were the ones stopped"
    assert re.search(r"\] resumed (\w+) from step-\d+", logs), \
        "the trial that lost its worker resumed from its checkpoint"
    assert "stopped early by the scheduler" in logs and "best val/loss" in logs, "progress lines while it runs"

    best = json.loads(storage.read_bytes(f"{sweep}/best.json"))
    assert best["trial"] == results[0]["trial"] and best["metric"] == "val/loss"
    assert storage.read_bytes(f"{sweep}/search.png").startswith(b"\x89PNG")

    assert pull.main([f"{uri}/tune_quickstart", "--endpoint-url", s3_endpoint, "--to", str(tmp_path / "best")]) == 0
    pulled = checkpoint.load_folder(tmp_path / "best")  # every hash verified again
    assert (pulled.meta["run"], pulled.meta["metrics"]["val/loss"]) == (best["trial"], best["value"])

    from segjob import evaluate

    assert evaluate.main([str(tmp_path / "best"), "--out", str(tmp_path / "evaluation"), "--no-progress",
                          "--no-figures", "--no-assd"]) == 0
    figures = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())["metrics"]
    assert figures["val/miou"] == pytest.approx(pulled.meta["metrics"]["val/miou"], abs=1e-6), \
        "evaluate scores the pulled checkpoint as training did"


def driver_pids(marker: str) -> list[int]:
    """The Python processes running `segjob.tune` with `marker` in their arguments (not the job's shell)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        program = Path(argv[0].decode(errors="replace")).name
        if entry.name.isdigit() and program.startswith("python") and b"segjob.tune" in argv and marker.encode() in argv:
            found.append(int(entry.name))
    return found


def test_a_killed_sweep_driver_resumes_when_the_same_command_is_submitted_again(
        cluster, s3_endpoint, s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/runs"
    storage = open_storage(uri, s3_endpoint)
    name = "tune_kill"
    sweep = storage.path(name)
    # two trials one after the other, each long enough (2 epochs of 384 images at 64x64) to be hit while training;
    # ASHA's only rung is the last epoch, so it never stops one here but its state is saved and restored
    sets = [*SMALL, "data.train_samples=384", "data.image_size=64", "model.base_channels=16", "train.batch_size=16",
            "train.epochs=2", "tune.num_samples=2", "tune.max_concurrent_trials=1", "tune.asha.grace_period=2",
            f"tune.points_to_evaluate=[{GOOD[0]}, {GOOD[1]}]", f"name={name}",
            f"storage.uri={uri}", f"storage.endpoint_url={s3_endpoint}"]
    first = cluster.submit("sweep-killed", sets, wait=False)
    assert first.returncode == 0, first.stderr[-3000:]

    def trials():
        return storage.list_dirs(f"{sweep}/trials")

    def one_done_one_training():
        done = [t for t in trials() if run_folder.read_done(storage, f"{sweep}/trials/{t}")]
        training = [t for t in trials() if t not in done and committed_steps(storage, f"{name}/trials/{t}")]
        return (done[0], training[0]) if done and training else None

    finished, interrupted = wait_for(one_done_one_training, 500, "one trial finished and the next one checkpointed",
                                     interval=0.25)
    victims = driver_pids(f"name={name}")
    assert len(victims) == 1, victims
    kill(victims[0], signal.SIGKILL)
    before = {info.name: info.meta["time"] for info in checkpoint.list_committed(storage, f"{sweep}/trials/{finished}")}
    killed_at = max(committed_steps(storage, f"{name}/trials/{interrupted}"))
    wait_for(lambda: cluster.status("sweep-killed") == "FAILED", 120, "the killed driver's job to fail", interval=2)
    wait_for(lambda: not train_worker_pids(), 60, "the killed sweep's workers to go", interval=0.5)

    again = cluster.submit("sweep-resubmitted", sets, timeout=900)  # the same command
    logs = again.stdout
    assert again.returncode == 0, logs[-4000:] + again.stderr[-2000:]
    assert f"restoring sweep '{name}'" in logs and "restored the scheduler's state" in logs
    # the killed driver ran on this host and its pid is gone: the lease is taken over at once, one generation on
    assert "taking over the run from a driver that is gone" in logs
    lease = Holder.parse(storage.read_bytes(f"{sweep}/trials/{LEASE_FILE}"), LEASE_FILE)
    assert lease.generation == 2 and lease.released
    assert read_fences(storage, f"{sweep}/trials/{interrupted}").get(2) is not None, "the trial resumed under it"
    assert f"resumed {interrupted} from step-" in logs, "the interrupted trial continued from its checkpoint"
    assert f"resumed {finished} " not in logs and f"trial {finished} started" not in logs, \
        "the finished trial was not run again"

    results = read_csv(storage, f"{sweep}/results.csv")
    assert sorted(row["trial"] for row in results) == sorted([finished, interrupted]), "no trial added or lost"
    assert {row["status"] for row in results} == {"finished"}
    after = {info.name: info.meta["time"] for info in checkpoint.list_committed(storage, f"{sweep}/trials/{finished}")}
    assert after == before, "the finished trial's checkpoints are untouched"
    final = checkpoint.load(storage, checkpoint.latest(storage, f"{sweep}/trials/{interrupted}"))
    steps = [record["step"] for record in final.history if "train/step_loss" in record]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > killed_at, "every step exactly once, past the kill"
