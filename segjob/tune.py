"""Search hyperparameters: Optuna (TPE) proposes, ASHA stops poor trials early, every trial a DDP run.

    python -m segjob.tune jobs/tune_quickstart.yaml
    python -m segjob.tune jobs/tune_pets.yaml --set data.root=/data/pets --set tune.num_samples=32
    python -m segjob.tune jobs/tune_pets.yaml --dry-run      # validate and show the plan; no Ray
    ray job submit --working-dir . -- python -m segjob.tune jobs/tune_pets.yaml

The sweep file is a job plus a `tune:` section (segjob.job.sweep). Each trial is a full
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
import time

from segjob.cluster import driver
from segjob.cluster.tuner import build_tuner, outcomes
from segjob.data.audit import metric_classes_check, preflight
from segjob.errors import ArgumentParser, UserError, exits_cleanly_on_user_error, setup_logging
from segjob.job.sweep import TRIALS_DIR, Sweep, check_trials, load_sweep
from segjob.models import check_model_fits
from segjob.results import sweep_report
from segjob.results.sweep_report import TrialOutcome
from segjob.store import ranking, run_folder
from segjob.store.lease import Lease
from segjob.store.storage import Storage, open_storage

log = logging.getLogger("segjob")

SWEEP_FILE = "sweep.json"  # the sweep as first submitted: a resubmission must match it
RESULTS_FILE, BEST_FILE, PLOT_FILE = "results.csv", "best.json", "search.png"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m segjob.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="sweep YAML file: a job plus a tune: section, e.g. jobs/tune_quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job key or a tune key, e.g. --set train.epochs=3 --set tune.num_samples=4")
    parser.add_argument("--restart", action="store_true",
                        help="start a fresh sweep beside an existing one (named <name>-rN); the old one is kept")
    parser.add_argument("--dry-run", action="store_true", help="check the sweep, its storage and data; start nothing")
    return parser.parse_args(argv)


def prepare(sweep: Sweep) -> Storage:
    """Check what every trial's model needs, storage, data and the metric before Ray starts anything."""
    check_trials(sweep, check_model_fits)
    storage = open_storage(sweep.job.storage.uri, sweep.job.storage.endpoint_url)
    storage.check()
    metric_key = "tune.metric" if sweep.tune.metric else "metric.name"
    preflight(sweep.job, source=sweep.source, metric_key=metric_key)  # every sample, once, before any trial
    if any(key.startswith("data.") for key in sweep.tune.space):  # a trial's classes may differ from the base's
        check_trials(sweep, metric_classes_check(metric_key))
    if sweep.tune.scheduler == "asha" and sweep.tune.asha.grace_period > sweep.max_epochs:
        raise UserError(f"{sweep.source}: tune.asha.grace_period ({sweep.tune.asha.grace_period}) is more than the "
                        f"{sweep.max_epochs} epochs a trial gets; lower it or raise train.epochs")
    return storage


def check_same_sweep(storage: Storage, sweep_path: str, sweep: Sweep) -> None:
    """Record the sweep on a first start; refuse a resubmission that searches differently.

    Tune restores a sweep with the search space, searcher and scheduler it started with, so a
    changed tune section would be silently ignored; a changed job would mix two sweeps in one.
    Only what moves or scales the trials may change (run_folder.MAY_CHANGE_ON_RESUME, not train.epochs).
    """
    current = sweep.record()
    try:
        recorded = json.loads(storage.read_bytes(f"{sweep_path}/{SWEEP_FILE}"))
    except FileNotFoundError:
        storage.write_bytes(f"{sweep_path}/{SWEEP_FILE}", json.dumps(current, indent=1).encode())
        return
    old, new = run_folder.flatten(recorded), run_folder.flatten(current)
    differing = [f"job.{key}" for key in run_folder.changed_keys(recorded["job"], current["job"])]
    if old.get("job.train.epochs") != new.get("job.train.epochs"):  # it sets ASHA's rungs, fixed at the start
        differing.append("job.train.epochs")
    differing += sorted(key for key in old.keys() | new.keys()
                        if key.startswith("tune.") and old.get(key) != new.get(key))
    if differing:
        shown = ", ".join(f"{key.removeprefix('job.')} ({old.get(key)!r} -> {new.get(key)!r})" for key in differing[:3])
        more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
        raise UserError(
            f"{sweep.source}: sweep '{sweep.name}' already exists in {storage.uri} with a different {shown}{more}; "
            f"undo the change, give the sweep a new name, or pass --restart to start a fresh sweep beside it")
    storage.write_bytes(f"{sweep_path}/{SWEEP_FILE}", json.dumps(current, indent=1).encode())


