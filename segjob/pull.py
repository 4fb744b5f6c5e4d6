"""Find the best checkpoint of a run or a whole sweep in storage and download it, verified.

    python -m segjob.pull s3://bucket/runs/tune_pets --to ./best
    python -m segjob.pull ./runs/tune_quickstart --list
    python -m segjob.pull gs://bucket/runs/tune_pets --top 3 --to ./top3 --metric val/loss --mode min
    python -m segjob.evaluate ./best

URI is a run (`<storage.uri>/<name>`), a sweep (its `trials/` hold one run per trial) or a
folder of runs, on s3://, gs:// or a local path. Only the checkpoints' meta.json files are
read to rank them (no Ray, no cluster, no Tune files); checkpoints without meta.json are
unfinished uploads and never count. The chosen checkpoint is downloaded into a temporary
folder beside DIR, every file is checked against the sha256 in its meta.json, and only then
is the folder renamed to DIR, so DIR is either the complete verified checkpoint or untouched.
An object key or a run name that would land outside DIR is refused before anything is written.
With --top K, DIR holds one folder per checkpoint, best first.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from . import checkpoint
from .errors import UserError, exits_cleanly_on_user_error, setup_logging
from .runs import flatten
from .storage import Storage, open_storage, replace_dir
from .sweep import TRIALS_DIR

log = logging.getLogger("segjob")

PULLED_FILE = "pulled.json"  # what a pull wrote, where from: marks DIR as safe to replace by the next pull
# Keys that differ between runs without saying anything about how they were trained
NOT_PARAMS = ("name", "storage.")


@dataclasses.dataclass
class Candidate:
    """A committed checkpoint, ranked by the metric."""

    run: str  # the run's folder name: a trial id in a sweep
    info: checkpoint.CheckpointInfo
    value: float
    params: dict[str, Any]  # the job keys whose values differ between the runs found

    @property
    def folder_name(self) -> str:
        return f"{self.run}-{self.info.name}"


@dataclasses.dataclass
class Ranking:
    metric: str
    mode: str
    candidates: list[Candidate]  # best first
    runs: int  # runs found under the URI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m segjob.pull", description=__doc__.split("\n\n")[0])
    parser.add_argument("uri", help="a run or a sweep: s3://bucket/runs/NAME, gs://bucket/runs/NAME or ./runs/NAME")
    parser.add_argument("--to", default="best", help="where to put the checkpoint (default: ./best)")
    parser.add_argument("--metric", help="rank by this metric (default: the job's metric.name)")
    parser.add_argument("--mode", choices=["max", "min"], help="default: the job's metric.mode")
    parser.add_argument("--top", type=int, default=1, metavar="K", help="download the K best checkpoints (default 1)")
    parser.add_argument("--list", action="store_true", help="print every ranked checkpoint; download nothing")
    parser.add_argument("--endpoint-url", help="S3/GCS endpoint (MinIO, emulators); else AWS_ENDPOINT_URL / STORAGE_EMULATOR_HOST")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be 1 or more")
    return args


# --- ranking ----------------------------------------------------------------------------


def open_location(uri: str, endpoint_url: str | None = None) -> Storage:
    """Storage rooted at the run or sweep; a local folder must exist (pull never creates one there)."""
    storage = open_storage(uri, endpoint_url)
    if storage.is_local:
        if not os.path.isdir(storage.root):
            raise UserError(f"{uri}: no such folder")
    else:
        storage.check()
    return storage


def find_runs(storage: Storage, path: str) -> list[tuple[str, str]]:
    """(name, path) of every run at or under `path`: the run itself, a sweep's trials, or a folder of runs."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if storage.list_dirs(checkpoint.checkpoints_path(path)):
        return [(name, path)]
    children = storage.list_dirs(path)
    parent = f"{path}/{TRIALS_DIR}" if TRIALS_DIR in children else path
    names = storage.list_dirs(parent) if parent != path else children
    return [(child, f"{parent}/{child}") for child in names
            if storage.list_dirs(checkpoint.checkpoints_path(f"{parent}/{child}"))]


def rank(storage: Storage, path: str, metric: str | None = None, mode: str | None = None) -> Ranking:
    """Every committed checkpoint under `path` carrying the metric, best first (a newer one wins a tie)."""
    committed = {name: checkpoint.list_committed(storage, run_path) for name, run_path in find_runs(storage, path)}
    committed = {name: infos for name, infos in committed.items() if infos}
    if not committed:
        raise UserError(f"{display_uri(storage, path)}: no committed checkpoints found (a run, a sweep or a folder of runs)")
    jobs = {name: infos[-1].meta.get("job") or {} for name, infos in committed.items()}
    metric, mode = metric or _job_metric(jobs, "name", path, storage), mode or _job_metric(jobs, "mode", path, storage)
    params = differing_params(jobs)
    candidates = [
        Candidate(name, info, value, params[name])
        for name, infos in committed.items() for info in infos
        if (value := checkpoint.metric_value(info, metric)) is not None
    ]
    if not candidates:
        seen = sorted({key for infos in committed.values() for info in infos for key in info.metrics})
        raise UserError(f"{display_uri(storage, path)}: no checkpoint carries '{metric}'; metrics seen: {', '.join(seen)}")
    sign = -1.0 if mode == "max" else 1.0
    candidates.sort(key=lambda c: (sign * c.value, -c.info.step, c.run))
    return Ranking(metric, mode, candidates, len(committed))


