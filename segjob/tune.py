"""Search hyperparameters: Optuna (TPE) proposes, ASHA stops poor trials early, every trial a DDP run.

    python -m segjob.tune jobs/tune_quickstart.yaml
    python -m segjob.tune jobs/tune_pets.yaml --set data.root=/data/pets --set tune.num_samples=32
    python -m segjob.tune jobs/tune_pets.yaml --dry-run      # validate and show the plan; no Ray
    ray job submit --working-dir . -- python -m segjob.tune jobs/tune_pets.yaml

The sweep file is a job plus a `tune:` section (segjob.sweep). Each trial is a full
TorchTrainer run of the job with the trial's values, named by its trial id, in
`<storage.uri>/<name>/trials/<trial id>/`: the same checkpoints, resume and preemption
handling as `segjob.train`. Only evaluation results reach Tune, each with its `epoch`,
which is ASHA's clock. Tune's own state sits beside them in `<storage.uri>/<name>/`.

Spot-safe: a trial whose workers die resumes from its own newest checkpoint inside the same
trial (Ray Train restarts the workers). When the driver or the head node dies, submit the
same command again: the sweep is restored with Optuna's study and ASHA's rungs as they were;
finished trials stay finished and interrupted or failed ones continue from their checkpoints.
At the end `results.csv`, `best.json` and `search.png` are written next to the trials, and
`python -m segjob.pull <storage.uri>/<name> --to ./best` fetches the best checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import ray
import ray.tune
from ray.tune import Callback, FailureConfig, RunConfig, TuneConfig, Tuner
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from . import checkpoint, pull, ray_worker, runs, sweep_report
from .check import preflight
from .data import build_datasets
from .errors import UserError, exits_cleanly_on_user_error, setup_logging
from .storage import Storage, open_storage
from .sweep import TRIALS_DIR, Sweep, load_sweep

log = logging.getLogger("segjob")

SWEEP_FILE = "sweep.json"  # the sweep as first submitted: a resubmission must match it
RESULTS_FILE, BEST_FILE, PLOT_FILE = "results.csv", "best.json", "search.png"
# An evaluation result is one carrying this key (the engine always reports the validation loss)
EVALUATION_KEY = "val/loss"
# A trial's driver function only waits on its TorchTrainer: no CPU, so the workers get every core,
# but a little memory, because Tune needs some resource to place it by. It runs on the head node
# (Ray marks it with this resource), and so does its Train controller (Ray pins the controller to
# the driver's node): a spot worker node that goes takes only workers with it, which Ray Train
# restarts inside the trial, never a trial's driver (that would be a Tune failure).
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 1024**2, "node:__internal_head__": 0.001}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m segjob.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="sweep YAML file: a job plus a tune: section, e.g. jobs/tune_quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job key or a tune key, e.g. --set train.epochs=3 --set tune.num_samples=4")
    parser.add_argument("--restart", action="store_true",
                        help="start a fresh sweep beside an existing one (named <name>-rN); the old one is kept")
    parser.add_argument("--dry-run", action="store_true", help="check the sweep, its storage and data; start nothing")
    return parser.parse_args(argv)


# --- what reaches Tune ------------------------------------------------------------------


class EvaluationsToTune(TuneReportCallback):
    """Rank 0's evaluation results, and only those, go to Tune (ASHA and Optuna read the metric
    from every result they get). Mid-epoch checkpoints carry no validation metric and stay out."""

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if EVALUATION_KEY in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def make_trial_function(sweep: Sweep, use_gpu: bool) -> Callable[[dict[str, Any]], None]:
    def run_trial(params: dict[str, Any]) -> None:
        """One trial, on its Tune actor: the job with these values as a TorchTrainer run named by the trial id."""
        setup_logging()
        trial_id = ray.tune.get_context().get_trial_id()
        ray_worker.label_log_lines(trial_id)
        job = sweep.trial_job(trial_id, params)
        storage = open_storage(job.storage.uri, job.storage.endpoint_url)
        run_path = storage.path(job.name)
        done = runs.read_done(storage, run_path)
        if done and done.get("epochs", 0) >= job.train.epochs:
            # trained to the end before a driver restart that never heard of it: tell Tune again, train nothing
            log.info("already trained (%d epochs); reporting its final evaluation", done["epochs"])
            ray.tune.report(done["metrics"])
            return
        # this trial's previous attempt is gone (Tune starts a trial again only then): no upload can be running
        checkpoint.remove_uncommitted(storage, run_path)
        ray_worker.forget_ray_snapshot(storage, run_path)
        trainer = ray_worker.build_trainer(job, storage, use_gpu, callbacks=[EvaluationsToTune()], log_label=trial_id)
        ray_worker.fit(trainer)

    return run_trial


def tune_dirname(trial) -> str:
    """Tune's own folder for a trial (params.json, result.json): beside trials/, named by the id."""
    return f"tune-{trial.trial_id}"


