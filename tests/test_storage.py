"""segjob.store.storage against a local folder, S3 (moto's server) and GCS (the emulator)."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import time

import pytest
from servers import closed_port_url

from segjob.errors import UserError
from segjob.store import storage as storage_module
from segjob.store.storage import is_transient, open_storage, retry, worker_env_vars

BACKENDS = ["local", "s3", "gcs"]


def _open(request, backend: str, base) -> storage_module.Storage:
    if backend == "local":
        return open_storage(str(base / "runs"))
    if backend == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return open_storage(f"s3://{bucket}/runs", request.getfixturevalue("s3_endpoint"))
    bucket = request.getfixturevalue("gcs_bucket")
    return open_storage(f"gs://{bucket}/runs", request.getfixturevalue("gcs_endpoint"))


@pytest.fixture(params=BACKENDS)
def storage(request, tmp_path):
    return _open(request, request.param, tmp_path)


def _write_tree(folder, files: dict[str, bytes]) -> list[str]:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return list(files)


def _siblings(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir()) if path.parent.exists() else []


TREE = {
    "model.safetensors": os.urandom(3000),
    "nested/deeper/state.pt": b"state",
    "nested/history.jsonl": b'{"step": 1}\n',
    "empty.bin": b"",
    "meta.json": b"{}",
}


# --- opening ----------------------------------------------------------------------------


def test_uri_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = open_storage("./runs")
    assert (local.uri, local.root, local.is_local) == (str(tmp_path / "runs"), str(tmp_path / "runs"), True)
    assert open_storage(f"file://{tmp_path}/x/").root == str(tmp_path / "x")
    assert local.path("a", "b/") == f"{tmp_path}/runs/a/b"

    s3 = open_storage("s3://bucket/some/prefix/", "http://127.0.0.1:1")
    assert (s3.uri, s3.root, s3.is_local) == ("s3://bucket/some/prefix", "bucket/some/prefix", False)
    assert s3.path("run", "ckpt") == "bucket/some/prefix/run/ckpt"
    gcs = open_storage("gcs://bucket/p", "127.0.0.1:1")
    assert (gcs.uri, gcs.root, gcs.endpoint_url) == ("gs://bucket/p", "bucket/p", "http://127.0.0.1:1")

    for bad in ("ftp://host/x", "s3://", "gs:///x"):
        with pytest.raises(UserError):
            open_storage(bad)


def test_endpoint_from_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
    assert open_storage("s3://b").endpoint_url == "http://127.0.0.1:2"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:3")
    assert open_storage("s3://b").endpoint_url == "http://127.0.0.1:3"
    assert open_storage("s3://b", "http://127.0.0.1:4").endpoint_url == "http://127.0.0.1:4"


def test_storages_with_different_endpoints_do_not_share_a_filesystem():
    first = open_storage("s3://bucket/p", "http://127.0.0.1:1")
    second = open_storage("s3://bucket/p", "http://127.0.0.1:2")
    assert first.fs is not second.fs
    assert first.fs.endpoint_url != second.fs.endpoint_url


def test_local_storage_does_not_import_cloud_clients(tmp_path):
    code = (
        "import sys, segjob.store.storage as s; st = s.open_storage(sys.argv[1]); st.check(); "
        "st.write_bytes(st.path('x'), b'1'); "
        "assert not {'s3fs', 'gcsfs', 'botocore'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "runs")], check=True)


def test_gcsfs_imported_before_the_flag_still_gives_the_plain_filesystem():
    """If gcsfs was imported with its experimental default (which hangs on emulators),
    open_storage still uses the plain GCSFileSystem once the flag says false."""
    code = (
        "import gcsfs, gcsfs.core, segjob.store.storage as s; "
        "assert gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem; "
        "st = s.open_storage('gs://bucket/x', 'http://127.0.0.1:1'); "
        "assert type(st.fs) is gcsfs.core.GCSFileSystem, type(st.fs)"
    )
    env = {k: v for k, v in os.environ.items() if k != "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_moto_server_process_helper(s3_env):
    """The separate-process moto server others use for driver-kill tests."""
    from servers import create_s3_bucket, start_moto_process, stop_process

    url, process = start_moto_process()
    try:
        create_s3_bucket(url, "segjob-process-test")
        storage = open_storage("s3://segjob-process-test/runs", url)
        storage.check()
        storage.write_bytes(storage.path("a"), b"1")
        assert storage.read_bytes(storage.path("a")) == b"1"
    finally:
        stop_process(process)
    assert process.returncode is not None
    with pytest.raises(UserError, match="cannot reach"):
        open_storage("s3://segjob-process-test/runs", url).check()


def test_pickle_rebuilds_instead_of_copying(s3_endpoint, s3_bucket):
    storage = open_storage(f"s3://{s3_bucket}/runs", s3_endpoint)
    storage.write_bytes(storage.path("a"), b"1")
    copy = pickle.loads(pickle.dumps(storage))
    assert (copy.uri, copy.endpoint_url) == (storage.uri, storage.endpoint_url)
    assert copy.fs is not storage.fs
    assert copy.read_bytes(copy.path("a")) == b"1"


# --- round trips ------------------------------------------------------------------------


def test_bytes_exists_list_rm(storage):
    storage.write_bytes(storage.path("run", "ckpt_1", "meta.json"), b"one")
    storage.write_bytes(storage.path("run", "ckpt_2", "deep", "x.bin"), b"two")
    storage.write_bytes(storage.path("run", "history.jsonl"), b"three")

    assert storage.read_bytes(storage.path("run", "ckpt_1", "meta.json")) == b"one"
    assert storage.exists(storage.path("run", "ckpt_2", "deep", "x.bin"))
    assert storage.exists(storage.path("run", "ckpt_1"))
    assert not storage.exists(storage.path("run", "ckpt_3"))
    assert storage.list_dirs(storage.path("run")) == ["ckpt_1", "ckpt_2"]
    assert storage.list_dirs(storage.path()) == ["run"]
    assert storage.list_dirs(storage.path("missing")) == []

    storage.write_bytes(storage.path("run", "ckpt_1", "meta.json"), b"replaced")
    assert storage.read_bytes(storage.path("run", "ckpt_1", "meta.json")) == b"replaced"

    storage.rm(storage.path("run", "ckpt_2"))
    assert storage.list_dirs(storage.path("run")) == ["ckpt_1"]
    assert not storage.exists(storage.path("run", "ckpt_2", "deep", "x.bin"))
    storage.rm(storage.path("run", "ckpt_2"))  # already gone: fine
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.path("run", "nope.json"))


def test_listing_sees_writes_by_another_process(storage):
    assert storage.list_dirs(storage.path("run")) == []
    assert not storage.exists(storage.path("run", "a", "meta.json"))
    other = pickle.loads(pickle.dumps(storage))  # what another process would open
    other.write_bytes(other.path("run", "a", "meta.json"), b"{}")
    assert storage.list_dirs(storage.path("run")) == ["a"]
    assert storage.exists(storage.path("run", "a", "meta.json"))
    other.rm(other.path("run", "a"))
    assert storage.list_dirs(storage.path("run")) == []


def test_put_and_get_folder(storage, tmp_path):
    source = tmp_path / "source"
    files = _write_tree(source, TREE)
    storage.put_folder(source, storage.path("run", "ckpt"), files)
    storage.put_file(source / "meta.json", storage.path("run", "single.json"))
    assert storage.read_bytes(storage.path("run", "single.json")) == b"{}"

    dest = tmp_path / "out" / "best"
    storage.get_folder(storage.path("run", "ckpt"), dest)
    got = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == TREE
    assert _siblings(dest) == ["best"]

    # An existing destination is replaced as a whole.
    (dest / "stale.txt").write_bytes(b"old")
    storage.get_folder(storage.path("run", "ckpt"), dest)
    assert not (dest / "stale.txt").exists() and (dest / "meta.json").read_bytes() == b"{}"
    assert _siblings(dest) == ["best"]

    with pytest.raises(FileNotFoundError):
        storage.get_folder(storage.path("run", "missing"), tmp_path / "none")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_folder_placeholder_objects_are_ignored(request, backend, tmp_path):
    """Consoles and some tools create empty "folder/" objects; they are not sub-folders or files."""
    storage = _open(request, backend, tmp_path)
    storage.write_bytes(storage.path("run", "ckpt", "meta.json"), b"{}")
    for placeholder in ("", "run", "run/ckpt"):
        key = storage.path(placeholder).split("/", 1)[1] + "/"
        if backend == "s3":
            storage.fs.call_s3("put_object", Bucket=storage.bucket, Key=key, Body=b"")
        else:
            storage.fs.pipe_file(f"{storage.bucket}/{key}", b"")
    assert storage.list_dirs(storage.path()) == ["run"]
    assert storage.list_dirs(storage.path("run")) == ["ckpt"]
    storage.get_folder(storage.path("run"), tmp_path / "out")
    assert [str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")] == ["ckpt", "ckpt/meta.json"]


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_large_file_round_trip(request, backend, tmp_path):
    """8 MiB: past gcsfs's simple-upload limit (5 MiB), so its resumable upload runs."""
    storage = _open(request, backend, tmp_path)
    data = os.urandom(8 * 2**20)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.safetensors").write_bytes(data)
    storage.put_folder(tmp_path / "src", storage.path("ckpt"), ["model.safetensors"])
    storage.get_folder(storage.path("ckpt"), tmp_path / "dst")
    assert (tmp_path / "dst" / "model.safetensors").read_bytes() == data


