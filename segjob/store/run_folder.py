"""A run folder's own files: which job it runs, which driver drives it, whether it has finished.

    <storage>/<name>/job.json     the job the run was started with (resubmissions must match it)
    <storage>/<name>/lease.json   which driver drives the run now (store/lease.py)
    <storage>/<name>/done.json    written by rank 0 once every epoch has finished

A resubmitted job may change only what does not change the result (epochs, scaling,
storage endpoint, failure and preemption handling, data location).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pydantic import ValidationError

from segjob.errors import UserError
from segjob.job.schema import JobConfig
from segjob.store.storage import Storage

log = logging.getLogger("segjob")

JOB_FILE = "job.json"
DONE_FILE = "done.json"

# Keys a resubmission may change: they move or scale the run, they don't change what it computes.
MAY_CHANGE_ON_RESUME = (
    "train.epochs", "train.checkpoint_every_steps", "train.log_every_steps",
    "train.preview_every_epochs", "train.preview_images",
    "scaling.", "storage.uri", "storage.endpoint_url", "storage.keep_best", "failure.", "preemption.",
    "data.loader_workers", "data.endpoint_url", "tracking.",
)  # plus every file path of the data and model sections (moved data is the same data)



def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): tree}


def changed_keys(recorded: dict[str, Any], current: dict[str, Any], path_keys: tuple[str, ...] = ()) -> list[str]:
    """Keys whose values differ and that may not change on resume."""
    old, new = flatten(recorded), flatten(current)
    differing = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    return [key for key in differing if not may_change_on_resume(key) and key not in path_keys]


def may_change_on_resume(key: str) -> bool:
    return any(key.startswith(allowed) if allowed.endswith(".") else key == allowed for allowed in MAY_CHANGE_ON_RESUME)


def file_path_keys(job: JobConfig) -> tuple[str, ...]:
    """data.root, data.path, model.encoder_weights, ...: where files live, not what they hold."""
    keys = []
    for section in ("data", "model"):
        config = getattr(job, section)
        keys += [f"{section}.{key}" for key in config.path_keys()]
    return tuple(keys)


def with_defaults(recorded: dict[str, Any]) -> dict[str, Any]:
    """A job recorded by an older segjob, with the keys added since at their defaults
    (a new option is not a change); as recorded when it no longer validates. The exception is how
    validation counted pixels: a run recorded before `eval` existed counted on the input grid, and
    mixing two counts in one run would rank its checkpoints wrongly."""
    if isinstance(recorded, dict) and "eval" not in recorded:
        recorded = {**recorded, "eval": {"grid": "input"}}
    try:
        return JobConfig.model_validate(recorded).model_dump(mode="json")
    except ValidationError:
        return recorded


def check_same_job(storage: Storage, run_path: str, job: JobConfig, job_file: str) -> None:
    """Record the job on a first start; refuse a resubmission that would change the result."""
    current = job.model_dump(mode="json")
    try:
        recorded = json.loads(storage.read_bytes(f"{run_path}/{JOB_FILE}"))
    except FileNotFoundError:
        storage.write_bytes(f"{run_path}/{JOB_FILE}", json.dumps(current, indent=1).encode())
        return
    recorded = with_defaults(recorded)
    differing = changed_keys(recorded, current, file_path_keys(job))
    if differing:
        before, after = flatten(recorded), flatten(current)
        shown = ", ".join(f"{key} ({before.get(key)!r} -> {after.get(key)!r})" for key in differing[:4])
        more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
        raise UserError(
            f"{job_file}: run '{job.name}' already exists in {storage.uri} with a different job: {shown}{more}; "
            f"undo the change, give the job a new name, or pass --restart to start a fresh run beside it"
        )
    storage.write_bytes(f"{run_path}/{JOB_FILE}", json.dumps(current, indent=1).encode())  # record allowed changes


def fresh_run_name(storage: Storage, name: str) -> str:
    """The first free `<name>-rN` beside an existing run (never touching the old one)."""
    for number in range(2, 10_000):
        candidate = f"{name}-r{number}"
        if not storage.list_dirs(storage.path(candidate)) and not storage.exists(storage.path(candidate, JOB_FILE)):
            return candidate
    raise UserError(f"{storage.uri}: no free run name beside '{name}'")


def write_done(storage: Storage, run_path: str, epochs: int, step: int, metrics: dict[str, Any]) -> None:
    """Mark the run finished (rank 0, after its final checkpoint is committed): a resubmission then stops at once."""
    record = {"epochs": epochs, "step": step, "metrics": metrics, "time": time.time()}
    storage.write_bytes(f"{run_path}/{DONE_FILE}", json.dumps(record, indent=1, allow_nan=True).encode())


def read_done(storage: Storage, run_path: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(f"{run_path}/{DONE_FILE}"))
    except FileNotFoundError:
        return None
