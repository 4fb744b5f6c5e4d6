"""What a checkpoint holds, and how it is committed, listed, loaded and retired.

A checkpoint is a folder `<run>/checkpoints/step-000000120/`:

    model.safetensors   weights of the unwrapped model (no pickle)
    state.pt            optimizer, schedule, scaler, RNG, progress (loaded with weights_only=True)
    history.jsonl       every metric reported so far, cut at this step
    meta.json           written LAST: job config, step, epoch, metrics, sha256 of every other file

A folder is committed once its meta.json exists; readers ignore folders without one and
verify every size and hash before loading. Checkpoints from storage are untrusted input:
file names come only from meta.json's own list, are plain names, are regular files (never
a symlink), and must have the listed size and hash; nothing else in the folder is read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save_file

from segjob import __version__
from segjob.errors import UserError
from segjob.store.storage import Storage, retry

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
HISTORY_FILE = "history.jsonl"
META_FILE = "meta.json"
CHECKPOINTS_DIR = "checkpoints"
FORMAT_VERSION = 1
PAYLOAD_FILES = (MODEL_FILE, STATE_FILE, HISTORY_FILE)


@dataclass
class CheckpointInfo:
    """A committed checkpoint as its meta.json describes it."""

    path: str  # folder on the storage filesystem
    name: str
    step: int
    epoch: int
    metrics: dict[str, float]
    meta: dict[str, Any] = field(repr=False)


@dataclass
class LoadedCheckpoint:
    model_state: dict[str, torch.Tensor]
    train_state: dict[str, Any]
    history: list[dict[str, Any]]
    meta: dict[str, Any]


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def checkpoints_path(run_path: str) -> str:
    return f"{run_path}/{CHECKPOINTS_DIR}"


# --- writing ----------------------------------------------------------------------------


def write_local(
    folder: Path, model_state: dict[str, torch.Tensor], train_state: dict[str, Any], history: list[dict]
) -> None:
    """Write the payload files (not meta.json) into a local folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    storages = [t.untyped_storage().data_ptr() for t in tensors.values() if t.numel()]
    if len(storages) != len(set(storages)):  # safetensors refuses tensors that share memory
        tensors = {k: v.clone() for k, v in tensors.items()}
    save_file(tensors, folder / MODEL_FILE)
    torch.save(train_state, folder / STATE_FILE)
    with open(folder / HISTORY_FILE, "w") as f:
        for record in history:
            f.write(json.dumps(record, allow_nan=True) + "\n")


def build_meta(
    folder: Path, *, job: dict, step: int, epoch: int, metrics: dict[str, float], reason: str
) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "segjob_version": __version__,
        "run": job.get("name"),
        "step": step,
        "epoch": epoch,
        "metrics": metrics,
        "reason": reason,
        "time": time.time(),
        "files": {name: {"sha256": _sha256(folder / name), "bytes": (folder / name).stat().st_size}
                  for name in PAYLOAD_FILES},
        "job": job,
    }


def commit(storage: Storage, run_path: str, folder: Path, meta: dict[str, Any]) -> CheckpointInfo:
    """Upload the payload, then meta.json: the folder counts only once every file is there."""
    name = checkpoint_name(meta["step"])
    remote = f"{checkpoints_path(run_path)}/{name}"
    if storage.exists(f"{remote}/{META_FILE}"):
        # this step is committed already (e.g. preempted right after resuming at it): never
        # overwrite a committed payload, its meta.json vouches for the files that are there
        existing = _parse_meta(storage.read_bytes(f"{remote}/{META_FILE}"), f"{remote}/{META_FILE}")
        return CheckpointInfo(remote, name, existing["step"], existing["epoch"], existing["metrics"], existing)
    storage.put_folder(folder, remote, list(PAYLOAD_FILES))
    data = json.dumps(meta, indent=1, allow_nan=True).encode()
    # create-only: two writers of one step (a zombie worker and its replacement) can't both commit
    storage.write_bytes(f"{remote}/{META_FILE}", data, create_only=True)
    return CheckpointInfo(remote, name, meta["step"], meta["epoch"], meta["metrics"], meta)


# --- listing ----------------------------------------------------------------------------


