"""Data in a bucket: copied once per node into a local cache, then read like a local folder.

    root = local_root("s3://bucket/datasets/camvid", endpoint_url=None)   # a Path in the cache
    path = local_file("gs://bucket/nyu/nyu_depth_v2_labeled.mat")          # the same, for one file
    root = local_root("/data/camvid")                                      # local paths pass through

The cache is $SEGJOB_DATA_CACHE, else $XDG_CACHE_HOME/segjob/data (~/.cache/segjob/data),
one folder per URI. Every process that builds a dataset calls this (the driver, each Ray
worker); a file lock makes the first one on a node download while the others wait, then
all read the same copy. A copy counts only once its completion marker is written, after
the download has been renamed into place: a half-copy left by a preempted node is never
used. The marker records the bucket listing (key, size, ETag or hash); when the bucket's
listing differs later, the copy is made again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from segjob.errors import UserError
from segjob.store.storage import open_storage, retry

log = logging.getLogger("segjob")

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")
MARKER_SUFFIX = ".complete.json"


def is_remote(location: str) -> bool:
    return location.startswith(REMOTE_SCHEMES)


def cache_dir() -> Path:
    if os.environ.get("SEGJOB_DATA_CACHE"):
        return Path(os.environ["SEGJOB_DATA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "segjob" / "data"


def local_root(location: str, endpoint_url: str | None = None) -> Path:
    """A local folder holding what `location` holds: itself when local, else the node's synced copy."""
    if not is_remote(location):
        return Path(location.removeprefix("file://")).expanduser()
    return _synced(location.rstrip("/"), endpoint_url, single_file=False)


def local_file(location: str, endpoint_url: str | None = None) -> Path:
    """A local path to the file at `location`: itself when local, else the node's synced copy."""
    if not is_remote(location):
        return Path(location.removeprefix("file://")).expanduser()
    folder = _synced(location, endpoint_url, single_file=True)
    return folder / location.rsplit("/", 1)[-1]


def _synced(uri: str, endpoint_url: str | None, single_file: bool) -> Path:
    storage = open_storage(uri, endpoint_url)
    listing = _listing(storage, single_file, uri)
    entry = cache_dir() / _entry_name(uri)
    marker = entry.with_name(entry.name + MARKER_SUFFIX)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _locked(entry.with_name(entry.name + ".lock")):
        if entry.is_dir() and _read_marker(marker) == {"uri": uri, "files": listing}:
            return entry
        _remove_partials(entry)
        marker.unlink(missing_ok=True)  # from here on the copy is not complete
        total = sum(size for size, _ in listing.values())
        log.info("data: copying %s to %s (%d files, %.1f MB), once per node", uri, entry, len(listing), total / 1e6)
        started = time.perf_counter()
        if single_file:
            _download_file(storage, entry, uri.rsplit("/", 1)[-1])
        else:
            storage.get_folder(storage.root, entry)  # into a temporary sibling, renamed when whole
        _write_marker(marker, {"uri": uri, "files": listing})
        log.info("data: copied %s in %.1f s", uri, time.perf_counter() - started)
    return entry


def _listing(storage, single_file: bool, uri: str) -> dict[str, list]:
    """{relative key: [size, version tag]} of what is stored at the URI."""
    try:
        if single_file:
            info = retry(storage.fs.info, storage.root, what=f"stat {uri}")
            found = {storage.root: info}
        else:
            found = retry(storage.fs.find, storage.root, detail=True, what=f"list {uri}")
    except FileNotFoundError:
        found = {}
    except Exception as error:  # noqa: BLE001 - credentials, endpoint, network: one line for the user
        raise UserError(f"data: cannot list {uri} ({type(error).__name__}: {error}); check the URI, "
                        "data.endpoint_url (or AWS_ENDPOINT_URL / STORAGE_EMULATOR_HOST) and the credentials") from None
    prefix = storage.root.rstrip("/") + "/"
    files = {}
    for name, info in found.items():
        if info.get("type") == "directory" or name.endswith("/"):
            continue
        key = name.rsplit("/", 1)[-1] if single_file else name[len(prefix):]
        files[key] = [int(info.get("size") or 0), _version_tag(info)]
    if not files:
        raise UserError(f"data: nothing is stored at {uri}; check the URI")
    return dict(sorted(files.items()))


def _version_tag(info: dict[str, Any]) -> str | None:
    """What changes when an object is rewritten: S3's ETag, GCS's md5/crc32c/generation."""
    for key in ("ETag", "etag", "md5Hash", "crc32c", "generation", "LastModified", "updated"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return None


def _entry_name(uri: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:60] or "data"
    return f"{readable}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def _download_file(storage, entry: Path, name: str) -> None:
    partial = entry.with_name(f".{entry.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        partial.mkdir(parents=True)
        retry(storage.fs.get_file, storage.root, str(partial / name), what=f"download {storage.uri}")
        if entry.exists():
            shutil.rmtree(entry)
        os.rename(partial, entry)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _remove_partials(entry: Path) -> None:
    """Leftovers of downloads (and marker writes) that died; we hold the lock, so none is running."""
    for leftover in entry.parent.glob(f".{entry.name}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _read_marker(marker: Path) -> dict | None:
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def _write_marker(marker: Path, content: dict) -> None:
    tmp = marker.with_name(f".{marker.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(content))
    os.replace(tmp, marker)


@contextmanager
def _locked(path: Path):
    """An exclusive lock between the processes of this node (released if the holder dies)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
