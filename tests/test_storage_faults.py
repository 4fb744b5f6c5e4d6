"""Storage under real faults: moto's S3 server behind a loopback TCP proxy (tests/proxy.py)
that the tests cut and restore, plus create-only writes on every store.

What must hold (issue 4, "Atomic commit and storage faults"):
- an upload cut midway raises after its bounded retries and never leaves a folder that
  looks committed (no meta.json); the next commit after the network is back succeeds and
  the orphan is found and removed;
- a cut shorter than the retry budget is absorbed by `retry`;
- meta.json can be written create-only: a second writer gets FileExistsError, and a retry
  whose first answer was lost does not.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from faults import in_thread
from proxy import TcpProxy, wait_for

from segjob.store import checkpoint
from segjob.store import storage as storage_module
from segjob.store.storage import open_storage

RUN = "run"


@pytest.fixture
def small_budget(monkeypatch):
    """Retry budgets small enough that a lasting cut fails in about a second.
    Set before open_storage: botocore's own attempts are fixed when the client is built."""
    monkeypatch.setattr(storage_module, "RETRY_ATTEMPTS", 3)
    monkeypatch.setattr(storage_module, "RETRY_BASE_DELAY_S", 0.05)
    monkeypatch.setattr(storage_module, "S3_CLIENT_ATTEMPTS", 1)


@pytest.fixture
def s3_pair(s3_endpoint, s3_bucket, proxy):
    """Opens (storage through the proxy, storage straight to moto that the test watches
    with); a function, so that budgets patched by the test apply to the clients."""
    uri = f"s3://{s3_bucket}/runs"
    return lambda: (open_storage(uri, proxy.url), open_storage(uri, s3_endpoint))


def _payload(tmp_path: Path, step: int, big: bool) -> tuple[Path, dict]:
    """A checkpoint folder; `big` makes model.safetensors and state.pt 4 MiB each."""
    torch.manual_seed(step)
    size = (1 << 20) if big else 16
    model_state = {"w": torch.randn(size), "b": torch.zeros(4)}
    train_state = {"progress": {"epoch": 1, "step": step, "position": 0}, "blob": torch.randn(size)}
    history = [{"step": s, "train/loss": 1.0 / s} for s in range(1, step + 1)]
    folder = tmp_path / f"local-{step}"
    checkpoint.write_local(folder, model_state, train_state, history)
    meta = checkpoint.build_meta(folder, job={"name": RUN}, step=step, epoch=1, metrics={"step": step}, reason="test")
    return folder, meta




# --- cuts -------------------------------------------------------------------------------


def test_cut_during_commit_leaves_nothing_committed_and_the_next_commit_works(s3_pair, proxy, small_budget, tmp_path):
    storage, watcher = s3_pair()
    run_path = storage.path(RUN)
    first = f"{checkpoint.checkpoints_path(run_path)}/{checkpoint.checkpoint_name(1)}"
    folder, meta = _payload(tmp_path, step=1, big=True)

    proxy.delay(0.01)  # >= 0.64 s per 4 MiB file: a wide "upload in progress" window
    thread, outcome = in_thread(checkpoint.commit, storage, run_path, folder, meta)
    # Cut once model.safetensors has landed, while state.pt (4 MiB) is on the wire.
    assert wait_for(lambda: any(key.endswith(f"/{checkpoint.MODEL_FILE}") for key in watcher.files(first)), timeout=20)
    proxy.cut()
    cut_at = time.monotonic()
    thread.join(timeout=30)  # the cut lasts until commit has given up
    assert not thread.is_alive(), "commit did not give up within its retry budget"
    assert time.monotonic() - cut_at < 15
    error = outcome.get("error")
    assert error is not None, "commit succeeded through a cut network"
    assert storage_module.is_transient(error), repr(error)

    stored = sorted(name.rsplit("/", 1)[-1] for name in watcher.fs.find(first))
    assert checkpoint.MODEL_FILE in stored and checkpoint.META_FILE not in stored
    assert checkpoint.list_committed(watcher, run_path) == []

    proxy.restore()
    proxy.delay(0)
    # The same storage object (its pooled connections were reset) commits the next one.
    folder2, meta2 = _payload(tmp_path, step=2, big=False)
    checkpoint.commit(storage, run_path, folder2, meta2)
    [committed] = checkpoint.list_committed(storage, run_path)
    assert committed.step == 2
    loaded = checkpoint.load(storage, committed, expected_run=RUN)
    assert loaded.train_state["progress"]["step"] == 2 and [r["step"] for r in loaded.history] == [1, 2]

    assert checkpoint.list_uncommitted(storage, run_path) == [checkpoint.checkpoint_name(1)]
    assert checkpoint.remove_uncommitted(storage, run_path, grace_s=0) == [checkpoint.checkpoint_name(1)]
    assert not watcher.exists(first)
    assert [info.step for info in checkpoint.list_committed(storage, run_path)] == [2]