# --- driver-side callbacks --------------------------------------------------------------


class SchedulerState(Callback):
    """Keeps the scheduler's state (ASHA's rungs) in Tune's experiment state.

    Tune saves the searcher's state for a restore but not the scheduler's: without this a
    restored sweep's ASHA would start with empty rungs and judge new trials against nothing.
    Uses the scheduler's own save/restore (a pickle of its state, like the searcher's).
    """

    def __init__(self, scheduler: TrialScheduler):
        self.scheduler = scheduler

    def get_state(self) -> dict:
        with tempfile.TemporaryDirectory() as folder:
            self.scheduler.save(f"{folder}/scheduler.pkl")
            return {"scheduler": Path(f"{folder}/scheduler.pkl").read_bytes()}

    def set_state(self, state: dict) -> None:
        with tempfile.TemporaryDirectory() as folder:
            Path(f"{folder}/scheduler.pkl").write_bytes(state["scheduler"])
            self.scheduler.restore(f"{folder}/scheduler.pkl")
        log.info("restored the scheduler's state (%s)", type(self.scheduler).__name__)


class SweepProgress(Callback):
    """One line per evaluation and per trial start or end: who runs, who stopped, the best so far.

    Tune calls these hooks before it updates the trial itself (its status, its metric
    analysis), so each line counts the event it reports on explicitly.
    """

    def __init__(self, metric: str, mode: str, max_epochs: int, num_samples: int):
        self.metric, self.mode, self.max_epochs, self.num_samples = metric, mode, max_epochs, num_samples

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        log.info("trial %s started: %s | %s", trial.trial_id, pull.format_params(trial.config),
                 self.summary(trials, {trial.trial_id: "RUNNING"}))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        log.info("trial %s epoch %s/%d %s %.4f | %s", trial.trial_id, result.get("epoch"), self.max_epochs,
                 self.metric, result.get(self.metric, math.nan),
                 self.summary(trials, latest=(result.get(self.metric), trial.trial_id)))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        epoch = (trial.last_result or {}).get("epoch", 0)
        how = "finished" if epoch >= self.max_epochs else f"stopped early by the scheduler after epoch {epoch}"
        log.info("trial %s %s | %s", trial.trial_id, how, self.summary(trials, {trial.trial_id: "TERMINATED"}))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error = Path(trial.error_file) if trial.error_file else None
        last_line = error.read_text().strip().splitlines()[-1] if error and error.is_file() else "see its error.txt"
        log.warning("trial %s failed: %s | %s", trial.trial_id, last_line, self.summary(trials, {trial.trial_id: "ERROR"}))

    def summary(self, trials, status: dict[str, str] | None = None,
                latest: tuple[float | None, str] | None = None) -> str:
        counts = {"running": 0, "pending": 0, "finished": 0, "stopped early": 0, "failed": 0}
        for trial in trials:
            now = (status or {}).get(trial.trial_id, trial.status)
            if now == "TERMINATED":
                done = (trial.last_result or {}).get("epoch", 0) >= self.max_epochs
                counts["finished" if done else "stopped early"] += 1
            elif now == "ERROR":
                counts["failed"] += 1
            else:
                counts["running" if now == "RUNNING" else "pending"] += 1
        counts["not started"] = self.num_samples - len(trials)
        line = ", ".join(f"{count} {what}" for what, count in counts.items() if count)
        best = self.best(trials, latest)
        if best:
            line += f" | best {self.metric} {best[0]:.4f} (trial {best[1]})"
        return line

    def best(self, trials, latest: tuple[float | None, str] | None = None) -> tuple[float, str] | None:
        scored = [(trial.metric_analysis[self.metric][self.mode], trial.trial_id)
                  for trial in trials if self.metric in trial.metric_analysis]
        if latest and isinstance(latest[0], (int, float)):
            scored.append(latest)
        return (max if self.mode == "max" else min)(scored) if scored else None


