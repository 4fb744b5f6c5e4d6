"""The driver lease with fencing (segjob/store/lease.py), on a local folder, moto's S3 server and fake-gcs-server.

Contenders are real: threads racing for one lease, and a holder in its own process (tests/lease_holder.py)
that is stopped with SIGSTOP (a driver paused or cut off), taken over, and resumed with SIGCONT to find
that it has lost. Timings are shortened through the lease's own environment variables.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from segjob.errors import UserError
from segjob.store import checkpoint
from segjob.store.conditional import VersionConflict, read_versioned, replace_if
from segjob.store.lease import (
    HEARTBEAT_ENV,
    LEASE_FILE,
    STALE_ENV,
    Fence,
    Holder,
    Lease,
    Superseded,
    fence_path,
    read_fences,
)
from segjob.store.storage import Storage, open_storage

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT, STALE = 0.2, 3.0  # a holder starved of CPU on a loaded machine still renews within STALE


@pytest.fixture(autouse=True)
def quick_lease(monkeypatch):
    monkeypatch.setenv(HEARTBEAT_ENV, str(HEARTBEAT))
    monkeypatch.setenv(STALE_ENV, str(STALE))


@pytest.fixture(params=["local", "s3", "gcs"])
def store(request, tmp_path) -> tuple[Storage, str]:
    """(storage, endpoint or "-") on each kind of store."""
    if request.param == "local":
        return open_storage(str(tmp_path / "runs")), "-"
    if request.param == "s3":
        endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
        return open_storage(f"s3://{bucket}/runs", endpoint), endpoint
    endpoint, bucket = request.getfixturevalue("gcs_endpoint"), request.getfixturevalue("gcs_bucket")
    return open_storage(f"gs://{bucket}/runs", endpoint), endpoint


def holder_of(storage: Storage, folder: str = "run") -> Holder:
    return Holder.parse(storage.read_bytes(storage.path(folder, LEASE_FILE)), "lease")


class HolderProcess:
    """tests/lease_holder.py: a process holding the lease of runs/run."""

    def __init__(self, storage: Storage, endpoint: str, *extra: str):
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "lease_holder.py"), storage.uri, endpoint, "run", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = self.process.stdout.readline()
        assert line.startswith("acquired"), line + self.process.stderr.read()
        self.generation = int(line.split()[1])

    def __enter__(self) -> HolderProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        self.process.wait()


def test_compare_and_swap_refuses_a_stale_version(store):
    storage, _ = store
    path = storage.path("run", LEASE_FILE)
    storage.write_bytes(path, b"one", create_only=True)
    first = read_versioned(storage, path)
    second = replace_if(storage, path, b"two", first.version)
    with pytest.raises(VersionConflict):
        replace_if(storage, path, b"three", first.version)
    assert replace_if(storage, path, b"two", first.version) == second, "our own earlier try that landed counts"
    assert read_versioned(storage, path) == read_versioned(storage, path)
    assert storage.read_bytes(path) == b"two"


def test_first_driver_creates_generation_one_a_second_is_refused_and_a_release_hands_over(store):
    storage, _ = store
    with Lease(storage, storage.path("run")) as first:
        assert first.generation == 1 and holder_of(storage).owner == first.owner
        started = time.monotonic()
        with pytest.raises(UserError, match="being driven by .* pid"):
            Lease(storage, storage.path("run")).acquire()
        assert time.monotonic() - started < STALE, "refused as soon as the holder renewed"
    assert holder_of(storage).released, "kept (its generation counts on) and marked released"
    started = time.monotonic()
    with Lease(storage, storage.path("run")) as second:
        assert second.generation == 2
    assert time.monotonic() - started < STALE, "a released lease is taken at once"


@pytest.mark.parametrize("taken", [False, True], ids=["empty", "released"])
def test_of_racing_contenders_exactly_one_wins(store, taken):
    storage, endpoint = store
    if storage.uri.startswith("s3://"):
        pytest.skip("moto checks a condition and then writes, without a lock: racing conditional PUTs may both "
                    "pass there (S3 itself serialises them; four runs of it with one shared client all held on moto); "
                    "the refusal of a stale version is tested above")
    if taken:
        Lease(storage, storage.path("run")).__enter__().release()
    barrier, outcomes, leases = threading.Barrier(6), [], []

    def contend():  # each with its own client, as separate drivers have
        own = open_storage(storage.uri, None if endpoint == "-" else endpoint)
        lease = Lease(own, own.path("run"))
        barrier.wait()
        try:
            lease.acquire()
            leases.append(lease)
            outcomes.append("won")
        except UserError as error:
            outcomes.append(str(error))

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    try:
        assert outcomes.count("won") == 1, outcomes
        assert all("same moment" in outcome or "being driven" in outcome for outcome in outcomes if outcome != "won")
        assert holder_of(storage).owner == leases[0].owner
        assert leases[0].generation == (2 if taken else 1)
    finally:
        for lease in leases:
            lease.release()


def test_a_paused_driver_is_taken_over_on_the_readers_clock_and_stops_when_it_wakes(store):
    storage, endpoint = store
    with HolderProcess(storage, endpoint) as old:
        with pytest.raises(UserError, match=f"pid {old.process.pid}"):
            Lease(storage, storage.path("run")).acquire()  # alive: it renews
        old.process.send_signal(signal.SIGSTOP)  # paused, or cut off from the store: its lease stands still
        started = time.monotonic()
        new = Lease(storage, storage.path("run"))
        new.acquire()
        try:
            assert time.monotonic() - started >= STALE, "taken over only after standing still for the stale period"
            assert new.generation == old.generation + 1
            old.process.send_signal(signal.SIGCONT)
            assert old.process.wait(timeout=30) == 3, "the old driver stops when its renewal is refused"
            assert old.process.stdout.read().strip() == "lost"
            assert "another driver" in old.process.stderr.read()
            time.sleep(3 * HEARTBEAT)
            assert holder_of(storage).owner == new.owner, "the old driver wrote nothing after losing"
            new.fence().check(storage)
            with pytest.raises(Superseded, match=f"generation {new.generation}"):
                Fence(new.path, old.generation).check(storage)
        finally:
            new.release()


def test_a_live_driver_whose_clock_runs_slow_is_not_taken_over(tmp_path):
    storage = open_storage(str(tmp_path / "runs"))
    with HolderProcess(storage, "-", "--clock-offset", "-90"):
        with pytest.raises(UserError, match="being driven by"):
            Lease(storage, storage.path("run")).acquire()


def test_a_driver_gone_from_this_host_is_taken_over_at_once(tmp_path):
    storage = open_storage(str(tmp_path / "runs"))
    with HolderProcess(storage, "-") as old:
        old.process.kill()
        old.process.wait()
        started = time.monotonic()
        with Lease(storage, storage.path("run")) as new:
            assert new.generation == 2
        assert time.monotonic() - started < STALE / 2, "the pid shortcut: no stale period to wait out"


def test_a_stale_driver_on_another_host_is_taken_over_after_the_stale_period(tmp_path):
    storage = open_storage(str(tmp_path / "runs"))
    record = Holder(generation=4, owner="x", host="another-host", pid=1, beat=7)
    storage.write_bytes(storage.path("run", LEASE_FILE), record.dumps())
    started = time.monotonic()
    with Lease(storage, storage.path("run")) as new:
        assert new.generation == 5
    assert time.monotonic() - started >= STALE


def test_a_lease_written_before_generations_counts_as_generation_zero(tmp_path):
    storage = open_storage(str(tmp_path / "runs"))
    old = {"owner": "x", "host": "another-host", "pid": 1, "heartbeat": time.time()}
    storage.write_bytes(storage.path("run", LEASE_FILE), json.dumps(old).encode())
    with Lease(storage, storage.path("run")) as new:
        assert new.generation == 1


def test_a_removed_lease_restarts_above_the_newest_recorded_generation(tmp_path):
    storage = open_storage(str(tmp_path / "runs"))
    Fence(storage.path("run", LEASE_FILE), 7).record_start(storage, storage.path("run"), 40)
    with Lease(storage, storage.path("run")) as new:
        assert new.generation == 8, "never below a generation whose fence would hide the new driver's commits"


@pytest.mark.parametrize("content", [b"[1, 2]", b'{"owner": "x", "host": "h", "pid": "12"}', b'"text"',
                                     b"[" * 100_000, b"{" + b" " * 10_000 + b"}", b"\xff\xfe"])
def test_a_lease_file_segjob_did_not_write_is_one_line_and_left_alone(tmp_path, content):
    storage = open_storage(str(tmp_path / "runs"))
    path = storage.path("run", LEASE_FILE)
    storage.write_bytes(path, content)
    with pytest.raises(UserError) as caught:
        Lease(storage, storage.path("run")).acquire()
    message = str(caught.value)
    assert "\n" not in message and len(message) < 300 and message.startswith(path)
    assert "not a lease segjob wrote" in message
    assert storage.read_bytes(path) == content


def test_a_bad_lease_setting_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(STALE_ENV, "soon")
    storage = open_storage(str(tmp_path / "runs"))
    with pytest.raises(UserError, match=f"{STALE_ENV}='soon': must be a number of seconds"):
        Lease(storage, storage.path("run")).acquire()


# --- fencing: readers ignore what a superseded driver committed -------------------------


def commit(storage: Storage, tmp_path: Path, step: int, generation: int, value: float) -> checkpoint.CheckpointInfo:
    folder = tmp_path / f"payload-{step}-{generation}"
    checkpoint.write_local(folder, {"w": __import__("torch").full((4,), value)}, {"step": step}, [{"step": step}])
    meta = checkpoint.build_meta(folder, job={"name": "run"}, step=step, epoch=1, metrics={"val/miou": value},
                                 reason="test", generation=generation)
    return checkpoint.commit(storage, storage.path("run"), folder, meta)


def test_commits_a_superseded_driver_made_after_the_takeover_are_invisible(store, tmp_path):
    storage, _ = store
    run = storage.path("run")
    for step in (10, 20):
        commit(storage, tmp_path, step, generation=1, value=0.1)
    Fence(storage.path("run", LEASE_FILE), 2).record_start(storage, run, 20)  # generation 2 resumed from step 20
    zombie = commit(storage, tmp_path, 30, generation=1, value=0.99)  # the old driver's workers go on
    assert read_fences(storage, run) == {2: 20}
    assert [info.step for info in checkpoint.list_committed(storage, run)] == [10, 20], "resume never sees it"
    assert checkpoint.latest(storage, run).step == 20
    best = checkpoint.select_best(checkpoint.list_committed(storage, run), "val/miou", "max")
    assert best[0].step != 30, "pull and evaluate never rank it, however good its figures"
    assert [info.step for info in checkpoint.list_committed(storage, run, with_superseded=True)] == [10, 20, 30]

    ours = commit(storage, tmp_path, 30, generation=2, value=0.5)  # the new driver reaches the same step
    assert ours.generation == 2 and ours.meta_sha256 != zombie.meta_sha256
    assert checkpoint.latest(storage, run).meta_sha256 == ours.meta_sha256
    assert checkpoint.verify(storage, ours) is None
    assert storage.list_dirs(f"{run}/{checkpoint.QUARANTINE_DIR}"), "the zombie's commit is kept aside, not deleted"


def test_a_superseded_driver_cleans_nothing_up(tmp_path):
    storage = open_storage(str(tmp_path / "runs"))
    run = storage.path("run")
    for step in (10, 20, 30):
        commit(storage, tmp_path, step, generation=1, value=step / 100)
    storage.write_bytes(f"{run}/lease.json", Holder(2, "new", "another-host", 1).dumps())
    stale = Fence(f"{run}/lease.json", 1)
    before = storage.files(run)
    with pytest.raises(Superseded):
        checkpoint.apply_retention(storage, run, keep_best=1, metric="val/miou", mode="max", fence=stale)
    storage.write_bytes(f"{checkpoint.checkpoints_path(run)}/step-000000040/attempt-{'0' * 32}/model.safetensors",
                        b"abandoned upload")
    with pytest.raises(Superseded):
        checkpoint.remove_uncommitted(storage, run, grace_s=0, fence=stale)
    assert set(storage.files(run)) - set(before) == {f"checkpoints/step-000000040/attempt-{'0' * 32}/model.safetensors"}
    assert checkpoint.remove_uncommitted(storage, run, grace_s=0, fence=Fence(f"{run}/lease.json", 2))


def test_a_fence_record_segjob_did_not_write_is_skipped(tmp_path):
    storage = open_storage(str(tmp_path / "runs"))
    run = storage.path("run")
    storage.write_bytes(fence_path(run, 3), b'{"generation": "3", "from_step": 0}')
    storage.write_bytes(fence_path(run, 4), json.dumps({"generation": 5, "from_step": 0}).encode())
    storage.write_bytes(f"{run}/fences/gen-000000006.json", b"[" * 50_000)
    Fence("lease.json", 7).record_start(storage, run, 12)
    Fence("lease.json", 7).record_start(storage, run, 99)  # a restarted worker group of the same generation
    assert read_fences(storage, run) == {7: 12}