def test_cut_shorter_than_the_retry_budget_is_absorbed(s3_pair, proxy, monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(storage_module, "RETRY_ATTEMPTS", 8)
    monkeypatch.setattr(storage_module, "RETRY_BASE_DELAY_S", 0.2)  # sleeps sum to >= 3 s before the last try
    monkeypatch.setattr(storage_module, "S3_CLIENT_ATTEMPTS", 1)
    storage, watcher = s3_pair()
    storage.write_bytes(storage.path("warm"), b"connection pool in use")

    proxy.cut()
    timer = threading.Timer(1.0, proxy.restore)
    timer.start()
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="segjob.store.storage"):
            storage.write_bytes(storage.path("a", "meta.json"), b"after the cut", create_only=True)
    finally:
        timer.join()
    assert time.monotonic() - started >= 0.9  # it really waited the cut out
    assert any("retry" in record.getMessage() for record in caplog.records)
    assert watcher.read_bytes(watcher.path("a", "meta.json")) == b"after the cut"

    # Folder uploads and reads ride out a short cut the same way.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("x.bin", "y.bin"):
        (source / name).write_bytes(os.urandom(1000))
    proxy.cut()
    timer = threading.Timer(0.5, proxy.restore)
    timer.start()
    try:
        storage.put_folder(source, storage.path("folder"), ["x.bin", "y.bin"])
    finally:
        timer.join()
    storage.get_folder(storage.path("folder"), tmp_path / "back")
    assert (tmp_path / "back" / "y.bin").read_bytes() == (source / "y.bin").read_bytes()


def test_a_lost_answer_to_a_create_only_write_is_not_a_conflict(s3_pair, proxy, small_budget):
    """The PUT lands, its answer is lost (connection reset), the client retries: S3 answers
    412 to our own retry. write_bytes sees its own bytes there and reports success."""
    storage, watcher = s3_pair()
    meta = storage.path("ckpt", "meta.json")

    # What the raw client does: a lone writer is told the object already exists.
    proxy.reset_next_response(b"PUT ")
    with pytest.raises(FileExistsError):
        storage.fs.pipe_file(storage.path("raw", "meta.json"), b"only writer", mode="create")
    assert watcher.read_bytes(watcher.path("raw", "meta.json")) == b"only writer"

    conflicts = []
    real_pipe_file = storage.fs.pipe_file

    def spy(path, data, **kwargs):
        try:
            return real_pipe_file(path, data, **kwargs)
        except FileExistsError:
            conflicts.append(path)
            raise

    storage.fs.pipe_file = spy
    proxy.reset_next_response(b"PUT ")
    storage.write_bytes(meta, b'{"step": 1}', create_only=True)
    assert conflicts == [meta]  # the 412 did come back ...
    assert watcher.read_bytes(meta) == b'{"step": 1}'  # ... for our own write
    with pytest.raises(FileExistsError):  # another writer still can't replace it
        storage.write_bytes(meta, b'{"step": 1, "other": true}', create_only=True)
    assert watcher.read_bytes(meta) == b'{"step": 1}'


