"""Commits that cannot mix writers, and cleanup that spares an upload in flight (issue 15), for real:
moto's S3 server and fake-gcs-server, one writer slowed by the loopback proxy (tests/proxy.py), the other
straight to the server.

What must hold, each race ending with latest() returning a checkpoint that loads and verifies:
- two writers of one step (threads, and processes): each uploads into its own attempt folder; the
  first meta.json wins, the other returns the winner and removes its own attempt; the payloads never mix;
- a cleanup run while an upload is in flight leaves it alone (grace period), and the upload commits;
- a cleanup that removes an upload's files anyway makes that writer refuse to commit;
- an abandoned attempt (or a losing one beside a committed step) goes once it is older than the grace period.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from faults import in_thread
from proxy import TcpProxy, wait_for

from segjob.store import checkpoint
from segjob.store.storage import Storage, open_storage

RUN = "run"


@pytest.fixture(params=["s3", "gcs"])
def server(request) -> tuple[str, str]:
    """(endpoint, uri) of a fresh bucket on moto or on fake-gcs-server."""
    endpoint, bucket = request.getfixturevalue(f"{request.param}_endpoint"), request.getfixturevalue(
        f"{request.param}_bucket")
    return endpoint, f"{'s3' if request.param == 's3' else 'gs'}://{bucket}/runs"


@pytest.fixture
def proxy(server):
    """A loopback TCP proxy in front of the server: a test slows a writer's uploads with it."""
    target = urlsplit(server[0])
    with TcpProxy(target.hostname, target.port) as running:
        yield running


@pytest.fixture
def slow_and_direct(server, proxy) -> tuple[Storage, Storage]:
    """(a writer's storage through the proxy, a storage straight to the server) on the same bucket."""
    endpoint, uri = server
    return open_storage(uri, proxy.url), open_storage(uri, endpoint)


def payload(tmp_path: Path, step: int, seed: int, big: bool = False) -> tuple[Path, dict]:
    """A checkpoint folder whose every file depends on seed; `big`: model and state 4 MiB each."""
    torch.manual_seed(seed)
    size = (1 << 20) if big else 16
    model_state = {"w": torch.randn(size)}
    train_state = {"progress": {"epoch": 1, "step": step, "position": 0}, "seed": seed, "blob": torch.randn(size)}
    history = [{"step": s, "seed": seed} for s in range(1, step + 1)]
    folder = tmp_path / f"local-{step}-{seed}"
    checkpoint.write_local(folder, model_state, train_state, history)
    meta = checkpoint.build_meta(folder, job={"name": RUN}, step=step, epoch=1, metrics={"step": step}, reason="test")
    return folder, meta




def step_path(storage: Storage, step: int) -> str:
    return f"{checkpoint.checkpoints_path(storage.path(RUN))}/{checkpoint.checkpoint_name(step)}"


def weights_landed(storage: Storage, step: int) -> bool:
    return any(key.endswith(f"/{checkpoint.MODEL_FILE}") for key in storage.files(step_path(storage, step)))


def assert_latest_is_whole(storage: Storage, step: int, seed: int) -> checkpoint.CheckpointInfo:
    """latest() is step `step`, verifies, loads, and every file of it is the writer `seed`'s."""
    newest = checkpoint.latest(storage, storage.path(RUN))
    assert newest is not None and newest.step == step
    assert checkpoint.verify(storage, newest) is None
    loaded = checkpoint.load(storage, newest, expected_run=RUN)
    assert loaded.train_state["seed"] == seed and {r["seed"] for r in loaded.history} == {seed}
    torch.manual_seed(seed)
    assert torch.equal(loaded.model_state["w"], torch.randn(loaded.model_state["w"].numel()))
    return newest


def test_two_writers_of_one_step_commit_one_whole_checkpoint(slow_and_direct, proxy, tmp_path):
    slow, direct = slow_and_direct
    run_path = direct.path(RUN)
    slow_folder, slow_meta = payload(tmp_path, step=20, seed=1, big=True)
    fast_folder, fast_meta = payload(tmp_path, step=20, seed=2)

    proxy.delay(0.02)  # >= 1.3 s per 4 MiB file
    thread, outcome = in_thread(checkpoint.commit, slow, run_path, slow_folder, slow_meta)
    # the slow writer's weights are up, its state.pt is on the wire: the second writer commits now
    assert wait_for(lambda: weights_landed(direct, 20), timeout=30)
    winner = checkpoint.commit(direct, run_path, fast_folder, fast_meta)
    assert "error" not in outcome and thread.is_alive(), "the slow writer was still uploading"
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert "error" not in outcome, repr(outcome.get("error"))

    # the slow writer's meta.json was refused (create-only); it returns the winner, not its own attempt
    assert outcome["value"].path == winner.path and outcome["value"].meta_sha256 == winner.meta_sha256
    assert assert_latest_is_whole(direct, 20, seed=2).path == winner.path
    assert checkpoint.list_uncommitted(direct, run_path) == [], "the losing writer removed its own attempt"


WRITER = """
import json, sys
from pathlib import Path
from segjob.store import checkpoint
from segjob.store.storage import open_storage
uri, endpoint, run_path, folder, meta = sys.argv[1:]
info = checkpoint.commit(open_storage(uri, endpoint), run_path, Path(folder), json.loads(Path(meta).read_text()))
print(json.dumps({"path": info.path}))
"""