def test_put_folder_keeps_the_given_order(tmp_path, monkeypatch):
    storage = open_storage(str(tmp_path / "runs"))
    _write_tree(tmp_path / "source", TREE)
    order = ["nested/deeper/state.pt", "model.safetensors", "meta.json"]
    uploaded = []
    monkeypatch.setattr(storage, "put_file", lambda local, path: uploaded.append(path))
    storage.put_folder(tmp_path / "source", storage.path("ckpt"), order)
    assert uploaded == [storage.path("ckpt", name) for name in order]
    with pytest.raises(UserError):
        storage.put_folder(tmp_path / "source", storage.path("ckpt"), ["../outside"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_get_folder_is_atomic_when_a_download_fails(request, backend, tmp_path, monkeypatch):
    """Another process deletes a file while get_folder runs: the real 404 (or missing
    local file) must leave neither a partial destination nor a temporary folder."""
    storage = _open(request, backend, tmp_path)
    files = _write_tree(tmp_path / "source", TREE)
    folder = storage.path("run", "ckpt")
    storage.put_folder(tmp_path / "source", folder, files)
    other = pickle.loads(pickle.dumps(storage))
    real_get_file = storage.fs.get_file
    calls = []

    def get_file_while_another_process_deletes(rpath, lpath, **kwargs):
        if not calls:
            other.rm(other.path("run", "ckpt", "nested", "history.jsonl"))
        calls.append(rpath)
        return real_get_file(rpath, lpath, **kwargs)

    monkeypatch.setattr(storage.fs, "get_file", get_file_while_another_process_deletes)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with pytest.raises(FileNotFoundError):
        storage.get_folder(folder, downloads / "fresh")
    assert len(calls) >= 2  # it failed midway, after a successful download
    assert os.listdir(downloads) == []

    (downloads / "existing").mkdir()
    (downloads / "existing" / "keep.txt").write_bytes(b"mine")
    calls.clear()
    restored = other.path("run", "ckpt", "nested", "history.jsonl")
    other.put_file(tmp_path / "source" / "nested" / "history.jsonl", restored)
    with pytest.raises(FileNotFoundError):
        storage.get_folder(folder, downloads / "existing")
    assert os.listdir(downloads) == ["existing"]
    assert os.listdir(downloads / "existing") == ["keep.txt"]


@pytest.mark.parametrize(
    "backend, bad_key",
    [
        ("s3", "ckpt/../escape.txt"),
        ("s3", "ckpt/sub/../../escape.txt"),
        ("s3", "ckpt//etc/passwd"),
        ("gcs", "ckpt//etc/passwd"),
    ],
)
def test_get_folder_refuses_unsafe_keys(request, backend, bad_key, tmp_path):
    # The GCS emulator itself rejects object names with '..', so only S3 stores those.
    storage = _open(request, backend, tmp_path)
    storage.write_bytes(storage.path("ckpt", "good.txt"), b"fine")
    storage.fs.pipe_file(storage.path(bad_key), b"evil")  # straight to the fs: no checks
    with pytest.raises(UserError, match="unsafe key"):
        storage.get_folder(storage.path("ckpt"), tmp_path / "dest" / "ckpt")
    assert not (tmp_path / "dest").exists() or os.listdir(tmp_path / "dest") == []
    assert not (tmp_path / "escape.txt").exists()


# --- check() ----------------------------------------------------------------------------


def test_check_creates_a_local_root(tmp_path):
    open_storage(str(tmp_path / "a" / "b")).check()
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        open_storage(str(tmp_path / "file")).check()


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_check_existing_and_missing_bucket(request, backend, tmp_path):
    storage = _open(request, backend, tmp_path)
    storage.check()
    scheme = "s3" if backend == "s3" else "gs"
    endpoint = request.getfixturevalue(f"{backend}_endpoint")
    missing = open_storage(f"{scheme}://segjob-no-such-bucket/runs", endpoint)
    with pytest.raises(UserError) as caught:
        missing.check()
    message = str(caught.value)
    assert "segjob-no-such-bucket" in message and "does not exist" in message and "\n" not in message


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_check_unreachable_endpoint_fails_fast(scheme):
    # userinfo in the URL must not reach the message
    endpoint = closed_port_url().replace("http://", "http://user:hunter2@")
    storage = open_storage(f"{scheme}://some-bucket/runs", endpoint)
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        storage.check()
    assert time.monotonic() - started < 20
    message = str(caught.value)
    assert f"{scheme}://some-bucket/runs" in message and "cannot reach" in message
    assert "hunter2" not in message and "\n" not in message


def test_check_bounded_when_the_probe_hangs(monkeypatch):
    """A server that accepts connections but never answers still gives one quick line."""
    storage = open_storage("s3://some-bucket/runs", "http://127.0.0.1:1")
    monkeypatch.setattr(storage_module, "CHECK_TIMEOUT_S", 0.5)
    monkeypatch.setattr(storage_module, "_tcp_unreachable", lambda url: None)
    monkeypatch.setattr(storage, "_probe_bucket", lambda: time.sleep(30))
    started = time.monotonic()
    with pytest.raises(UserError, match="no answer"):
        storage.check()
    assert time.monotonic() - started < 5


def _no_credentials():
    from botocore.exceptions import NoCredentialsError

    return NoCredentialsError()


def _gcs_unauthorized():
    from gcsfs.retry import HttpError

    return HttpError({"code": 401, "message": "Anonymous caller does not have storage.buckets.get access"})


@pytest.mark.parametrize(
    "make_error, expected",
    [
        (lambda: PermissionError("Access Denied"), "denied"),
        (lambda: OSError("Forbidden: some-bucket\nno access"), "denied"),
        (_gcs_unauthorized, "denied"),
        (_no_credentials, "no credentials"),
        (lambda: RuntimeError("weird\nfailure"), "cannot use bucket"),
    ],
)
def test_check_turns_probe_errors_into_one_line(monkeypatch, make_error, expected):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    storage = open_storage("s3://some-bucket/runs")  # no endpoint: no TCP pre-check

    def probe():
        raise make_error()

    monkeypatch.setattr(storage, "_probe_bucket", probe)
    with pytest.raises(UserError) as caught:
        storage.check()
    message = str(caught.value)
    assert expected in message and "s3://some-bucket/runs" in message and "\n" not in message


def test_check_does_not_print_credentials(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    with pytest.raises(UserError) as caught:
        open_storage("s3://segjob-no-such-bucket/x", s3_endpoint).check()
    assert "very-secret-value" not in str(caught.value)


# --- retry() ----------------------------------------------------------------------------


def test_retry_recovers_from_transient_errors(caplog):
    calls = []

    def flaky(value, *, suffix):
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        return value + suffix

    with caplog.at_level(logging.WARNING, logger="segjob.store.storage"):
        assert retry(flaky, "ok", suffix="!", base_delay=0.001, what="flaky thing") == "ok!"
    assert len(calls) == 3
    assert len([r for r in caplog.records if "flaky thing" in r.getMessage()]) == 2


def test_retry_does_not_retry_permanent_errors():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        retry(missing, base_delay=0.001)
    assert len(calls) == 1


def test_retry_gives_up_with_the_last_error():
    calls = []

    def always_down():
        calls.append(1)
        raise TimeoutError(f"timeout {len(calls)}")

    with pytest.raises(TimeoutError, match="timeout 3"):
        retry(always_down, attempts=3, base_delay=0.001)
    assert len(calls) == 3


def test_retry_budget_defaults_come_from_the_module(monkeypatch):
    """Tests (and tuning) lower the budget in one place; explicit arguments still win."""
    monkeypatch.setattr(storage_module, "RETRY_ATTEMPTS", 2)
    monkeypatch.setattr(storage_module, "RETRY_BASE_DELAY_S", 0.001)
    calls = []

    def always_down():
        calls.append(1)
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        retry(always_down)
    assert len(calls) == 2
    with pytest.raises(ConnectionError):
        retry(always_down, attempts=3)
    assert len(calls) == 5


def test_transient_classification():
    from botocore.exceptions import ClientError, EndpointConnectionError
    from gcsfs.retry import HttpError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert is_transient(client_error("SlowDown", 503))
    assert is_transient(client_error("InternalError", 500))
    assert not is_transient(client_error("NoSuchKey", 404))
    assert not is_transient(client_error("AccessDenied", 403))
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(HttpError({"code": 503, "message": "backend"}))
    assert not is_transient(HttpError({"code": 400, "message": "bad"}))
    assert is_transient(OSError("something on the wire"))
    for permanent in (PermissionError("no"), IsADirectoryError("d"), FileExistsError("f"), ValueError("v")):
        assert not is_transient(permanent)


# --- Ray glue ---------------------------------------------------------------------------


def test_worker_env_vars_never_include_secrets(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/creds.json")
    monkeypatch.delenv("AWS_REGION", raising=False)
    env = worker_env_vars()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert "AWS_REGION" not in env
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS"} & set(env)