def test_proxy_cut_refuses_at_once_and_restore_keeps_the_port(s3_endpoint):
    import socket

    target = urlsplit(s3_endpoint)
    with TcpProxy(target.hostname, target.port) as proxy:
        port = proxy.port
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        held = socket.create_connection(("127.0.0.1", port), timeout=2)
        held.sendall(b"GET /moto-api/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held.recv(12).startswith(b"HTTP/1.")
        assert wait_for(lambda: proxy.bytes_up > 0 and proxy.bytes_down > 0, timeout=2)  # counted just after forwarding
        proxy.cut()
        assert proxy.is_cut
        held.settimeout(2)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(100):  # the rest of the answer, then the reset
                if not held.recv(65536):
                    raise BrokenPipeError("closed without a reset")
        held.close()
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
        assert time.monotonic() - started < 1
        proxy.restore()
        assert proxy.port == port
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert proxy.is_cut
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


# --- create-only writes -----------------------------------------------------------------


def _open(request, backend: str, tmp_path: Path):
    if backend == "local":
        return open_storage(str(tmp_path / "runs"))
    if backend == "s3":
        return open_storage(f"s3://{request.getfixturevalue('s3_bucket')}/runs", request.getfixturevalue("s3_endpoint"))
    return open_storage(f"gs://{request.getfixturevalue('gcs_bucket')}/runs", request.getfixturevalue("gcs_endpoint"))


@pytest.mark.parametrize("backend", ["local", "s3", "gcs"])
def test_create_only_refuses_to_replace(request, backend, tmp_path, caplog):
    storage = _open(request, backend, tmp_path)
    path = storage.path(RUN, "checkpoints", "step-000000001", "meta.json")
    storage.write_bytes(path, b"first", create_only=True)
    with caplog.at_level(logging.WARNING, logger="segjob.store.storage"):
        with pytest.raises(FileExistsError) as caught:
            storage.write_bytes(path, b"second", create_only=True)
    assert path in str(caught.value)
    assert not [r for r in caplog.records if r.name == "segjob.store.storage"]  # refused at once, never retried
    assert storage.read_bytes(path) == b"first"
    storage.write_bytes(path, b"first", create_only=True)  # the same bytes: already written
    storage.write_bytes(path, b"replaced")  # a plain write still replaces
    assert storage.read_bytes(path) == b"replaced"
    if backend == "local":  # no temporary siblings left behind
        assert os.listdir(os.path.dirname(path)) == ["meta.json"]


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_create_only_sends_the_conditional_request(request, backend, tmp_path, monkeypatch):
    storage = _open(request, backend, tmp_path)
    calls = []
    real = storage.fs.pipe_file
    monkeypatch.setattr(storage.fs, "pipe_file", lambda path, data, **kw: calls.append(kw) or real(path, data, **kw))
    storage.write_bytes(storage.path("meta.json"), b"{}", create_only=True)
    assert calls == [{"mode": "create"}]  # S3: If-None-Match: *; GCS: ifGenerationMatch=0


def test_gcs_server_refuses_a_second_create(gcs_endpoint, gcs_bucket):
    """fake-gcs-server honours gcsfs's ifGenerationMatch=0 as GCS does (412). gcp-storage-emulator, which
    the tests used before, replaced the object anyway: a precondition test against it proved nothing."""
    storage = open_storage(f"gs://{gcs_bucket}/runs", gcs_endpoint)
    path = storage.path("meta.json")
    storage.fs.pipe_file(path, b"first", mode="create")
    with pytest.raises(FileExistsError):
        storage.fs.pipe_file(path, b"second", mode="create")
    assert storage.read_bytes(path) == b"first"


def test_local_create_only_has_one_winner_among_racing_writers(tmp_path):
    storage = open_storage(str(tmp_path / "runs"))
    path = storage.path("meta.json")
    barrier = threading.Barrier(8)
    results: dict[int, str] = {}

    def write(i):
        barrier.wait()
        try:
            storage.write_bytes(path, f"writer {i}".encode() * 1000, create_only=True)
            results[i] = "won"
        except FileExistsError:
            results[i] = "refused"

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [winner] = [i for i, result in results.items() if result == "won"]
    assert sorted(results.values()).count("refused") == 7
    assert Path(path).read_bytes() == f"writer {winner}".encode() * 1000
    assert os.listdir(os.path.dirname(path)) == ["meta.json"]


def test_local_create_only_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(storage_module.os, "link", no_links)
    storage = open_storage(str(tmp_path / "runs"))
    path = storage.path("meta.json")
    storage.write_bytes(path, b"first", create_only=True)
    with pytest.raises(FileExistsError):
        storage.write_bytes(path, b"second", create_only=True)
    assert Path(path).read_bytes() == b"first"
    assert os.listdir(os.path.dirname(path)) == ["meta.json"]
