"""What a finished sweep says: one row per trial, the best checkpoint, a picture of the search.

    rows = trial_rows(outcomes, ranking, sweep)      # outcomes from Tune, ranking from segjob.pull.rank
    print(format_rows(rows, sweep))
    storage.write_bytes(f"{sweep_path}/results.csv", rows_csv(rows, sweep))
    storage.write_bytes(f"{sweep_path}/search.png", search_plot(rows, sweep))

A trial's figure of merit is its best committed checkpoint (what `segjob.pull` would hand
out), read from meta.json; Tune's view adds its status (finished, stopped early by ASHA,
failed), the epochs it got and its time. No Ray here.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
from typing import Any

from segjob.job.sweep import Sweep
from segjob.store.ranking import Ranking, format_params
from segjob.store.storage import Storage

log = logging.getLogger("segjob")

FINISHED, STOPPED, FAILED = "finished", "stopped early", "failed"


@dataclasses.dataclass
class TrialOutcome:
    """A trial as Tune saw it end."""

    trial: str
    params: dict[str, Any]
    status: str  # FINISHED, STOPPED or FAILED
    epochs: int  # the last evaluated epoch reported (0: none)
    last_value: float | None
    seconds: float | None
    error: str | None = None


@dataclasses.dataclass
class TrialRow:
    outcome: TrialOutcome
    best_value: float | None  # the trial's best committed checkpoint by the sweep's metric
    best_epoch: int | None
    best_checkpoint: str | None  # its URI


def trial_rows(outcomes: list[TrialOutcome], ranking: Ranking | None, sweep: Sweep, storage: Storage) -> list[TrialRow]:
    """One row per trial, best first (trials without a checkpoint carrying the metric last)."""
    best: dict[str, Any] = {}
    for candidate in ranking.candidates if ranking else []:
        best.setdefault(candidate.run, candidate)  # candidates come best first
    rows = []
    for outcome in outcomes:
        candidate = best.get(outcome.trial)
        if candidate is None:
            rows.append(TrialRow(outcome, None, None, None))
        else:
            rows.append(TrialRow(outcome, candidate.value, candidate.info.epoch, storage.display(candidate.info.path)))
    sign = -1.0 if sweep.mode == "max" else 1.0
    rows.sort(key=lambda row: (row.best_value is None, sign * (row.best_value or 0.0), row.outcome.trial))
    return rows


def columns(sweep: Sweep) -> list[str]:
    return ["trial", "status", "epochs", f"best {sweep.metric}", "best epoch", f"last {sweep.metric}", "seconds",
            *sweep.tune.space, "checkpoint", "error"]


def row_values(row: TrialRow, sweep: Sweep) -> list[Any]:
    outcome = row.outcome
    return [outcome.trial, outcome.status, outcome.epochs, row.best_value, row.best_epoch, outcome.last_value,
            None if outcome.seconds is None else round(outcome.seconds, 1),
            *(outcome.params.get(key) for key in sweep.tune.space), row.best_checkpoint, outcome.error]


def rows_csv(rows: list[TrialRow], sweep: Sweep) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns(sweep))
    for row in rows:
        writer.writerow(["" if value is None else value for value in row_values(row, sweep)])
    return buffer.getvalue().encode()


def format_rows(rows: list[TrialRow], sweep: Sweep) -> str:
    table = [["#", "trial", "status", "epochs", f"best {sweep.metric}", "seconds", "params"]]
    for number, row in enumerate(rows, start=1):
        outcome = row.outcome
        best = "-" if row.best_value is None else f"{row.best_value:.4f} (epoch {row.best_epoch})"
        seconds = "-" if outcome.seconds is None else f"{outcome.seconds:.0f}"
        table.append([str(number), outcome.trial, outcome.status, f"{outcome.epochs}/{sweep.max_epochs}", best, seconds,
                      format_params(outcome.params)])
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]) - 1)]
    return "\n".join(("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1]).rstrip()
                     for line in table)


def best_record(ranking: Ranking, sweep: Sweep, storage: Storage, sweep_uri: str) -> dict[str, Any]:
    """best.json: the sweep's best checkpoint, where it is and how to fetch it."""
    best = ranking.candidates[0]
    params = best.info.meta.get("job", {})
    return {
        "metric": ranking.metric, "mode": ranking.mode, "value": best.value,
        "trial": best.run, "epoch": best.info.epoch, "step": best.info.step,
        "params": {key: _lookup(params, key) for key in sweep.tune.space},
        "checkpoint": storage.display(best.info.path),
        "pull": f"python -m segjob.pull {sweep_uri} --to ./best",
    }


