"""What a checkpoint holds, and how it is committed, listed, loaded and retired.

A checkpoint is a step folder `<run>/checkpoints/step-000000120/` whose meta.json commits one
attempt folder beside it:

    meta.json              created once, LAST (create-only): names the attempt; job config, step,
                           epoch, metrics, sha256 and size of every payload file
    attempt-<32 hex>/      one writer's upload, under names no other writer uses:
      model.safetensors    weights of the unwrapped model (no pickle)
      ema.safetensors      only with train.ema: the moving average of those weights (same keys)
      state.pt             optimizer, schedule, scaler, RNG, progress (loaded with weights_only=True)
      history.jsonl        every metric reported so far, cut at this step
      meta.json            the step's meta.json without "attempt": the attempt folder is a complete
                           checkpoint folder for every loader, wherever it is copied (CheckpointInfo.path
                           points at it)

A step counts once its meta.json exists. Two writers of one step (a zombie worker and its
replacement) upload into different attempts; the first to create meta.json wins, the other returns
the winner once it verifies and removes its own attempt. Readers load only the attempt meta.json
names, and verify every hash. Checkpoints written before attempts (payload beside meta.json, no
"attempt" key) are read where they are. Cleanup removes only what no meta.json references and what
nothing has written to for a grace period, so an upload in flight survives it. A committed
checkpoint that does not verify is moved to `<run>/quarantine/` (never ranked, never deleted), and
retention verifies what it keeps before it deletes anything. Checkpoints from storage are untrusted
input: file names come only from meta.json's own list, are plain names, are regular files (never a
symlink), and must have the listed size and hash; nothing else in the folder is read.
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
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save_file

from segjob import __version__
from segjob.errors import UserError
from segjob.store.lease import Fence, read_fences, superseded
from segjob.store.storage import Storage, retry

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
HISTORY_FILE = "history.jsonl"
META_FILE = "meta.json"
CHECKPOINTS_DIR = "checkpoints"
FORMAT_VERSION = 1
EMA_FILE = "ema.safetensors"
PAYLOAD_FILES = (MODEL_FILE, STATE_FILE, HISTORY_FILE)  # in every checkpoint
OPTIONAL_FILES = (EMA_FILE,)  # in a checkpoint whose job asks for them; listed in meta.json (and verified) when there
ATTEMPT_PREFIX = "attempt-"
UPLOADING_FILE = "uploading"  # in an attempt while its files go up, rewritten before each one: its age is the upload's
QUARANTINE_DIR = "quarantine"  # beside checkpoints/, so nothing that lists checkpoints ever sees it
QUARANTINE_NOTE = "quarantined.json"
# An upload writes at least once per payload file: an unreferenced attempt untouched for this long is abandoned.
# It must exceed the longest single-file upload (S3 stamps a multipart object with the time it began) plus
# any difference between the reader's clock and the store's.
CLEANUP_GRACE_S = 3600.0
COMMIT_TRIES = 3
_ATTEMPT_NAME = re.compile(r"attempt-[0-9a-f]{32}")


@dataclass
class CheckpointInfo:
    """A committed checkpoint as its meta.json describes it."""

    path: str  # the folder holding meta.json and the payload: the committed attempt (a step folder before attempts)
    name: str  # the step folder's name, step-NNNNNNNNN
    step: int
    epoch: int
    metrics: dict[str, float]
    meta: dict[str, Any] = field(repr=False)
    step_path: str = ""  # the step folder, whose meta.json commits it ("": the same as path)
    meta_sha256: str = field(default="", repr=False)  # of the step's meta.json: which commit this is

    def __post_init__(self) -> None:
        self.step_path = self.step_path or self.path

    @property
    def generation(self) -> int:
        """The driver lease's generation it was written under (0: before leases had generations)."""
        generation = self.meta.get("generation", 0)
        return generation if type(generation) is int else 0