def list_committed(storage: Storage, run_path: str) -> list[CheckpointInfo]:
    """Committed checkpoints of a run, oldest step first. Folders without meta.json are skipped."""
    base = checkpoints_path(run_path)
    found = []
    for name in storage.list_dirs(base):
        try:
            raw = retry(storage.read_bytes, f"{base}/{name}/{META_FILE}", what="read checkpoint meta")
        except FileNotFoundError:
            continue  # uncommitted: an upload that never finished
        try:
            meta = _parse_meta(raw, f"{base}/{name}/{META_FILE}")
        except UserError as error:
            log.warning("ignoring checkpoint: %s", error)
            continue
        found.append(CheckpointInfo(f"{base}/{name}", name, meta["step"], meta["epoch"], meta["metrics"], meta))
    return sorted(found, key=lambda info: info.step)


def list_uncommitted(storage: Storage, run_path: str) -> list[str]:
    base = checkpoints_path(run_path)
    return [name for name in storage.list_dirs(base) if not storage.exists(f"{base}/{name}/{META_FILE}")]


def remove_uncommitted(storage: Storage, run_path: str) -> list[str]:
    """Delete orphaned uploads. Only the driver calls this, at start, when no upload can be running."""
    orphans = list_uncommitted(storage, run_path)
    for name in orphans:
        storage.rm(f"{checkpoints_path(run_path)}/{name}")
    return orphans


def latest(storage: Storage, run_path: str) -> CheckpointInfo | None:
    committed = list_committed(storage, run_path)
    return committed[-1] if committed else None


def metric_value(info: CheckpointInfo, metric: str) -> float | None:
    value = info.metrics.get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def select_best(infos: list[CheckpointInfo], metric: str, mode: str, k: int = 1) -> list[CheckpointInfo]:
    """The k best checkpoints carrying the metric; newer wins a tie."""
    scored = [(metric_value(info, metric), info) for info in infos]
    scored = [(value, info) for value, info in scored if value is not None]
    sign = -1.0 if mode == "max" else 1.0
    scored.sort(key=lambda pair: (sign * pair[0], -pair[1].step))
    return [info for _, info in scored[:k]]


def apply_retention(storage: Storage, run_path: str, keep_best: int, metric: str, mode: str) -> list[str]:
    """Keep the best `keep_best` by the job metric and the newest; remove the rest."""
    committed = list_committed(storage, run_path)
    if not committed:
        return []
    keep = {info.name for info in select_best(committed, metric, mode, keep_best)} | {committed[-1].name}
    removed = []
    for info in committed:
        if info.name in keep:
            continue
        # meta.json first: a half-deleted folder then reads as uncommitted, never as broken
        storage.rm(f"{info.path}/{META_FILE}")
        storage.rm(info.path)
        removed.append(info.name)
    return removed


# --- loading ----------------------------------------------------------------------------

# Checkpoints in storage are untrusted input: these bound what a reader will take in.
MAX_META_BYTES = 16 << 20  # a job config and its metrics are kilobytes; anything this big is not a meta.json
MAX_JSON_DEPTH = 64  # a job nests a few levels; deeper is damage, and would exhaust every later reader's stack
_META_TOO_BIG = f"larger than {MAX_META_BYTES >> 20} MiB; not a segjob {META_FILE}"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_BLOCK = 1 << 20


def fetch(storage: Storage, path: str, destination: Path) -> Path:
    """Download a committed checkpoint folder into `destination` (created; must not exist).

    meta.json first, then exactly the files it lists and nothing else stored under the folder;
    each is refused as soon as it grows past the size meta.json lists, and when its size or
    sha256 differs; a symlink (local storage) is refused, never followed. Errors name the
    checkpoint where it is stored. On any failure `destination` is removed again."""
    where = storage.display(path)
    meta_where = f"{where}/{META_FILE}"
    try:
        raw_meta = _read_stored(storage, f"{path}/{META_FILE}", meta_where)
    except FileNotFoundError:
        raise UserError(f"{where}: not a committed checkpoint (no {META_FILE}); it may be an unfinished upload") \
            from None
    meta = _parse_meta(raw_meta, meta_where)
    destination = Path(destination)
    destination.mkdir(parents=True)
    try:
        for name, entry in meta["files"].items():  # plain names: _parse_meta allows exactly PAYLOAD_FILES
            _download_listed(storage, f"{path}/{name}", destination / name, entry, f"{where}/{name}")
        (destination / META_FILE).write_bytes(raw_meta)  # last, as in storage: the copy counts once it is whole
    except BaseException:
        shutil.rmtree(destination, ignore_errors=True)
        raise
    return destination


