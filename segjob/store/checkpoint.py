"""What a checkpoint holds, and how it is committed, listed, loaded and retired.

A checkpoint is a folder `<run>/checkpoints/step-000000120/`:

    model.safetensors   weights of the unwrapped model (no pickle)
    state.pt            optimizer, schedule, scaler, RNG, progress (loaded with weights_only=True)
    history.jsonl       every metric reported so far, cut at this step
    meta.json           written LAST: job config, step, epoch, metrics, sha256 of every other file

A folder is committed once its meta.json exists; readers ignore folders without one and
verify every hash before loading. Checkpoints from storage are untrusted input: file
names come only from meta.json's own list, are plain names, and must hash right.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

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


def fetch(storage: Storage, path: str, destination: Path) -> Path:
    """Download a committed checkpoint folder into `destination` (created; must not exist)."""
    if not storage.exists(f"{path}/{META_FILE}"):
        raise UserError(f"{path}: not a committed checkpoint (no {META_FILE}); it may be an unfinished upload")
    storage.get_folder(path, destination)
    return destination


def load_folder(folder: Path, expected_run: str | None = None) -> LoadedCheckpoint:
    """Verify and load a local checkpoint folder. Refuses anything that doesn't hash right."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise UserError(f"{folder}: not a checkpoint folder (no {META_FILE})")
    meta = _parse_meta(meta_path.read_bytes(), str(meta_path))
    if expected_run is not None and meta.get("run") != expected_run:
        raise UserError(f"{meta_path}: checkpoint belongs to run '{meta.get('run')}', not '{expected_run}'")
    for name, entry in meta["files"].items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path}: missing from the checkpoint (listed in {META_FILE})")
        if _sha256(path) != entry["sha256"]:
            raise UserError(f"{path}: sha256 does not match {META_FILE}; "
                            f"the checkpoint is damaged or was tampered with")
    try:
        model_state = load_file(folder / MODEL_FILE)
    except Exception as error:  # safetensors raises its own error types
        raise UserError(f"{folder / MODEL_FILE}: unreadable weights ({error})") from None
    try:
        train_state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as error:  # an unpickling error means a payload beyond plain tensors and containers
        raise UserError(f"{folder / STATE_FILE}: refused by the safe loader ({type(error).__name__}); "
                        f"not a segjob state file") from None
    history = [json.loads(line) for line in (folder / HISTORY_FILE).read_text().splitlines() if line.strip()]
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
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{where}: not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else "?"
        raise UserError(f"{where}: not a segjob checkpoint (format {found})")
    files = meta.get("files")
    if not isinstance(files, dict) or set(files) != set(PAYLOAD_FILES):
        raise UserError(f"{where}: 'files' must list exactly {', '.join(PAYLOAD_FILES)}")
    for name, entry in files.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise UserError(f"{where}: files.{name} has no sha256")
    if not isinstance(meta.get("step"), int) or not isinstance(meta.get("epoch"), int):
        raise UserError(f"{where}: 'step' and 'epoch' must be integers")
    if not isinstance(meta.get("metrics"), dict):
        raise UserError(f"{where}: 'metrics' must be a mapping")
    return meta


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