# --- the sweep --------------------------------------------------------------------------


def prepare(sweep: Sweep) -> Storage:
    """Check storage, data and the metric before Ray starts anything."""
    storage = open_storage(sweep.job.storage.uri, sweep.job.storage.endpoint_url)
    storage.check()
    preflight(sweep.job)  # every sample, once, before any trial spends GPU time on it
    train_set, _ = build_datasets(sweep.job.data, sweep.job.seed)
    parts = sweep.metric.split("/")
    if len(parts) == 3 and parts[2] not in train_set.class_names:  # val/iou/<class>, val/dice/<class>
        raise UserError(f"{sweep.source}: metric {sweep.metric}: no class '{parts[2]}' in {sweep.job.data.name} "
                        f"({', '.join(train_set.class_names)})")
    if sweep.tune.scheduler == "asha" and sweep.tune.asha.grace_period > sweep.max_epochs:
        raise UserError(f"{sweep.source}: tune.asha.grace_period ({sweep.tune.asha.grace_period}) is more than the "
                        f"{sweep.max_epochs} epochs a trial gets; lower it or raise train.epochs")
    return storage


def check_same_sweep(storage: Storage, sweep_path: str, sweep: Sweep) -> None:
    """Record the sweep on a first start; refuse a resubmission that searches differently.

    Tune restores a sweep with the search space, searcher and scheduler it started with, so a
    changed tune section would be silently ignored; a changed job would mix two sweeps in one.
    Only what moves or scales the trials may change (runs.MAY_CHANGE_ON_RESUME, not train.epochs).
    """
    current = sweep.record()
    try:
        recorded = json.loads(storage.read_bytes(f"{sweep_path}/{SWEEP_FILE}"))
    except FileNotFoundError:
        storage.write_bytes(f"{sweep_path}/{SWEEP_FILE}", json.dumps(current, indent=1).encode())
        return
    old, new = runs.flatten(recorded), runs.flatten(current)
    differing = [f"job.{key}" for key in runs.changed_keys(recorded["job"], current["job"])]
    if old.get("job.train.epochs") != new.get("job.train.epochs"):  # it sets ASHA's rungs, fixed at the start
        differing.append("job.train.epochs")
    differing += sorted(key for key in old.keys() | new.keys() if key.startswith("tune.") and old.get(key) != new.get(key))
    if differing:
        shown = ", ".join(f"{key.removeprefix('job.')} ({old.get(key)!r} -> {new.get(key)!r})" for key in differing[:3])
        more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
        raise UserError(
            f"{sweep.source}: sweep '{sweep.name}' already exists in {storage.uri} with a different {shown}{more}; "
            f"undo the change, give the sweep a new name, or pass --restart to start a fresh sweep beside it")
    storage.write_bytes(f"{sweep_path}/{SWEEP_FILE}", json.dumps(current, indent=1).encode())