def test_two_writer_processes_of_one_step(slow_and_direct, proxy, tmp_path):
    """The same race between processes: a slow writer process (a zombie worker) and this one."""
    slow, direct = slow_and_direct
    run_path = direct.path(RUN)
    slow_folder, slow_meta = payload(tmp_path, step=20, seed=1, big=True)
    (tmp_path / "meta.json").write_text(json.dumps(slow_meta))
    proxy.delay(0.02)
    repository = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repository, os.environ.get("PYTHONPATH")]))}
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, slow.uri, proxy.url, run_path, str(slow_folder), str(tmp_path / "meta.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert wait_for(lambda: weights_landed(direct, 20), timeout=60)
        winner = checkpoint.commit(direct, run_path, *payload(tmp_path, step=20, seed=2))
        out, err = writer.communicate(timeout=120)
    finally:
        writer.kill()
    assert writer.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["path"] == winner.path
    assert_latest_is_whole(direct, 20, seed=2)
    assert checkpoint.list_uncommitted(direct, run_path) == []


def test_a_writer_that_comes_second_returns_the_first_commit_without_uploading(slow_and_direct, tmp_path):
    _, direct = slow_and_direct
    run_path = direct.path(RUN)
    first = checkpoint.commit(direct, run_path, *payload(tmp_path, step=20, seed=1))
    again = checkpoint.commit(direct, run_path, *payload(tmp_path, step=20, seed=2))
    assert again.path == first.path
    assert_latest_is_whole(direct, 20, seed=1)
    assert checkpoint.list_uncommitted(direct, run_path) == []


def test_a_cleanup_during_an_upload_spares_it(slow_and_direct, proxy, tmp_path):
    slow, direct = slow_and_direct
    run_path = direct.path(RUN)
    checkpoint.commit(direct, run_path, *payload(tmp_path, step=10, seed=1))

    proxy.delay(0.02)
    thread, outcome = in_thread(checkpoint.commit, slow, run_path, *payload(tmp_path, step=20, seed=2, big=True))
    assert wait_for(lambda: weights_landed(direct, 20), timeout=30)
    # a new driver starts and cleans up while the old writer is still uploading
    assert checkpoint.list_uncommitted(direct, run_path) == [checkpoint.checkpoint_name(20)]
    assert checkpoint.remove_uncommitted(direct, run_path) == []
    assert thread.is_alive(), "the cleanup ran while the upload was in flight"
    thread.join(timeout=60)
    assert "error" not in outcome, repr(outcome.get("error"))
    assert assert_latest_is_whole(direct, 20, seed=2).path == outcome["value"].path


def test_a_writer_whose_files_a_cleanup_removed_does_not_commit(slow_and_direct, proxy, tmp_path):
    slow, direct = slow_and_direct
    run_path = direct.path(RUN)
    checkpoint.commit(direct, run_path, *payload(tmp_path, step=10, seed=1))

    proxy.delay(0.02)  # >= 1.3 s per 4 MiB file
    thread, outcome = in_thread(checkpoint.commit, slow, run_path, *payload(tmp_path, step=20, seed=2, big=True))
    assert wait_for(lambda: weights_landed(direct, 20), timeout=30)
    # a cleanup that misjudges the upload as abandoned (no grace period) removes what is up so far
    assert checkpoint.remove_uncommitted(direct, run_path, grace_s=0) == [checkpoint.checkpoint_name(20)]
    thread.join(timeout=60)
    error = outcome.get("error")
    assert isinstance(error, FileNotFoundError) and "removed during the upload" in str(error), repr(outcome)
    assert checkpoint.MODEL_FILE in str(error)
    assert [info.step for info in checkpoint.list_committed(direct, run_path)] == [10]
    assert_latest_is_whole(direct, 10, seed=1)


@pytest.mark.parametrize("where", ["local", "s3", "gcs"])
def test_abandoned_attempts_go_once_older_than_the_grace_period(where, request, tmp_path):
    if where == "local":
        storage = open_storage(str(tmp_path / "runs"))
    else:
        storage = open_storage(f"{'s3' if where == 's3' else 'gs'}://{request.getfixturevalue(f'{where}_bucket')}"
                               "/runs", request.getfixturevalue(f"{where}_endpoint"))
    run_path = storage.path(RUN)
    committed = checkpoint.commit(storage, run_path, *payload(tmp_path, step=10, seed=1))
    loser = f"{step_path(storage, 10)}/{checkpoint.ATTEMPT_PREFIX}{'a' * 32}"
    storage.write_bytes(f"{loser}/{checkpoint.MODEL_FILE}", b"a losing writer's weights")
    abandoned = f"{step_path(storage, 20)}/{checkpoint.ATTEMPT_PREFIX}{'b' * 32}"
    storage.write_bytes(f"{abandoned}/{checkpoint.MODEL_FILE}", b"a crashed writer's weights")
    loser_label = f"{checkpoint.checkpoint_name(10)}/{loser.rsplit('/', 1)[-1]}"
    assert checkpoint.list_uncommitted(storage, run_path) == [loser_label, checkpoint.checkpoint_name(20)]

    assert checkpoint.remove_uncommitted(storage, run_path) == [], "written just now: maybe in flight"
    later = time.time() + checkpoint.CLEANUP_GRACE_S + 60  # this reader's clock, a grace period on
    assert checkpoint.remove_uncommitted(storage, run_path, now=later) == [loser_label, checkpoint.checkpoint_name(20)]
    assert not storage.files(abandoned) and not storage.files(loser)
    assert checkpoint.remove_uncommitted(storage, run_path, grace_s=0) == [], "the committed attempt is referenced"
    assert checkpoint.latest(storage, run_path).path == committed.path
    assert checkpoint.verify(storage, committed) is None