def differing_params(jobs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per run, the job keys whose values are not the same in every run (what a sweep searched)."""
    flat = {name: flatten(job) for name, job in jobs.items()}
    keys = sorted({key for values in flat.values() for key in values})
    varying = [key for key in keys if not key.startswith(NOT_PARAMS)
               and len({json.dumps(values.get(key), sort_keys=True) for values in flat.values()}) > 1]
    return {name: {key: values.get(key) for key in varying} for name, values in flat.items()}


def _job_metric(jobs: dict[str, dict[str, Any]], field: str, path: str, storage: Storage) -> str:
    found = {(job.get("metric") or {}).get(field) for job in jobs.values()} - {None}
    if len(found) != 1:
        flag = "--metric" if field == "name" else "--mode"
        raise UserError(f"{display_uri(storage, path)}: the runs' jobs name {len(found)} different metric {field}s "
                        f"({', '.join(sorted(map(str, found)))}); choose one with {flag}")
    return found.pop()


def display_uri(storage: Storage, path: str) -> str:
    return path if storage.is_local else f"{storage.uri.split('://', 1)[0]}://{path}"


def format_table(ranking: Ranking, limit: int | None = None) -> str:
    rows = [["#", "run", "checkpoint", "epoch", ranking.metric, "params"]]
    for number, candidate in enumerate(ranking.candidates[:limit], start=1):
        rows.append([str(number), candidate.run, candidate.info.name, str(candidate.info.epoch),
                     f"{candidate.value:.4f}", format_params(candidate.params)])
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    hidden = len(ranking.candidates) - len(rows) + 1
    if hidden > 0:
        lines.append(f"... and {hidden} more (--list shows all)")
    return "\n".join(line.rstrip() for line in lines)


def format_params(params: dict[str, Any]) -> str:
    return " ".join(f"{key}={_short(value)}" for key, value in params.items()) or "-"


def _short(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value) and value != 0 and not 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


# --- downloading ------------------------------------------------------------------------


def download(storage: Storage, chosen: list[Candidate], dest: Path, ranking: Ranking) -> Path:
    """Fetch and verify into a temporary sibling of dest, then rename it into place."""
    dest = Path(dest).absolute()
    check_replaceable(dest)
    for candidate in chosen:  # names from a listing become local folder names: refuse anything but plain names
        for name in (candidate.run, candidate.info.name):
            if name in ("", ".", "..") or "/" in name or "\\" in name:
                raise UserError(f"{display_uri(storage, candidate.info.path)}: refusing unsafe name '{name}'")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        if len(chosen) == 1:
            fetch_verified(storage, chosen[0], partial, ranking, 1)
        else:
            partial.mkdir()
            for number, candidate in enumerate(chosen, start=1):
                fetch_verified(storage, candidate, partial / f"{number:02d}-{candidate.folder_name}", ranking, number)
            _write_json(partial / PULLED_FILE, {"source": display_uri(storage, storage.root), "checkpoints": [
                f"{number:02d}-{candidate.folder_name}" for number, candidate in enumerate(chosen, start=1)]})
        replace_dir(partial, dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest


def fetch_verified(storage: Storage, candidate: Candidate, folder: Path, ranking: Ranking, number: int) -> None:
    checkpoint.fetch(storage, candidate.info.path, folder)  # refuses keys with '..' or absolute paths
    loaded = checkpoint.load_folder(folder)  # every hash, and the safe loaders, or a UserError naming the file
    if loaded.meta.get("step") != candidate.info.step:
        raise UserError(f"{display_uri(storage, candidate.info.path)}: meta.json changed while pulling; pull again")
    _write_json(folder / PULLED_FILE, {
        "source": display_uri(storage, candidate.info.path), "run": candidate.run, "checkpoint": candidate.info.name,
        "rank": number, "epoch": candidate.info.epoch, "step": candidate.info.step,
        "metric": ranking.metric, "mode": ranking.mode, "value": candidate.value, "params": candidate.params,
        "pulled_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })


def check_replaceable(dest: Path) -> None:
    """Only an empty folder or an earlier pull is replaced: never a folder of the user's own files."""
    if not os.path.lexists(dest):
        return
    if dest.is_dir() and not dest.is_symlink() and (not any(dest.iterdir()) or (dest / PULLED_FILE).is_file()):
        return
    raise UserError(f"{dest}: exists and is not an earlier pull; choose another --to or remove it")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


# --- the command ------------------------------------------------------------------------


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    storage = open_location(args.uri, args.endpoint_url)
    ranking = rank(storage, storage.root, args.metric, args.mode)
    where = display_uri(storage, storage.root)
    log.info("%d checkpoints with %s in %d run(s) under %s, ranked (%s)",
             len(ranking.candidates), ranking.metric, ranking.runs, where, ranking.mode)
    print(format_table(ranking, None if args.list else max(args.top, 10)))
    if args.list:
        return 0
    chosen = ranking.candidates[: args.top]
    if len(chosen) < args.top:
        log.info("only %d checkpoint(s) to pull (asked for %d)", len(chosen), args.top)
    dest = download(storage, chosen, Path(args.to), ranking)
    best = chosen[0]
    log.info("pulled %s/%s (%s %.4f, epoch %d) -> %s; every file verified against its sha256",
             best.run, best.info.name, ranking.metric, best.value, best.info.epoch,
             dest if len(chosen) == 1 else f"{dest} ({len(chosen)} checkpoints, best first)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
