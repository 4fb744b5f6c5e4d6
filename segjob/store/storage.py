"""Where runs live: a local folder, S3 or GCS, behind one small fsspec-based interface.

    storage = open_storage("s3://bucket/runs", endpoint_url=None)
    storage.check()                                  # one clear UserError if unusable
    storage.put_folder("/tmp/ckpt", storage.path("run", "checkpoint_000003"), files)
    storage.get_folder(storage.path("run", "checkpoint_000003"), "./best")

A Storage is rebuilt from (uri, endpoint_url) wherever it is needed (a Ray worker
included; pickling does exactly that), so no filesystem object or credential travels
between processes. Credentials come from the usual provider chains and are never
printed or logged. Transient errors are retried with backoff (`retry`); single objects
are written whole, and folders are downloaded into a temporary sibling and renamed, so
readers never see half a file or half a folder. `write_bytes(..., create_only=True)` is
the commit primitive: it never replaces an object that is already there.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import hashlib
import logging
import os
import random
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import fsspec

from segjob.errors import UserError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# check() must answer quickly even when the endpoint swallows packets.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
CHECK_TIMEOUT_S = 12.0

# Retry budget of `retry` (read at call time, so tests may lower them) and the attempts
# botocore makes itself inside each of ours (read when a Storage is opened).
RETRY_ATTEMPTS = 5
RETRY_BASE_DELAY_S = 0.2
S3_CLIENT_ATTEMPTS = 3

# Environment a Ray worker needs to reach the same storage: endpoints and switches, never secrets.
WORKER_ENV_VARS = (
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
    "STORAGE_EMULATOR_HOST",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


def worker_env_vars() -> dict[str, str]:
    """The non-secret storage settings of this process, for runtime_env={"env_vars": ...}."""
    return {name: os.environ[name] for name in WORKER_ENV_VARS if name in os.environ}


# --- opening ----------------------------------------------------------------------------


def open_storage(uri: str, endpoint_url: str | None = None) -> Storage:
    """A Storage for ./runs, /abs/path, file:///abs/path, s3://bucket/prefix or gs://bucket/prefix."""
    scheme, _, rest = uri.partition("://") if "://" in uri else ("", "", uri)
    if scheme in ("", "file"):
        root = str(Path(rest or ".").expanduser().resolve())
        return Storage(root, fsspec.filesystem("file"), root, is_local=True)
    if scheme not in ("s3", "gs", "gcs"):
        raise UserError(
            f"{uri}: unsupported storage scheme '{scheme}://'; use a local path, file://, s3:// or gs://"
        )
    root = rest.rstrip("/")
    if not root or root.startswith(("/", ".")):
        raise UserError(f"{uri}: no bucket name; expected {scheme}://bucket/prefix")
    if scheme == "s3":
        endpoint = _endpoint(endpoint_url, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        fs = _s3_filesystem(endpoint)
        return Storage(f"s3://{root}", fs, root, is_local=False, endpoint_url=endpoint)
    endpoint = _endpoint(endpoint_url, "STORAGE_EMULATOR_HOST")
    fs = _gcs_filesystem(endpoint)
    return Storage(f"gs://{root}", fs, root, is_local=False, endpoint_url=endpoint)


def _endpoint(explicit: str | None, *env_names: str) -> str | None:
    for value in (explicit, *(os.environ.get(name) for name in env_names)):
        if value:
            # Emulator hosts are often given as host:port.
            return value if "://" in value else f"http://{value}"
    return None


def _s3_filesystem(endpoint: str | None) -> fsspec.AbstractFileSystem:
    import s3fs  # lazily: local runs never pay for boto

    return s3fs.S3FileSystem(
        endpoint_url=endpoint,
        # A fresh instance per Storage: fsspec would otherwise hand back a cached one
        # created for another endpoint or in another process.
        skip_instance_cache=True,
        # Other processes write the same prefixes: never answer from a stale listing.
        use_listings_cache=False,
        config_kwargs={
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            "retries": {"max_attempts": S3_CLIENT_ATTEMPTS, "mode": "standard"},
        },
    )


def _gcs_filesystem(endpoint: str | None) -> fsspec.AbstractFileSystem:
    # Without this, gcsfs probes a gRPC control API on every open() and hangs for
    # minutes against an emulator. It must be set before gcsfs is first imported.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import aiohttp
    import gcsfs
    import gcsfs.core

    # gcsfs picks its class at import time; if something imported it before the flag was
    # set, still honour the flag as it is now.
    experimental = os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"].lower() in ("true", "1")
    cls = gcsfs.GCSFileSystem if experimental else gcsfs.core.GCSFileSystem
    options: dict[str, Any] = {}
    if endpoint:  # an emulator: no Google credentials to find
        options = {"token": "anon", "project": os.environ.get("GOOGLE_CLOUD_PROJECT", "segjob")}
    return cls(
        endpoint_url=endpoint,
        skip_instance_cache=True,
        use_listings_cache=False,
        requests_timeout=aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S),
        **options,
    )


