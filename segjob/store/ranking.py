"""Runs and their checkpoints ranked by a metric: what pull chooses from and a sweep reports."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from segjob.errors import UserError
from segjob.job.schema import ema_recorded, ranked_metric_name, raw_metric
from segjob.job.sweep import TRIALS_DIR
from segjob.store import checkpoint
from segjob.store.run_folder import flatten
from segjob.store.storage import Storage

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


def rank(storage: Storage, path: str, metric: str | None = None, mode: str | None = None,
         raw_weights: bool = False) -> Ranking:
    """Every committed checkpoint under `path` carrying the metric, best first (a newer one wins a tie).
    The default metric is the one the runs' jobs rank by (with train.ema on, the EMA weights' val_ema/...);
    raw_weights: the trained weights' figure (val/...) instead, of the default metric or the one given."""
    committed = {name: checkpoint.list_committed(storage, run_path) for name, run_path in find_runs(storage, path)}
    committed = {name: infos for name, infos in committed.items() if infos}
    if not committed:
        raise UserError(f"{storage.display(path)}: no committed checkpoints found (a run, a sweep or a folder of runs; "
                        f"damaged ones are skipped with a warning)")
    jobs = {name: infos[-1].meta.get("job") or {} for name, infos in committed.items()}
    metric = metric or _job_metric(jobs, "name", path, storage, raw_weights)
    metric, mode = raw_metric(metric) if raw_weights else metric, mode or _job_metric(jobs, "mode", path, storage)
    params = differing_params(jobs)
    candidates = [
        Candidate(name, info, value, params[name])
        for name, infos in committed.items() for info in infos
        if (value := checkpoint.metric_value(info, metric)) is not None
    ]
    if not candidates:
        seen = sorted({key for infos in committed.values() for info in infos for key in info.metrics})
        raise UserError(f"{storage.display(path)}: no checkpoint carries '{printable(metric)}'; "
                        f"metrics seen: {', '.join(map(printable, seen))}")
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


def _job_metric(jobs: dict[str, dict[str, Any]], field: str, path: str, storage: Storage,
                raw_weights: bool = False) -> str:
    found = set()
    for job in jobs.values():  # jobs come from meta.json in storage: anything but a plain name is no name
        metric = job.get("metric")
        value = metric.get(field) if isinstance(metric, dict) else None
        if isinstance(value, str) and field == "name":
            found.add(ranked_metric_name(value, ema_recorded(job) and not raw_weights))
        elif isinstance(value, str) and value in ("max", "min"):
            found.add(value)
    if len(found) != 1:
        flag = "--metric" if field == "name" else "--mode"
        raise UserError(f"{storage.display(path)}: the runs' jobs name {len(found)} different metric {field}s "
                        f"({', '.join(sorted(printable(value) for value in found))}); choose one with {flag}")
    return found.pop()


def format_table(ranking: Ranking, limit: int | None = None) -> str:
    rows = [["#", "run", "checkpoint", "epoch", printable(ranking.metric), "params"]]
    for number, candidate in enumerate(ranking.candidates[:limit], start=1):
        rows.append([str(number), printable(candidate.run), printable(candidate.info.name), str(candidate.info.epoch),
                     f"{candidate.value:.4f}", format_params(candidate.params)])
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    hidden = len(ranking.candidates) - len(rows) + 1
    if hidden > 0:
        lines.append(f"... and {hidden} more (--list shows all)")
    return "\n".join(line.rstrip() for line in lines)


def format_params(params: dict[str, Any]) -> str:
    return " ".join(printable(f"{key}={_short(value)}") for key, value in params.items()) or "-"


def printable(text: str) -> str:
    """Names and values from storage as they are, unless they hold control characters (a line break,
    a terminal escape): then escaped, so a bucket can't rewrite what the user's terminal shows."""
    return text if text.isprintable() else ascii(text)


def _short(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value) and value != 0 and not 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
