"""The Ray Tune side of a sweep: the Tuner, its searcher and scheduler, and each trial's function."""

from __future__ import annotations

import logging
import math
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.tune
from ray.tune import Callback, FailureConfig, RunConfig, TuneConfig, Tuner
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from segjob.cluster import driver, worker
from segjob.cluster.worker import HEAD_NODE_RESOURCE
from segjob.errors import UserError, setup_logging
from segjob.job.sweep import Sweep
from segjob.results import sweep_report
from segjob.store import checkpoint, ranking, run_folder
from segjob.store.lease import Fence
from segjob.store.storage import Storage, open_storage

log = logging.getLogger("segjob")

# An evaluation result is one carrying this key (the engine always reports the validation loss)
EVALUATION_KEY = "val/loss"
# A trial's driver function only waits on its TorchTrainer: no CPU, so the workers get every core,
# but a little memory, because Tune needs some resource to place it by. It runs on the head node
# (Ray marks it with this resource), and so does its Train controller (Ray pins the controller to
# the driver's node): a spot worker node that goes takes only workers with it, which Ray Train
# restarts inside the trial, never a trial's driver (that would be a Tune failure).
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 1024**2, HEAD_NODE_RESOURCE: 0.001}


class EvaluationsToTune(TuneReportCallback):
    """Rank 0's evaluation results, and only those, go to Tune (ASHA and Optuna read the metric
    from every result they get). Mid-epoch checkpoints carry no validation metric and stay out."""

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if EVALUATION_KEY in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def make_trial_function(sweep: Sweep, use_gpu: bool, fence: Fence | None = None) -> Callable[[dict[str, Any]], None]:
    def run_trial(params: dict[str, Any]) -> None:
        """One trial, on its Tune actor: the job with these values as a TorchTrainer run named by the trial id."""
        setup_logging()
        trial_id = ray.tune.get_context().get_trial_id()
        worker.label_log_lines(trial_id)
        job = sweep.trial_job(trial_id, params)
        storage = open_storage(job.storage.uri, job.storage.endpoint_url)
        run_path = storage.path(job.name)
        done = run_folder.read_done(storage, run_path)
        if done and done.get("epochs", 0) >= job.train.epochs:
            # trained to the end before a driver restart that never heard of it: tell Tune again, train nothing
            log.info("already trained (%d epochs); reporting its final evaluation", done["epochs"])
            ray.tune.report(done["metrics"])
            return
        # this trial's previous attempt is gone (Tune starts a trial again only then); the grace period spares
        # an upload in flight all the same
        checkpoint.remove_uncommitted(storage, run_path, fence=fence)
        driver.forget_ray_snapshot(storage, run_path)
        trainer = driver.build_trainer(job, storage, use_gpu, callbacks=[EvaluationsToTune()], log_label=trial_id,
                                       fence=fence)
        driver.fit(trainer)

    return run_trial


def tune_dirname(trial) -> str:
    """Tune's own folder for a trial (params.json, result.json): beside trials/, named by the id."""
    return f"tune-{trial.trial_id}"


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
        log.info("trial %s started: %s | %s", trial.trial_id, ranking.format_params(trial.config),
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
        log.warning("trial %s failed: %s | %s", trial.trial_id, last_line,
                    self.summary(trials, {trial.trial_id: "ERROR"}))

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


def build_tuner(sweep: Sweep, storage: Storage, use_gpu: bool, callbacks: list[Callback] = (),
                fence: Fence | None = None) -> Tuner:
    """A restored Tuner when the sweep's folder holds one, else a new one; `callbacks` are extra
    Tune callbacks for a new sweep (bench/sweep.py times the trials with one); every trial's commits and
    cleanups carry the sweep driver's `fence`."""
    sweep_path = storage.path(sweep.name)
    filesystem = driver.pyarrow_filesystem(storage)
    trainable = ray.tune.with_resources(make_trial_function(sweep, use_gpu, fence), TRIAL_DRIVER_RESOURCES)
    if Tuner.can_restore(sweep_path, storage_filesystem=filesystem):
        log.info("restoring sweep '%s': finished trials stay finished, interrupted and failed ones resume "
                 "from their checkpoints", sweep.name)
        return restore(sweep, storage, trainable, filesystem)

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


def restore(sweep: Sweep, storage: Storage, trainable: Any, filesystem: pyarrow.fs.FileSystem) -> Tuner:
    """Tune's saved state names the classes and functions it pickled by their module path: a sweep
    started by a segjob whose modules have since moved cannot be restored, and is started again."""
    sweep_path = storage.path(sweep.name)
    try:
        return Tuner.restore(sweep_path, trainable=trainable, resume_errored=True, storage_filesystem=filesystem)
    except (AttributeError, ImportError, pickle.UnpicklingError) as error:
        raise UserError(
            f"{storage.display(sweep_path)}: the sweep's saved Tune state was written by another version of "
            f"segjob and cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:160]}); start the "
            f"sweep again with --restart (a fresh sweep beside it; finished trials' checkpoints stay where they are)"
        ) from None


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