@dataclass
class LoadedCheckpoint:
    model_state: dict[str, torch.Tensor]
    train_state: dict[str, Any]
    history: list[dict[str, Any]]
    meta: dict[str, Any]
    ema_state: dict[str, torch.Tensor] | None = None  # the averaged weights, when the run kept an EMA


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def checkpoints_path(run_path: str) -> str:
    return f"{run_path}/{CHECKPOINTS_DIR}"


# --- writing ----------------------------------------------------------------------------


def write_local(
    folder: Path, model_state: dict[str, torch.Tensor], train_state: dict[str, Any], history: list[dict],
    ema_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the payload files (not meta.json) into a local folder; ema.safetensors only with `ema_state`."""
    folder.mkdir(parents=True, exist_ok=True)
    _save_tensors(model_state, folder / MODEL_FILE)
    if ema_state is not None:
        _save_tensors(ema_state, folder / EMA_FILE)
    torch.save(train_state, folder / STATE_FILE)
    with open(folder / HISTORY_FILE, "w") as f:
        for record in history:
            f.write(json.dumps(record, allow_nan=True) + "\n")


def _save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    storages = [t.untyped_storage().data_ptr() for t in tensors.values() if t.numel()]
    if len(storages) != len(set(storages)):  # safetensors refuses tensors that share memory
        tensors = {k: v.clone() for k, v in tensors.items()}
    save_file(tensors, path)


def build_meta(
    folder: Path, *, job: dict, step: int, epoch: int, metrics: dict[str, float], reason: str, generation: int = 0
) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "segjob_version": __version__,
        "run": job.get("name"),
        "generation": generation,  # of the driver lease it was written under (store/lease.py): fences zombies
        "step": step,
        "epoch": epoch,
        "metrics": metrics,
        "reason": reason,
        "time": time.time(),
        "files": {name: {"sha256": _sha256(folder / name), "bytes": (folder / name).stat().st_size}
                  for name in (*PAYLOAD_FILES, *OPTIONAL_FILES) if (folder / name).is_file()},
        "job": job,
    }


def commit(storage: Storage, run_path: str, folder: Path, meta: dict[str, Any]) -> CheckpointInfo:
    """Upload the payload into a fresh attempt folder, then create the step's meta.json naming it.

    Returns the step's committed checkpoint: ours, or one that another writer committed first and
    that verifies. A committed one that does not verify is quarantined and replaced, never returned."""
    name = checkpoint_name(meta["step"])
    step_path = f"{checkpoints_path(run_path)}/{name}"
    starts = read_fences(storage, run_path)
    existing = _committed_and_verified(storage, run_path, step_path, starts)
    if existing:  # committed already (e.g. preempted right after resuming at it): never upload it again
        return existing
    attempt = f"{ATTEMPT_PREFIX}{uuid.uuid4().hex}"
    own_meta = json.dumps(meta, indent=1, allow_nan=True).encode()
    meta = {**meta, "attempt": attempt}
    data = json.dumps(meta, indent=1, allow_nan=True).encode()
    attempt_path = f"{step_path}/{attempt}"
    _upload_attempt(storage, attempt_path, folder, meta["files"], own_meta)
    for _ in range(COMMIT_TRIES):
        try:
            # create-only: of two writers of one step, exactly one commits
            storage.write_bytes(f"{step_path}/{META_FILE}", data, create_only=True)
        except FileExistsError:
            winner = _committed_and_verified(storage, run_path, step_path, starts)
            if winner is None:
                continue  # the one there did not verify, or a superseded driver wrote it: quarantined now, try again
            storage.rm(attempt_path)  # nothing references ours
            log.info("%s was committed by another writer meanwhile; keeping that one", storage.display(step_path))
            return winner
        return CheckpointInfo(attempt_path, name, meta["step"], meta["epoch"], meta["metrics"], meta, step_path,
                              hashlib.sha256(data).hexdigest())
    raise FileExistsError(errno.EEXIST, "every try found another damaged commit of this step; not committed",
                          storage.display(step_path))


def _upload_attempt(storage: Storage, attempt_path: str, folder: Path, files: dict[str, Any], own_meta: bytes) -> None:
    """Payload, then the attempt's own meta.json; then check that every file is still there."""
    mark = f"{attempt_path}/{UPLOADING_FILE}"
    for name in files:
        storage.write_bytes(mark, b"")  # cleanup judges an attempt's age by its newest object
        storage.put_file(folder / name, f"{attempt_path}/{name}")
    storage.write_bytes(f"{attempt_path}/{META_FILE}", own_meta)
    storage.rm(mark)
    # a cleanup that judged this upload abandoned (a file took longer than its grace period) may have removed
    # files already uploaded: committing then would vouch for files that are not there
    stored = storage.files(attempt_path)
    expected = {name: entry["bytes"] for name, entry in files.items()} | {META_FILE: len(own_meta)}
    for name, size in expected.items():
        if name not in stored or stored[name].size != size:
            raise FileNotFoundError(errno.ENOENT, "removed during the upload (by a cleanup that judged it "
                                    "abandoned?); not committed", storage.display(f"{attempt_path}/{name}"))


# --- reading what is committed ----------------------------------------------------------


def read_committed(storage: Storage, step_path: str) -> CheckpointInfo | None:
    """The checkpoint a step folder's meta.json commits; None without one. UserError when it is malformed."""
    where = f"{step_path}/{META_FILE}"
    try:
        raw = retry(storage.read_bytes, where, what="read checkpoint meta")
    except FileNotFoundError:
        return None
    return _info_from(raw, step_path)


def _info_from(raw: bytes, step_path: str) -> CheckpointInfo:
    where = f"{step_path}/{META_FILE}"
    meta = _parse_meta(raw, where)
    attempt = meta.get("attempt")
    if attempt is None:
        path = step_path  # written before attempts: the payload is beside meta.json
    elif isinstance(attempt, str) and _ATTEMPT_NAME.fullmatch(attempt):
        path = f"{step_path}/{attempt}"
    else:
        raise UserError(f"{where}: 'attempt' must name an attempt folder ({ATTEMPT_PREFIX}<32 hex digits>)")
    name = step_path.rstrip("/").rsplit("/", 1)[-1]
    return CheckpointInfo(path, name, meta["step"], meta["epoch"], meta["metrics"], meta, step_path,
                          hashlib.sha256(raw).hexdigest())


def committed_folder(storage: Storage, path: str) -> str:
    """The folder to load for a checkpoint path: a step folder's committed attempt, or the path itself."""
    try:
        info = read_committed(storage, path)
    except UserError:
        return path  # the loader names what is wrong with it
    return info.path if info else path


def verify(storage: Storage, info: CheckpointInfo) -> str | None:
    """None when every file meta.json lists is stored with its size and sha256 (and an attempt's own meta.json,
    which loaders check against, lists the same files); otherwise one line naming what is wrong. Streams each
    file once."""
    stored = storage.files(info.path)
    for name, entry in info.meta["files"].items():
        path = f"{info.path}/{name}"
        where = storage.display(path)
        size = entry.get("bytes")
        if name not in stored:
            return f"{where}: missing from the checkpoint (listed in {META_FILE})"
        if isinstance(size, int) and stored[name].size != size:
            return f"{where}: {stored[name].size} bytes, {META_FILE} says {size}; the checkpoint is damaged"
        try:
            digest = storage.sha256(path)
        except FileNotFoundError:
            return f"{where}: missing from the checkpoint (listed in {META_FILE})"
        if digest != entry["sha256"]:
            return f"{where}: sha256 does not match {META_FILE}; the checkpoint is damaged or was tampered with"
    if info.path != info.step_path:
        own = f"{info.path}/{META_FILE}"
        raw = _read_or_none(storage, own)
        try:
            same = raw is not None and _parse_meta(raw, own)["files"] == info.meta["files"]
        except (UserError, RecursionError):
            same = False
        if not same:
            return f"{storage.display(own)}: lists other files than the step's {META_FILE}; the checkpoint is damaged"
    return None


def _committed_and_verified(storage: Storage, run_path: str, step_path: str,
                            starts: dict[int, int]) -> CheckpointInfo | None:
    """The step's committed checkpoint if it verifies and is not superseded (`starts`: the run's fences); one that
    is either is quarantined (None)."""
    try:
        info = read_committed(storage, step_path)
    except UserError as error:
        raw = _read_or_none(storage, f"{step_path}/{META_FILE}")
        if raw is not None:
            where = quarantine(storage, run_path, step_path, hashlib.sha256(raw).hexdigest(), str(error))
            log.warning("%s; moved to %s", error, where)
        return None
    if info is None:
        return None
    if superseded(starts, info.generation, info.step):
        problem = (f"written by generation {info.generation} of the driver lease after a newer generation resumed "
                   f"the run from an earlier step")
        where = quarantine(storage, run_path, info.step_path, info.meta_sha256, problem)
        log.warning("%s: %s; moved to %s", info.name, problem, where)
        return None
    problem = verify(storage, info)
    if problem is None:
        return info
    where = quarantine(storage, run_path, info.step_path, info.meta_sha256, problem)
    log.warning("%s: the committed checkpoint does not verify (%s); moved to %s", info.name, problem, where)
    return None


def _read_or_none(storage: Storage, path: str) -> bytes | None:
    try:
        return storage.read_bytes(path)
    except FileNotFoundError:
        return None


# --- listing ----------------------------------------------------------------------------


def list_committed(storage: Storage, run_path: str, with_superseded: bool = False) -> list[CheckpointInfo]:
    """Committed checkpoints of a run, oldest step first. Folders without meta.json are skipped, and so are
    commits that a superseded driver's workers made after a newer driver took over (see store/lease.py),
    unless `with_superseded`."""
    base = checkpoints_path(run_path)
    starts = {} if with_superseded else read_fences(storage, run_path)
    found = []
    for name in storage.list_dirs(base):
        try:
            info = read_committed(storage, f"{base}/{name}")
        except UserError as error:
            log.warning("ignoring checkpoint: %s", error)
            continue
        if info is None:  # uncommitted: an upload that never finished (or one still going)
            continue
        if superseded(starts, info.generation, info.step):
            log.debug("ignoring %s: committed by a superseded driver (generation %d)", name, info.generation)
            continue
        found.append(info)
    return sorted(found, key=lambda info: info.step)


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


# --- what no meta.json references --------------------------------------------------------


@dataclass
class Unreferenced:
    """An attempt folder or a file in a step folder that no meta.json references."""

    step: str  # the step folder's name
    part: str  # the attempt folder's or the file's name in it
    path: str
    modified: float | None  # its newest file's modification time, by the store's clock
    committed: bool  # whether the step has a meta.json (that references something else)


def list_uncommitted(storage: Storage, run_path: str) -> list[str]:
    """What no meta.json references, whatever its age: a step folder without meta.json (its name), or an
    attempt or file beside a committed one ("step-…/attempt-…")."""
    labels = []
    for part in _unreferenced(storage, run_path):
        label = f"{part.step}/{part.part}" if part.committed else part.step
        if label not in labels:
            labels.append(label)
    return labels


def remove_uncommitted(storage: Storage, run_path: str, grace_s: float = CLEANUP_GRACE_S,
                       now: float | None = None, fence: Fence | None = None) -> list[str]:
    """Delete what no meta.json references and nothing has written to for `grace_s` seconds: abandoned
    uploads. An upload in flight writes at least once per file, so it survives. Ages are judged on this
    reader's clock (`now`, default time.time()) against the store's modification times. Returns what went:
    a step folder's name when all of it went, else "step-…/part". With a `fence`, a driver that a newer one has
    superseded removes nothing (Superseded)."""
    now = time.time() if now is None else now
    by_step: dict[str, list[Unreferenced]] = {}
    for part in _unreferenced(storage, run_path):
        by_step.setdefault(part.step, []).append(part)
    removed = []
    for step, parts in by_step.items():
        step_path = f"{checkpoints_path(run_path)}/{step}"
        if fence:
            fence.check(storage)
        gone = []
        for part in parts:
            age = now - part.modified if part.modified is not None else 0.0
            if grace_s > 0 and age <= grace_s:
                continue  # maybe an upload in flight
            referenced = _referenced_parts(storage, step_path)
            if referenced is None or part.part in referenced:
                continue  # committed meanwhile
            storage.rm(part.path)
            gone.append(part)
        if gone and len(gone) == len(parts) and not parts[0].committed:
            storage.remove_empty_folder(step_path)
            removed.append(step)
        else:
            removed += [f"{step}/{part.part}" for part in gone]
    return removed


def _unreferenced(storage: Storage, run_path: str) -> list[Unreferenced]:
    base = checkpoints_path(run_path)
    found = []
    for step in storage.list_dirs(base):
        step_path = f"{base}/{step}"
        stored = storage.files(step_path)  # one listing per step folder: names, sizes, times
        committed = META_FILE in stored
        referenced = _referenced_parts(storage, step_path) if committed else {META_FILE}
        if referenced is None:
            continue  # a malformed meta.json: what it meant to reference is unknown, so leave it all
        times: dict[str, list[float | None]] = {}
        for key, file in stored.items():
            part = key.split("/", 1)[0]
            if part not in referenced:
                times.setdefault(part, []).append(file.modified)
        for part, modified in sorted(times.items()):
            newest = None if None in modified else max(modified)
            found.append(Unreferenced(step, part, f"{step_path}/{part}", newest, committed))
    return found


def _referenced_parts(storage: Storage, step_path: str) -> set[str] | None:
    """Names in a step folder that its meta.json references (meta.json included); None when it is malformed."""
    try:
        info = read_committed(storage, step_path)
    except UserError:
        return None
    if info is None:
        return {META_FILE}
    if info.path != info.step_path:
        return {META_FILE, info.path.rsplit("/", 1)[-1]}
    return {META_FILE, *info.meta["files"]}


# --- damage and retention ---------------------------------------------------------------


def quarantine(storage: Storage, run_path: str, step_path: str, meta_sha256: str, why: str) -> str | None:
    """Move a committed checkpoint that does not verify out of checkpoints/ into `<run>/quarantine/`
    (kept for a person to look at, never listed, ranked or loaded). Only the commit judged (its meta.json's
    sha256) is moved; returns where it went, or None when that commit is no longer there."""
    meta_path = f"{step_path}/{META_FILE}"
    raw = _read_or_none(storage, meta_path)
    if raw is None or hashlib.sha256(raw).hexdigest() != meta_sha256:
        return None  # someone else moved or deleted it meanwhile
    try:
        payload = _info_from(raw, step_path).path
    except UserError:
        payload = step_path  # a malformed meta.json: move what lies beside it
    step = step_path.rstrip("/").rsplit("/", 1)[-1]
    destination = f"{run_path}/{QUARANTINE_DIR}/{step}-{uuid.uuid4().hex[:8]}"
    stored = storage.files(step_path)
    if payload != step_path:
        attempt = payload.rsplit("/", 1)[-1]
        keys = [key for key in stored if key.startswith(f"{attempt}/")]
    else:
        keys = [key for key in stored if "/" not in key and key != META_FILE]
    for key in keys:
        storage.copy_file(f"{step_path}/{key}", f"{destination}/{key}")
    storage.write_bytes(f"{destination}/{META_FILE}", raw)
    note = {"from": storage.display(step_path), "reason": why, "time": time.time()}
    storage.write_bytes(f"{destination}/{QUARANTINE_NOTE}", json.dumps(note, indent=1).encode())
    again = _read_or_none(storage, meta_path)
    if again is None or hashlib.sha256(again).hexdigest() != meta_sha256:
        storage.rm(destination)  # a concurrent quarantine moved it first
        return None
    storage.rm(meta_path)  # meta.json first: the rest then reads as unreferenced, never as committed
    for path in [payload] if payload != step_path else [f"{step_path}/{key}" for key in keys]:
        storage.rm(path)
    storage.remove_empty_folder(step_path)
    return storage.display(destination)


def apply_retention(storage: Storage, run_path: str, keep_best: int, metric: str, mode: str,
                    verified: set[str] | None = None, fence: Fence | None = None) -> list[str]:
    """Keep the best `keep_best` by the job metric and the newest checkpoint that verifies; remove the rest.

    Before anything is removed, what is kept is verified: damaged checkpoints (even the best or the newest)
    are quarantined and the next good one is kept in their place; when none verifies, nothing is touched.
    `verified`: keys of checkpoints already verified by this process (see `_verified_key`), kept up to date.
    With a `fence`, a driver that a newer one has superseded removes nothing (Superseded)."""
    committed = list_committed(storage, run_path)
    if not committed:
        return []
    keep = {info.name for info in select_best(committed, metric, mode, keep_best)} | {committed[-1].name}
    if all(info.name in keep for info in committed):
        return []  # nothing to remove, so nothing to verify
    verified = set() if verified is None else verified
    damaged: dict[str, tuple[CheckpointInfo, str]] = {}

    def good(info: CheckpointInfo) -> bool:
        if _verified_key(info) in verified:
            return True
        if info.name not in damaged:
            problem = verify(storage, info)
            if problem is None:
                verified.add(_verified_key(info))
                return True
            damaged[info.name] = (info, problem)
        return False

    newest = next((info for info in reversed(committed) if good(info)), None)
    if newest is None:
        log.warning("retention: no committed checkpoint in %s verifies; removing nothing", storage.display(run_path))
        return []
    best = []
    for info in select_best(committed, metric, mode, len(committed)):
        if len(best) == keep_best:
            break
        if good(info):
            best.append(info.name)
    keep = {newest.name, *best}
    if fence:
        fence.check(storage)
    for info, problem in damaged.values():
        where = quarantine(storage, run_path, info.step_path, info.meta_sha256, problem)
        log.warning("%s does not verify (%s); moved to %s", info.name, problem, where)
    removed = []
    for info in committed:
        if info.name in keep or info.name in damaged:
            continue
        # meta.json first: a half-deleted folder then reads as uncommitted, never as broken
        storage.rm(f"{info.step_path}/{META_FILE}")
        storage.rm(info.path)
        storage.remove_empty_folder(info.step_path)
        removed.append(info.name)
    return removed


def _verified_key(info: CheckpointInfo) -> str:
    return f"{info.path}#{info.meta_sha256}"


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
        for name, entry in meta["files"].items():  # plain names: _parse_meta allows only PAYLOAD/OPTIONAL_FILES
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
    history = parse_history(payload[HISTORY_FILE], str(folder / HISTORY_FILE))
    ema_state = None
    if EMA_FILE in payload:
        try:
            ema_state = load_tensors(payload[EMA_FILE])
        except Exception as error:  # safetensors raises its own error types
            raise UserError(f"{folder / EMA_FILE}: unreadable weights ({error})") from None
    return LoadedCheckpoint(model_state, train_state, history, meta, ema_state)


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
    if not isinstance(files, dict) or not set(PAYLOAD_FILES) <= set(files) <= {*PAYLOAD_FILES, *OPTIONAL_FILES}:
        raise UserError(f"{where}: 'files' must list exactly {', '.join(PAYLOAD_FILES)} "
                        f"(and {', '.join(OPTIONAL_FILES)} when the run kept an EMA)")
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


def parse_history(raw: bytes, where: str) -> list[dict[str, Any]]:
    """history.jsonl's records; a line that is not a JSON object is one UserError line naming it."""
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