# --- the storage ------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredFile:
    size: int
    modified: float | None  # seconds since the epoch by the store's own clock; None when it gives none



class Storage:
    """One storage root. Paths passed to methods are paths on `fs` (see `path()`)."""

    def __init__(
        self, uri: str, fs: fsspec.AbstractFileSystem, root: str, is_local: bool, endpoint_url: str | None = None
    ):
        self.uri = uri
        self.fs = fs
        self.root = root
        self.is_local = is_local
        self.endpoint_url = endpoint_url

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def __reduce__(self):
        # Rebuild on the other side instead of shipping a filesystem (and its credentials).
        return open_storage, (self.uri, self.endpoint_url)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *(part.strip("/") for part in parts if part)])

    def display(self, path: str) -> str:
        """A path on this storage as its user writes it: a local path, or scheme://bucket/key."""
        return path if self.is_local else f"{self.uri.split('://', 1)[0]}://{path}"

    def exists(self, path: str) -> bool:
        return retry(self.fs.exists, path, what=f"exists {path}")

    def list_dirs(self, path: str) -> list[str]:
        try:
            entries = retry(self.fs.ls, path, detail=True, what=f"list {path}")
        except (FileNotFoundError, NotADirectoryError):
            return []
        # A "folder/" placeholder object (made by consoles and some tools) shows up as the
        # listed folder itself on GCS: skip it.
        itself = self.fs._strip_protocol(path).rstrip("/")
        names = {
            entry["name"].rstrip("/").rsplit("/", 1)[-1]
            for entry in entries
            if entry["type"] == "directory" and entry["name"].rstrip("/") != itself
        }
        names.discard("")
        return sorted(names)

    def read_bytes(self, path: str) -> bytes:
        return retry(self.fs.cat_file, path, what=f"read {path}")

    def write_bytes(self, path: str, data: bytes, create_only: bool = False) -> None:
        """Write one whole object. With create_only, raise FileExistsError instead of
        replacing an object that is already there (different bytes), atomically at the store:

        - local: a fsynced temporary sibling hard-linked to the name (link fails if it exists);
        - S3: `PutObject` with `If-None-Match: *` (s3fs mode="create"; a 412 is FileExistsError);
        - GCS: upload with `ifGenerationMatch=0` (gcsfs mode="create"; a 412 is FileExistsError).

        An object that already holds exactly `data` counts as written: a retried request
        whose first answer was lost (ours, or botocore's own retry) must not fail because
        its first try landed. Remote writes also look before writing: that keeps stores
        that ignore the precondition (some emulators, e.g. gcp-storage-emulator) create-only
        for writers that don't race; on S3, GCS and the servers the tests use (moto,
        fake-gcs-server) the conditional request is what makes it atomic."""
        if self.is_local:
            _local_write(path, lambda tmp: Path(tmp).write_bytes(data), create_only)
        elif create_only:
            retry(self._create_object, path, data, what=f"create {path}")
        else:
            retry(self.fs.pipe_file, path, data, what=f"write {path}")

    def _create_object(self, path: str, data: bytes) -> None:
        held = self._holds(path, data)
        if held is False:
            raise FileExistsError(errno.EEXIST, "already exists (create-only write)", path)
        if held:
            return
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            if not self._holds(path, data):
                raise FileExistsError(errno.EEXIST, "already exists (create-only write)", path) from None

    def _holds(self, path: str, data: bytes) -> bool | None:
        """None when nothing is stored at path, else whether it holds exactly data."""
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        if info.get("type") != "file" or info.get("size") != len(data):
            return False
        return self.fs.cat_file(path) == data

    def put_file(self, local_path: str | os.PathLike, path: str) -> None:
        if self.is_local:
            _local_write(path, lambda tmp: shutil.copyfile(local_path, tmp))
        else:
            retry(self.fs.put_file, os.fspath(local_path), path, what=f"upload {path}")

    def put_folder(self, local_dir: str | os.PathLike, path: str, files: list[str]) -> None:
        """Upload the given relative file names in that order (callers put a marker last)."""
        for name in files:
            _check_relative_key(name, path)
            self.put_file(os.path.join(local_dir, name), f"{path.rstrip('/')}/{name}")

    def get_folder(self, path: str, local_dir: str | os.PathLike) -> None:
        """Download every file under path so that local_dir holds exactly those files.

        The files land in a temporary sibling first and are renamed into place, so a
        failed download leaves local_dir as it was. An existing local_dir is replaced.
        Raises FileNotFoundError when nothing is stored under path."""
        prefix = path.rstrip("/") + "/"
        found = retry(self.fs.find, path, what=f"list {path}")
        keys = sorted(name[len(prefix):] for name in found if name.startswith(prefix) and not name.endswith("/"))
        if not keys:
            raise FileNotFoundError(f"{path}: no files stored there")
        for key in keys:  # refuse before writing anything
            _check_relative_key(key, path)

        dest = Path(local_dir).absolute()
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f".{dest.name}.partial-{uuid.uuid4().hex[:8]}")
        try:
            for key in keys:
                target = partial.joinpath(*key.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                retry(self.fs.get_file, prefix + key, str(target), what=f"download {prefix + key}")
            replace_dir(partial, dest)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def files(self, path: str) -> dict[str, StoredFile]:
        """Every file under path (one listing): its key relative to path -> size and modification time."""
        prefix = path.rstrip("/") + "/"
        try:
            found = retry(self.fs.find, path, detail=True, what=f"list {path}")
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return {
            name[len(prefix):]: StoredFile(int(info.get("size") or 0), _modified(info))
            for name, info in found.items()
            if name.startswith(prefix) and not name.endswith("/") and info.get("type") != "directory"
        }

    def sha256(self, path: str) -> str:
        """The sha256 of one stored file, streamed (nothing kept in memory or on disk)."""
        return retry(self._sha256, path, what=f"read {path}")

    def _sha256(self, path: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    def copy_file(self, source: str, destination: str) -> None:
        """Copy one stored file (server-side on S3 and GCS)."""
        if self.is_local:
            _local_write(destination, lambda tmp: shutil.copyfile(source, tmp))
        else:
            retry(self.fs.cp_file, source, destination, what=f"copy {source}")

    def remove_empty_folder(self, path: str) -> None:
        """Remove a local folder if nothing is in it; object stores have no folders to remove."""
        if self.is_local:
            try:
                os.rmdir(path)
            except OSError:
                pass  # not empty (a writer got there meanwhile), or already gone

    def rm(self, path: str) -> None:
        try:
            retry(self.fs.rm, path, recursive=True, what=f"remove {path}")
        except FileNotFoundError:
            pass

    def check(self, uri_setting: str = "storage.uri", endpoint_setting: str = "storage.endpoint_url") -> None:
        """Raise one UserError line when this storage can't be used; create a local root. The
        settings are what the fix names: job keys by default, a command's own flags where it has them."""
        if self.is_local:
            _check_local_root(self.root)
        else:
            self._check_bucket(uri_setting, endpoint_setting)

    # --- check() for buckets ------------------------------------------------------------

    @property
    def bucket(self) -> str:
        return self.root.split("/", 1)[0]

    def _where(self) -> str:
        if self.endpoint_url:
            return f" at {_without_userinfo(self.endpoint_url)}"
        return ""

    def _check_bucket(self, uri_setting: str, endpoint_setting: str) -> None:
        where = self._where()
        fix_endpoint = f"{endpoint_setting} (or AWS_ENDPOINT_URL / STORAGE_EMULATOR_HOST)"
        if self.endpoint_url:
            reason = _tcp_unreachable(self.endpoint_url)
            if reason:
                raise UserError(
                    f"{self.uri}: cannot reach the storage endpoint{where} ({reason}); start it or fix {fix_endpoint}"
                )
        try:
            _within(CHECK_TIMEOUT_S, self._probe_bucket)
        except FileNotFoundError:
            raise UserError(
                f"{self.uri}: bucket '{self.bucket}' does not exist{where}; create it or fix {uri_setting}"
            ) from None
        except TimeoutError:
            raise UserError(
                f"{self.uri}: no answer from the storage endpoint{where} within {CHECK_TIMEOUT_S:.0f} s; "
                f"check the network or {fix_endpoint}"
            ) from None
        except Exception as error:  # noqa: BLE001 - every failure becomes one line
            if _is_denied(error):
                raise UserError(
                    f"{self.uri}: access to bucket '{self.bucket}' denied{where} ({_one_line(error)}); "
                    "check the credentials and the bucket's permissions"
                ) from None
            if type(error).__name__ == "NoCredentialsError":
                raise UserError(
                    f"{self.uri}: no credentials found for S3; "
                    "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
                ) from None
            raise UserError(
                f"{self.uri}: cannot use bucket '{self.bucket}'{where} ({type(error).__name__}: {_one_line(error)}); "
                f"check {fix_endpoint}, the network and the credentials"
            ) from None

    def _probe_bucket(self) -> None:
        if self.uri.startswith("s3://"):
            self.fs.call_s3("head_bucket", Bucket=self.bucket)
        else:
            self.fs.call("GET", "b/{}", self.bucket, json_out=True)


# --- retries ----------------------------------------------------------------------------

# OSErrors that say something definite about the request, not about the network.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# s3fs turns S3's client errors (bad name, too large, ...) into these errnos.
_PERMANENT_ERRNOS = {
    errno.EINVAL, errno.ENAMETOOLONG, errno.EMSGSIZE, errno.ENOTEMPTY,
    errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM,
}  # fmt: skip
_TRANSIENT_STATUS = {408, 429}  # and every 5xx
_TRANSIENT_CODES = {
    "Throttling", "ThrottlingException", "SlowDown", "RequestTimeout",
    "RequestLimitExceeded", "InternalError", "ServiceUnavailable",
}  # fmt: skip


def retry(
    fn: Callable[..., T],
    *args: Any,
    attempts: int | None = None,
    base_delay: float | None = None,
    what: str = "",
    **kwargs: Any,
) -> T:
    """Call fn(*args, **kwargs), retrying transient storage errors with exponential backoff
    and jitter; other errors (FileExistsError included), and the last transient one,
    propagate unchanged. Defaults: RETRY_ATTEMPTS, RETRY_BASE_DELAY_S."""
    what = what or getattr(fn, "__name__", "storage call")
    attempts = max(1, RETRY_ATTEMPTS if attempts is None else attempts)
    base_delay = RETRY_BASE_DELAY_S if base_delay is None else base_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            if attempt == attempts or not is_transient(error):
                raise
            delay = min(base_delay * 2 ** (attempt - 1), 10.0) * random.uniform(0.5, 1.5)
            logger.warning(
                "%s failed (%s: %s); retry %d/%d in %.1f s",
                what, type(error).__name__, _one_line(error), attempt, attempts - 1, delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def is_transient(error: BaseException) -> bool:
    """Whether retrying the same request may succeed (network, timeouts, throttling, 5xx)."""
    if isinstance(error, _PERMANENT_OS_ERRORS):
        return False
    if isinstance(error, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    if isinstance(error, _optional_transient_types()):
        return True
    status, code = _status_of(error)
    if status is not None or code is not None:
        return status in _TRANSIENT_STATUS or (status or 0) >= 500 or code in _TRANSIENT_CODES
    if isinstance(error, OSError):
        return error.errno not in _PERMANENT_ERRNOS
    return False


def _optional_transient_types() -> tuple[type, ...]:
    """Transient error classes of the client libraries already imported (never imports them)."""
    types: list[type] = []
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None:
        types += [botocore.ConnectionError, botocore.HTTPClientError]
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    google_auth = sys.modules.get("google.auth.exceptions")
    if google_auth is not None:
        types.append(google_auth.TransportError)
    gcsfs_retry = sys.modules.get("gcsfs.retry")
    if gcsfs_retry is not None:
        types.append(gcsfs_retry.ChecksumError)
    return tuple(types)


def _status_of(error: BaseException) -> tuple[int | None, str | None]:
    """(HTTP status, service error code) of botocore, gcsfs, aiohttp and google-api errors."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status, response.get("Error", {}).get("Code")
    for attribute in ("status", "code"):  # aiohttp ClientResponseError; gcsfs HttpError, google-api
        value = getattr(error, attribute, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value, None
    return None, None


# --- helpers ----------------------------------------------------------------------------


def _modified(info: dict[str, Any]) -> float | None:
    """A listing entry's modification time: local `mtime` (seconds), S3 `LastModified` and GCS `mtime`
    (datetimes), or GCS `updated` (RFC 3339 text)."""
    for key in ("mtime", "LastModified", "updated"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime.datetime):
            return value.timestamp() if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc).timestamp()
        if isinstance(value, str) and value:
            try:
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _check_relative_key(key: str, folder: str) -> None:
    """Refuse a key that would land outside the destination folder."""
    parts = key.split("/")
    if key.startswith("/") or "\\" in key or any(part in ("", ".", "..") for part in parts):
        raise UserError(f"{folder}: refusing unsafe key '{key}' (absolute, '..', '.' or empty parts)")


def _local_write(path: str, fill: Callable[[str], Any], create_only: bool = False) -> None:
    """Write a local file through a temporary sibling that `fill` writes, so no reader ever sees
    half a file under `path`. The sibling then replaces `path`; with create_only it is fsynced and
    hard-linked to it instead (a link never replaces), and FileExistsError says that `path`
    already holds other bytes."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        fill(tmp)
        if not create_only:
            os.replace(tmp, path)
            return
        _fsync_file(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            if _local_holds(path, Path(tmp).read_bytes()):
                return
            raise FileExistsError(errno.EEXIST, "already exists (create-only write)", path) from None
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # No hard links here (some network or FUSE filesystems): O_EXCL still decides
            # who creates the name, but a reader may see it before its bytes are complete.
            _exclusive_create(path, Path(tmp).read_bytes())
        _fsync_dir(folder)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _exclusive_create(path: str, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        if _local_holds(path, data):
            return
        raise FileExistsError(errno.EEXIST, "already exists (create-only write)", path) from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _local_holds(path: str, data: bytes) -> bool:
    try:
        return os.path.isfile(path) and os.path.getsize(path) == len(data) and Path(path).read_bytes() == data
    except OSError:
        return False


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every filesystem syncs folders
    finally:
        os.close(fd)


def replace_dir(new: Path, dest: Path) -> None:
    """Rename new onto dest; an existing dest is moved aside first and removed after."""
    if not os.path.lexists(dest):
        os.rename(new, dest)
        return
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(dest, old)
    try:
        os.rename(new, dest)
    except OSError:
        os.rename(old, dest)  # put the previous contents back
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def _check_local_root(root: str) -> None:
    try:
        os.makedirs(root, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{root}: exists and is not a folder; choose another storage.uri") from None
    except OSError as error:
        raise UserError(
            f"{root}: cannot create the storage folder ({error.strerror}); choose another storage.uri"
        ) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise UserError(
            f"{root}: the storage folder is not writable; fix its permissions or choose another storage.uri"
        )


def _tcp_unreachable(url: str) -> str | None:
    """Why nothing accepts connections at url's host:port, or None when something does."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        return _one_line(error) or type(error).__name__
    return None


def _within(seconds: float, fn: Callable[[], T]) -> T:
    """fn() in a daemon thread; TimeoutError when it hasn't finished after seconds (it may
    still be retrying inside a client library, but the caller moves on)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            outcome["error"] = error

    thread = threading.Thread(target=run, name="segjob-storage-check", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _is_denied(error: BaseException) -> bool:
    status, code = _status_of(error)
    return (
        isinstance(error, PermissionError)
        or status in (401, 403)
        or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "401")
        or str(error).startswith("Forbidden")
    )


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        return parts._replace(netloc=netloc).geturl()
    return url


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