def load_folder(folder: Path, expected_run: str | None = None) -> LoadedCheckpoint:
    """Verify and load a local checkpoint folder. Each file is read once, checked against the
    size and sha256 in meta.json, and loaded from those same bytes (nothing can swap it in
    between); symlinks and anything that doesn't match are refused."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    try:
        raw_meta = _read_local(meta_path, MAX_META_BYTES, _META_TOO_BIG)
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{folder}: not a checkpoint folder (no {META_FILE})") from None
    meta = _parse_meta(raw_meta, str(meta_path))
    if expected_run is not None and meta.get("run") != expected_run:
        raise UserError(f"{meta_path}: checkpoint belongs to run '{meta.get('run')}', not '{expected_run}'")
    payload = {}
    for name, entry in meta["files"].items():
        path = folder / name
        try:
            payload[name] = _read_local(path, entry["bytes"], _too_big(entry["bytes"]))
        except FileNotFoundError:
            raise UserError(f"{path}: missing from the checkpoint (listed in {META_FILE})") from None
        _check_listed(str(path), entry, len(payload[name]), hashlib.sha256(payload[name]).hexdigest())
    try:
        model_state = load_tensors(payload[MODEL_FILE])
    except Exception as error:  # safetensors raises its own error types
        raise UserError(f"{folder / MODEL_FILE}: unreadable weights ({error})") from None
    try:
        train_state = torch.load(io.BytesIO(payload[STATE_FILE]), map_location="cpu", weights_only=True)
    except Exception as error:  # an unpickling error means a payload beyond plain tensors and containers
        raise UserError(f"{folder / STATE_FILE}: refused by the safe loader ({type(error).__name__}); "
                        f"not a segjob state file") from None
    history = _parse_history(payload[HISTORY_FILE], str(folder / HISTORY_FILE))
    return LoadedCheckpoint(model_state, train_state, history, meta)


def load(storage: Storage, checkpoint: CheckpointInfo | str, expected_run: str | None = None) -> LoadedCheckpoint:
    """Verify and load a committed checkpoint folder on storage (its info, or its path): a local one
    where it is, a remote one through a temporary copy."""
    path = checkpoint.path if isinstance(checkpoint, CheckpointInfo) else checkpoint
    if storage.is_local:
        return load_folder(Path(path), expected_run)
    with tempfile.TemporaryDirectory(prefix="segjob-ckpt-") as tmp:
        folder = fetch(storage, path, Path(tmp) / "checkpoint")
        try:
            return load_folder(folder, expected_run)
        except UserError as error:  # name the checkpoint where the user can find it, not our temporary copy
            raise UserError(str(error).replace(str(folder), storage.display(path))) from None


def _parse_meta(raw: bytes, where: str) -> dict[str, Any]:
    """meta.json's bytes as a checked mapping, or one UserError naming `where` (a damaged or foreign file)."""
    meta = _parse_json(raw, where)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else "?"
        raise UserError(f"{where}: not a segjob checkpoint (format {found})")
    files = meta.get("files")
    if not isinstance(files, dict) or set(files) != set(PAYLOAD_FILES):
        raise UserError(f"{where}: 'files' must list exactly {', '.join(PAYLOAD_FILES)}")
    for name, entry in files.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise UserError(f"{where}: files.{name} has no sha256")
        if not _SHA256.fullmatch(entry["sha256"]):
            raise UserError(f"{where}: files.{name}.sha256 is not 64 lowercase hex digits")
        if not _is_int(entry.get("bytes")) or entry["bytes"] < 0:
            raise UserError(f"{where}: files.{name}.bytes must be a size in bytes")
    if not _is_int(meta.get("step")) or not _is_int(meta.get("epoch")):
        raise UserError(f"{where}: 'step' and 'epoch' must be integers")
    if not isinstance(meta.get("metrics"), dict):
        raise UserError(f"{where}: 'metrics' must be a mapping")
    if not isinstance(meta.get("job"), dict):
        raise UserError(f"{where}: 'job' must be a mapping (the job the checkpoint was trained with)")
    if not isinstance(meta.get("run"), (str, type(None))):
        raise UserError(f"{where}: 'run' must be the run's name")
    return meta