def default_concurrency(sweep: Sweep, use_gpu: bool) -> int:
    """As many trials as the cluster's CPUs (and GPUs) fit at the trial's worker count."""
    if sweep.tune.max_concurrent_trials:
        return sweep.tune.max_concurrent_trials
    resources = ray.cluster_resources()
    scaling = sweep.job.scaling
    fits = int(resources.get("CPU", 0) // (scaling.num_workers * scaling.cpus_per_worker))
    if use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // scaling.num_workers))
    return max(1, fits)


def build_tuner(sweep: Sweep, storage: Storage, use_gpu: bool, callbacks: list[Callback] = ()) -> Tuner:
    """A restored Tuner when the sweep's folder holds one, else a new one; `callbacks` are extra
    Tune callbacks for a new sweep (bench/sweep.py times the trials with one)."""
    sweep_path = storage.path(sweep.name)
    filesystem = storage.pyarrow_fs()
    trainable = ray.tune.with_resources(make_trial_function(sweep, use_gpu), TRIAL_DRIVER_RESOURCES)
    if Tuner.can_restore(sweep_path, storage_filesystem=filesystem):
        log.info("restoring sweep '%s': finished trials stay finished, interrupted and failed ones resume "
                 "from their checkpoints", sweep.name)
        return Tuner.restore(sweep_path, trainable=trainable, resume_errored=True, storage_filesystem=filesystem)

    tune = sweep.tune
    searcher = OptunaSearch(
        space={key: dimension.to_optuna() for key, dimension in tune.space.items()},
        metric=sweep.metric, mode=sweep.mode,
        seed=sweep.job.seed if tune.seed is None else tune.seed,
        points_to_evaluate=[dict(point) for point in tune.points_to_evaluate] or None,
    )
    if tune.scheduler == "asha":
        # brackets=1: plain ASHA; `epoch` counts evaluated epochs, ASHA's clock. A trial that trains all
        # its epochs ends by itself (stop_last_trials only when max_t cuts trials short): a stopped trial's
        # run is killed, not wound down.
        scheduler = ASHAScheduler(time_attr="epoch", max_t=sweep.max_epochs, grace_period=tune.asha.grace_period,
                                  reduction_factor=tune.asha.reduction_factor, brackets=1,
                                  stop_last_trials=sweep.max_epochs < sweep.job.train.epochs)
    else:
        scheduler = FIFOScheduler()
    concurrency = default_concurrency(sweep, use_gpu)
    log.info("starting sweep '%s' in %s/%s: %d trials, up to %d at a time, %d epochs each at most, scheduler %s",
             sweep.name, storage.uri.rstrip("/"), sweep.name, tune.num_samples, concurrency, sweep.max_epochs,
             tune.scheduler)
    return Tuner(
        trainable,
        tune_config=TuneConfig(
            metric=sweep.metric, mode=sweep.mode, search_alg=searcher, scheduler=scheduler,
            num_samples=tune.num_samples, max_concurrent_trials=concurrency, trial_dirname_creator=tune_dirname,
        ),
        run_config=RunConfig(
            name=sweep.name, storage_path=storage.root, storage_filesystem=filesystem,
            # a trial's driver lost with its node: Tune starts it again and it resumes from its checkpoints
            failure_config=FailureConfig(max_failures=sweep.job.failure.max_failures),
            callbacks=[SweepProgress(sweep.metric, sweep.mode, sweep.max_epochs, tune.num_samples),
                       *([SchedulerState(scheduler)] if tune.scheduler == "asha" else []), *callbacks],
            verbose=0,  # SweepProgress says what matters, one line at a time
        ),
    )


def outcomes(grid: ray.tune.ResultGrid, sweep: Sweep) -> list[sweep_report.TrialOutcome]:
    found = []
    for result in grid:
        metrics = result.metrics or {}
        epochs = int(metrics.get("epoch", 0) or 0)
        if result.error:
            status = sweep_report.FAILED
        else:
            status = sweep_report.FINISHED if epochs >= sweep.max_epochs else sweep_report.STOPPED
        error = str(result.error).strip().splitlines()[-1] if result.error else None
        found.append(sweep_report.TrialOutcome(
            trial=Path(result.path).name.removeprefix("tune-"), params=dict(result.config or {}), status=status,
            epochs=epochs, last_value=metrics.get(sweep.metric), seconds=metrics.get("time_total_s"), error=error))
    return found


def report_results(grid: ray.tune.ResultGrid, sweep: Sweep, storage: Storage) -> int:
    """Print and save the results; exit code 1 when no trial produced a checkpoint with the metric."""
    sweep_path = storage.path(sweep.name)
    sweep_uri = pull.display_uri(storage, sweep_path)
    try:
        ranking = pull.rank(storage, sweep_path, sweep.metric, sweep.mode)
    except UserError as error:
        log.warning("%s", error)
        ranking = None
    rows = sweep_report.trial_rows(outcomes(grid, sweep), ranking, sweep, storage)
    print(sweep_report.format_rows(rows, sweep), flush=True)
    storage.write_bytes(f"{sweep_path}/{RESULTS_FILE}", sweep_report.rows_csv(rows, sweep))
    written = [RESULTS_FILE]
    try:
        storage.write_bytes(f"{sweep_path}/{PLOT_FILE}", sweep_report.search_plot(rows, sweep))
        written.append(PLOT_FILE)
    except Exception as error:  # a picture is not worth failing a finished sweep for
        log.warning("no %s: %s: %s", PLOT_FILE, type(error).__name__, error)
    if ranking:
        best = sweep_report.best_record(ranking, sweep, storage, sweep_uri)
        storage.write_bytes(f"{sweep_path}/{BEST_FILE}", json.dumps(best, indent=1).encode())
        written.append(BEST_FILE)
        log.info("best %s %.4f: trial %s, epoch %d (%s) -> %s", best["metric"], best["value"], best["trial"],
                 best["epoch"], pull.format_params(best["params"]), best["checkpoint"])
        log.info("fetch it with: %s", best["pull"])
    log.info("wrote %s in %s", ", ".join(written), sweep_uri)
    return 0 if ranking else 1


def dry_run(sweep: Sweep, storage: Storage) -> int:
    tune = sweep.tune
    print(f"sweep '{sweep.name}' in {storage.uri.rstrip('/')}/{sweep.name}: valid")
    print(f"  {tune.num_samples} trials of {sweep.job.scaling.num_workers} worker(s), "
          f"{sweep.metric} ({sweep.mode}), at most {sweep.max_epochs} epochs each")
    for key, dimension in tune.space.items():
        print(f"  {key}: {dimension.describe()}")
    for number, point in enumerate(tune.points_to_evaluate, start=1):
        print(f"  first trial {number}: {pull.format_params(point)}")
    if tune.scheduler == "asha":
        print(f"  ASHA: grace period {tune.asha.grace_period} epoch(s), reduction factor {tune.asha.reduction_factor:g}")
    else:
        print("  no early stopping: every trial trains all its epochs")
    return 0


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    sweep = load_sweep(args.sweep, args.overrides)
    storage = prepare(sweep)
    if args.restart and storage.list_dirs(storage.path(sweep.name)):
        fresh = runs.fresh_run_name(storage, sweep.name)
        log.info("--restart: starting sweep '%s' beside '%s', which is kept as it is", fresh, sweep.name)
        sweep = dataclasses.replace(sweep, job=sweep.job.model_copy(update={"name": fresh}))
    if args.dry_run:
        return dry_run(sweep, storage)
    sweep_path = storage.path(sweep.name)
    # The lease lives in trials/: a restored Tune copies the .json files at the top of its folder down
    # and uploads them again while it runs, which would keep putting an old heartbeat back.
    with runs.Lease(storage, f"{sweep_path}/{TRIALS_DIR}"):
        check_same_sweep(storage, sweep_path, sweep)
        started = time.perf_counter()
        ray_worker.connect(dashboard=True)
        use_gpu = ray_worker.resolve_use_gpu(sweep.job)
        ray_worker.check_fits_local_cluster(sweep.job, use_gpu)
        grid = build_tuner(sweep, storage, use_gpu).fit()
        if grid.num_terminated + grid.num_errors < sweep.tune.num_samples:  # Tune stops gracefully on Ctrl-C
            log.warning("sweep '%s' interrupted after %.0f s with %d of %d trials done; run the same command to "
                        "resume it", sweep.name, time.perf_counter() - started,
                        grid.num_terminated + grid.num_errors, sweep.tune.num_samples)
            return 130
        log.info("sweep '%s' ended after %.0f s", sweep.name, time.perf_counter() - started)
        return report_results(grid, sweep, storage)


if __name__ == "__main__":
    raise SystemExit(main())
