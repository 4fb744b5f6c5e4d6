"""Compare-and-swap on one stored object: read it with its version, replace it only if unchanged.

    version = create(storage, path, data)               # FileExistsError when something is there
    held = read_versioned(storage, path)                # None when nothing is there
    version = replace_if(storage, path, new_bytes, held.version)  # VersionConflict when someone wrote meanwhile

A version is whatever the store uses to say "this exact object":

- local: the sha256 of the bytes, compared under an exclusive lock (`<path>.lock`, flock) that every
  replace_if on that path takes, so read-compare-write is one step between processes of a machine;
- S3: the ETag, sent back as `If-Match` on PutObject (the store refuses with 412, or 409 when two
  conditional writes race);
- GCS: the object's generation, sent back as `ifGenerationMatch` on a JSON-API upload (412).

Creating an object only when absent is `Storage.write_bytes(..., create_only=True)`. Callers make
every value unique (the lease's beat counter), so a retried request whose first try landed is seen
for what it is: a conflict whose stored bytes are our own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from segjob.store.storage import Storage, retry


class VersionConflict(Exception):
    """The object is no longer the version the caller read (or is gone)."""


@dataclass(frozen=True)
class Versioned:
    data: bytes
    version: str


def read_versioned(storage: Storage, path: str) -> Versioned | None:
    """The object's bytes and version, read in one request; None when nothing is stored there."""
    try:
        return retry(_read, storage, path, what=f"read {path}")
    except FileNotFoundError:
        return None


def create(storage: Storage, path: str, data: bytes) -> str:
    """Create the object only if nothing is there (FileExistsError otherwise); returns its version."""
    storage.write_bytes(path, data, create_only=True)
    held = read_versioned(storage, path)
    if held is None or held.data != data:  # replaced (or removed) already, between our write and this read
        raise FileExistsError(errno.EEXIST, "replaced right after it was created", path)
    return held.version


def replace_if(storage: Storage, path: str, data: bytes, version: str) -> str:
    """Replace the object only if it is still `version` (VersionConflict otherwise); returns the new version."""
    try:
        return retry(_replace, storage, path, data, version, what=f"replace {path}")
    except VersionConflict:
        held = read_versioned(storage, path)
        if held is None or held.data != data:  # not our own earlier try that landed
            raise
        return held.version


def _read(storage: Storage, path: str) -> Versioned:
    if storage.is_local:
        data = Path(path).read_bytes()
        return Versioned(data, hashlib.sha256(data).hexdigest())
    if _scheme(storage) == "s3":
        return _s3_read(storage, path)
    return _gcs_read(storage, path)


def _replace(storage: Storage, path: str, data: bytes, version: str) -> str:
    if storage.is_local:
        return _local_replace(path, data, version)
    if _scheme(storage) == "s3":
        return _s3_replace(storage, path, data, version)
    return _gcs_replace(storage, path, data, version)


def _scheme(storage: Storage) -> str:
    return storage.uri.split("://", 1)[0]


def _local_replace(path: str, data: bytes, version: str) -> str:
    # the new bytes go to disk before the lock is taken: the locked part is a read and a rename, so a
    # process paused (or killed) inside it holds the lock for microseconds' worth of its work
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        with _locked(path):
            try:
                current = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            except FileNotFoundError:
                raise VersionConflict(f"{path}: gone") from None
            if current != version:
                raise VersionConflict(f"{path}: changed")
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    return hashlib.sha256(data).hexdigest()


LOCK_WAIT_S = 10.0


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive flock on `<path>.lock`; VersionConflict when another process holds it for LOCK_WAIT_S
    (stopped inside its compare-and-swap: what it was about to write is unknown, so nothing is replaced)."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise VersionConflict(f"{path}: locked by another process for {LOCK_WAIT_S:.0f} s") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# --- S3 ---------------------------------------------------------------------------------


def _s3_read(storage: Storage, path: str) -> Versioned:
    from fsspec.asyn import sync

    fs = storage.fs
    bucket, key, _ = fs.split_path(path)

    async def get() -> Versioned:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)  # NoSuchKey: FileNotFoundError
        try:
            data = await response["Body"].read()
        finally:
            response["Body"].close()
        return Versioned(data, response["ETag"])

    return sync(fs.loop, get)


def _s3_replace(storage: Storage, path: str, data: bytes, version: str) -> str:
    from botocore.exceptions import ClientError
    from fsspec.asyn import sync

    fs = storage.fs
    bucket, key, _ = fs.split_path(path)

    async def put() -> str:
        await fs.set_session()
        client = await fs.get_s3(bucket)
        try:  # the client itself, not s3fs's wrapper: that turns a failed If-Match into an anonymous EINVAL
            return (await client.put_object(Bucket=bucket, Key=key, Body=data, IfMatch=version))["ETag"]
        except ClientError as error:
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = error.response.get("Error", {}).get("Code")
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                raise VersionConflict(f"{path}: {code}") from None
            raise
        finally:
            fs.invalidate_cache(path)

    return sync(fs.loop, put)


# --- GCS --------------------------------------------------------------------------------


def _gcs_read(storage: Storage, path: str) -> Versioned:
    fs = storage.fs
    bucket, key, _ = fs.split_path(path)
    headers, data = fs.call("GET", "b/{}/o/{}", bucket, key, alt="media")  # 404: FileNotFoundError
    generation = headers.get("x-goog-generation")
    if generation is None:
        raise OSError(errno.EPROTO, "the store gave no x-goog-generation header", path)
    return Versioned(data, str(generation))


def _gcs_replace(storage: Storage, path: str, data: bytes, version: str) -> str:
    fs = storage.fs
    bucket, key, _ = fs.split_path(path)
    # multipart, as gcsfs uploads: fake-gcs-server checks ifGenerationMatch only on multipart uploads
    head = (f"--{_BOUNDARY}\nContent-Type: application/json; charset=UTF-8\n\n{json.dumps({'name': key})}\n"
            f"--{_BOUNDARY}\nContent-Type: application/octet-stream\n\n").encode()
    try:
        answer = fs.call("POST", f"{fs._location}/upload/storage/v1/b/{{}}/o", bucket, uploadType="multipart",
                ifGenerationMatch=version, data=head + data + f"\n--{_BOUNDARY}--".encode(),
                headers={"Content-Type": f'multipart/related; boundary="{_BOUNDARY}"'}, json_out=True)
    except (FileExistsError, FileNotFoundError):  # gcsfs says 412 (precondition failed) as FileExistsError
        raise VersionConflict(f"{path}: changed") from None
    finally:
        fs.invalidate_cache(path)
    return str(answer["generation"])


_BOUNDARY = "==segjob-cas=="