def _parse_json(raw: bytes, where: str) -> Any:
    """JSON from storage: any way it is not plain, shallow JSON is one UserError, never a RecursionError."""
    too_deep = f"{where}: nested deeper than {MAX_JSON_DEPTH} levels; the file is damaged"
    try:
        value = json.loads(raw)
    except RecursionError:  # thousands deep: the parser itself gives up
        raise UserError(too_deep) from None
    except ValueError:  # JSONDecodeError, bad UTF-8, an integer of thousands of digits
        raise UserError(f"{where}: not valid JSON; the file is damaged") from None
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise UserError(too_deep)
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` levels (iteratively: the check itself must not recurse)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _parse_history(raw: bytes, where: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        record = _parse_json(line, f"{where}: line {number}")
        if not isinstance(record, dict):
            raise UserError(f"{where}: line {number}: not a JSON object; the file is damaged")
        records.append(record)
    return records


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no step number


def _too_big(size: int) -> str:
    return f"larger than the {size} bytes {META_FILE} lists; the checkpoint is damaged or was tampered with"


def _check_listed(where: str, entry: dict[str, Any], size: int, sha256: str) -> None:
    """A file read whole: its sha256 and size must be the ones meta.json lists."""
    if sha256 != entry["sha256"]:
        raise UserError(f"{where}: sha256 does not match {META_FILE}; the checkpoint is damaged or was tampered with")
    if size != entry["bytes"]:
        raise UserError(f"{where}: {size} bytes, {META_FILE} lists {entry['bytes']}; the checkpoint is damaged")


def _read_stored(storage: Storage, key: str, where: str) -> bytes:
    """meta.json from storage, at most MAX_META_BYTES of it."""
    chunks: list[bytes] = []

    def read() -> None:
        chunks.clear()
        with _open_stored(storage, key, where) as (source, size):
            _stream(source, size, MAX_META_BYTES, where, _META_TOO_BIG, chunks.append)

    retry(read, what=f"read {where}")
    return b"".join(chunks)


def _download_listed(storage: Storage, key: str, target: Path, entry: dict[str, Any], where: str) -> None:
    """One listed file into `target`, streamed: stops as soon as it grows past its listed size."""
    limit = entry["bytes"]

    def download() -> tuple[int, str]:
        with _open_stored(storage, key, where) as (source, size), open(target, "wb") as sink:
            return _stream(source, size, limit, where, _too_big(limit), sink.write)

    try:
        size, sha256 = retry(download, what=f"download {where}")
    except FileNotFoundError:
        raise UserError(f"{where}: listed in {META_FILE} but not stored; the checkpoint changed while it was "
                        f"read (removed by retention?) or is incomplete; try again") from None
    _check_listed(where, entry, size, sha256)


@contextlib.contextmanager
def _open_stored(storage: Storage, key: str, where: str) -> Iterator[tuple[BinaryIO, int | None]]:
    """(a stored file open for reading, its size where known)."""
    if storage.is_local:
        with _open_local(Path(key), where) as source:
            yield source, os.fstat(source.fileno()).st_size
    else:
        with storage.fs.open(key, "rb") as source:
            yield source, getattr(source, "size", None)


def _read_local(path: Path, limit: int, too_big: str, where: str | None = None) -> bytes:
    chunks: list[bytes] = []
    with _open_local(path, where or str(path)) as source:
        _stream(source, os.fstat(source.fileno()).st_size, limit, where or str(path), too_big, chunks.append)
    return b"".join(chunks)


def _open_local(path: Path, where: str) -> BinaryIO:
    """A local regular file opened without following a symlink (one could point anywhere, /etc included)."""
    try:  # O_NONBLOCK: opening a FIFO planted under a checkpoint's name must not hang
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UserError(f"{where}: a symbolic link; a checkpoint holds only regular files, so it is refused") \
                from None
        if isinstance(error, (FileNotFoundError, NotADirectoryError)):
            raise  # the callers say what is missing
        raise UserError(f"{where}: cannot read it ({error.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{where}: not a regular file; a checkpoint holds only regular files, so it is refused")
    return os.fdopen(fd, "rb")


def _stream(source: BinaryIO, size: int | None, limit: int, where: str, too_big: str,
            sink: Callable[[bytes], Any]) -> tuple[int, str]:
    """Copy source to sink, never reading more than limit + 1 bytes; (bytes, sha256)."""
    if size is not None and size > limit:  # the store says so already: read nothing
        raise UserError(f"{where}: {too_big}")
    digest = hashlib.sha256()
    total = 0
    while block := source.read(min(_BLOCK, limit + 1 - total)):
        total += len(block)
        if total > limit:  # it grew while we read, or the store's size was wrong
            raise UserError(f"{where}: {too_big}")
        digest.update(block)
        sink(block)
    return total, digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