def report_results(trials: list[TrialOutcome], sweep: Sweep, storage: Storage) -> int:
    """Print and save the results; exit code 1 when no trial produced a checkpoint with the metric."""
    sweep_path = storage.path(sweep.name)
    sweep_uri = storage.display(sweep_path)
    try:
        ranked = ranking.rank(storage, sweep_path, sweep.metric, sweep.mode)
    except UserError as error:
        log.warning("%s", error)
        ranked = None
    rows = sweep_report.trial_rows(trials, ranked, sweep, storage)
    print(sweep_report.format_rows(rows, sweep), flush=True)
    storage.write_bytes(f"{sweep_path}/{RESULTS_FILE}", sweep_report.rows_csv(rows, sweep))
    written = [RESULTS_FILE]
    try:
        storage.write_bytes(f"{sweep_path}/{PLOT_FILE}", sweep_report.search_plot(rows, sweep))
        written.append(PLOT_FILE)
    except Exception as error:  # a picture is not worth failing a finished sweep for
        log.warning("no %s: %s: %s", PLOT_FILE, type(error).__name__, error)
    if ranked:
        best = sweep_report.best_record(ranked, sweep, storage, sweep_uri)
        storage.write_bytes(f"{sweep_path}/{BEST_FILE}", json.dumps(best, indent=1).encode())
        written.append(BEST_FILE)
        log.info("best %s %.4f: trial %s, epoch %d (%s) -> %s", best["metric"], best["value"], best["trial"],
                 best["epoch"], ranking.format_params(best["params"]), best["checkpoint"])
        log.info("fetch it with: %s", best["pull"])
    log.info("wrote %s in %s", ", ".join(written), sweep_uri)
    return 0 if ranked else 1


def dry_run(sweep: Sweep, storage: Storage) -> int:
    tune = sweep.tune
    print(f"sweep '{sweep.name}' in {storage.uri.rstrip('/')}/{sweep.name}: valid")
    print(f"  {tune.num_samples} trials of {sweep.job.scaling.num_workers} worker(s), "
          f"{sweep.metric} ({sweep.mode}), at most {sweep.max_epochs} epochs each")
    for key, dimension in tune.space.items():
        print(f"  {key}: {dimension.describe()}")
    for number, point in enumerate(tune.points_to_evaluate, start=1):
        print(f"  first trial {number}: {ranking.format_params(point)}")
    if tune.scheduler == "asha":
        print(f"  ASHA: grace period {tune.asha.grace_period} epoch(s), "
              f"reduction factor {tune.asha.reduction_factor:g}")
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
        fresh = run_folder.fresh_run_name(storage, sweep.name)
        log.info("--restart: starting sweep '%s' beside '%s', which is kept as it is", fresh, sweep.name)
        sweep = dataclasses.replace(sweep, job=sweep.job.model_copy(update={"name": fresh}))
    if args.dry_run:
        return dry_run(sweep, storage)
    sweep_path = storage.path(sweep.name)
    # The lease lives in trials/: a restored Tune copies the .json files at the top of its folder down
    # and uploads them again while it runs, which would put an old version of the lease back (and so take it away).
    with Lease(storage, f"{sweep_path}/{TRIALS_DIR}") as lease:
        check_same_sweep(storage, sweep_path, sweep)
        started = time.perf_counter()
        driver.connect(dashboard=True)
        use_gpu = driver.resolve_use_gpu(sweep.job)
        driver.check_fits_local_cluster(sweep.job, use_gpu)
        try:
            grid = build_tuner(sweep, storage, use_gpu, fence=lease.fence()).fit()
        except BaseException:
            lease.raise_if_lost()  # Tune stopped because another driver took the sweep over
            raise
        lease.raise_if_lost()
        if grid.num_terminated + grid.num_errors < sweep.tune.num_samples:  # Tune stops gracefully on Ctrl-C
            log.warning("sweep '%s' interrupted after %.0f s with %d of %d trials done; run the same command to "
                        "resume it", sweep.name, time.perf_counter() - started,
                        grid.num_terminated + grid.num_errors, sweep.tune.num_samples)
            return 130
        log.info("sweep '%s' ended after %.0f s", sweep.name, time.perf_counter() - started)
        return report_results(outcomes(grid, sweep), sweep, storage)


if __name__ == "__main__":
    raise SystemExit(main())