def _lookup(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


# --- the picture ------------------------------------------------------------------------


def search_plot(rows: list[TrialRow], sweep: Sweep) -> bytes:
    """PNG: every trial as a line across the searched keys to its best metric (parallel
    coordinates), and each key's importance for the metric (Optuna's PED-ANOVA) beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [row for row in rows if row.best_value is not None]
    figure, (lines_axes, importance_axes) = plt.subplots(
        1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 1.3]}, constrained_layout=True)
    _parallel_coordinates(lines_axes, scored, sweep, plt)
    _importances(importance_axes, scored, sweep)
    figure.suptitle(f"sweep {sweep.name}: {len(rows)} trials, {sweep.metric} ({sweep.mode})")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def _parallel_coordinates(axes, rows: list[TrialRow], sweep: Sweep, plt) -> None:
    keys = list(sweep.tune.space)
    axes.set_xticks(range(len(keys) + 1), [*keys, sweep.metric], rotation=15)
    axes.set_yticks([])
    axes.set_ylim(-0.05, 1.05)
    for position in range(len(keys) + 1):
        axes.axvline(position, color="0.7", linewidth=0.8)
    for position, key in enumerate(keys):
        for y, label in _axis_labels(sweep.tune.space[key]):
            axes.annotate(label, (position, y), xytext=(3, 0), textcoords="offset points", fontsize=7, color="0.35")
    if not rows:
        axes.text(0.5, 0.5, "no trial has a checkpoint with the metric yet", ha="center", transform=axes.transAxes)
        return
    values = [row.best_value for row in rows]
    low, high = min(values), max(values)
    colour = plt.get_cmap("viridis")
    for row in sorted(rows, key=lambda r: r.best_value if sweep.mode == "max" else -r.best_value):
        score = 0.5 if high == low else (row.best_value - low) / (high - low)
        quality = score if sweep.mode == "max" else 1 - score
        ys = [_position(sweep.tune.space[key], row.outcome.params.get(key)) for key in keys] + [score]
        axes.plot(range(len(ys)), ys, color=colour(quality), linewidth=1.6, alpha=0.85,
                  linestyle="--" if row.outcome.status == STOPPED else "-")
    axes.annotate(f"{high:.4g}", (len(keys), 1), xytext=(3, 0), textcoords="offset points", fontsize=7)
    axes.annotate(f"{low:.4g}", (len(keys), 0), xytext=(3, 0), textcoords="offset points", fontsize=7)
    axes.set_title("trials (dashed: stopped early by ASHA; colour: best metric)", fontsize=9)


def _position(dimension, value: Any) -> float:
    """Where a value sits on its axis, 0..1: log scale for log dimensions, even spacing for choices."""
    if value is None:
        return math.nan
    if dimension.kind == "choice":
        index = next((i for i, choice in enumerate(dimension.choices) if choice == value), 0)
        return 0.5 if len(dimension.choices) == 1 else index / (len(dimension.choices) - 1)
    low, high, value = float(dimension.low), float(dimension.high), float(value)
    if dimension.log:
        low, high, value = math.log(low), math.log(high), math.log(value)
    return (value - low) / (high - low)


def _axis_labels(dimension) -> list[tuple[float, str]]:
    if dimension.kind == "choice":
        return [(_position(dimension, choice), str(choice)) for choice in dimension.choices]
    return [(0.0, f"{dimension.low:g}"), (1.0, f"{dimension.high:g}")]


def _importances(axes, rows: list[TrialRow], sweep: Sweep) -> None:
    importances = param_importances(rows, sweep)
    axes.set_title(f"importance for {sweep.metric} (PED-ANOVA)", fontsize=9)
    if not importances:
        axes.text(0.5, 0.5, "needs 2+ trials with\ndifferent results", ha="center", va="center",
                  transform=axes.transAxes, fontsize=9)
        axes.set_axis_off()
        return
    keys = list(importances)[::-1]
    axes.barh(keys, [importances[key] for key in keys], color="tab:blue")
    axes.set_xlim(0, 1)
    axes.tick_params(axis="y", labelsize=8)


def param_importances(rows: list[TrialRow], sweep: Sweep) -> dict[str, float]:
    """Optuna's PED-ANOVA importances over the trials' best values (what sets the best trials apart;
    no scikit-learn needed, unlike fANOVA); empty when there is too little to tell."""
    import optuna

    if len({row.best_value for row in rows}) < 2:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if sweep.mode == "max" else "minimize")
    distributions = {key: dimension.to_optuna() for key, dimension in sweep.tune.space.items()}
    for row in rows:
        params = {key: row.outcome.params[key] for key in distributions if key in row.outcome.params}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={key: distributions[key] for key in params}, value=row.best_value))
    try:
        return optuna.importance.get_param_importances(study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except (ValueError, RuntimeError) as error:  # e.g. every trial with the same parameters
        log.info("no parameter importances: %s", error)
        return {}
