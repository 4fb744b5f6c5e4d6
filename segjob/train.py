"""Train one model as a Ray Train job; run the same command again to resume it.

    python -m segjob.train jobs/quickstart.yaml
    python -m segjob.train jobs/pets_unet.yaml --set data.root=/data/pets --set train.epochs=3
    ray job submit --working-dir . -- python -m segjob.train jobs/pets_unet.yaml

Everything a user can get wrong (the job file, what the model needs of it, the metric, the
storage, the dataset path and samples) is checked here, on the driver, before Ray starts a worker.
"""

from __future__ import annotations

import argparse
import logging
import time

from segjob.data.audit import preflight
from segjob.engine.tracking import check_mlflow
from segjob.errors import ArgumentParser, UserError, exits_cleanly_on_user_error, setup_logging
from segjob.job.load import add_job_arguments, load_job, resolve_local_paths
from segjob.job.schema import JobConfig
from segjob.models import check_model_fits
from segjob.store import checkpoint, run_folder
from segjob.store.lease import Lease
from segjob.store.storage import Storage, open_storage

log = logging.getLogger("segjob")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m segjob.train", description=__doc__.split("\n\n")[0])
    add_job_arguments(parser)
    parser.add_argument("--restart", action="store_true",
                        help="start a fresh run beside an existing one (named <name>-rN); the old run is kept")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out the samples the data check finds bad (added to data.exclude) "
                             "instead of refusing to start")
    return parser.parse_args(argv)


def prepare(job: JobConfig, skip_bad: bool = False, source: str = "job") -> tuple[Storage, str]:
    """Check the model against the job, the storage, the metric and every data sample before anything
    starts (see segjob.check). With skip_bad, bad samples go into job.data.exclude, which the workers
    then leave out. `source` (the job file) starts the messages about the job."""
    try:
        check_model_fits(job)
    except ValueError as error:
        raise UserError(f"{source}: {error}") from None
    check_mlflow(job)  # here, not only on rank 0 once Ray has started
    storage = open_storage(job.storage.uri, job.storage.endpoint_url)
    storage.check()
    preflight(job, skip_bad, source)
    return storage, storage.path(job.name)


def announce(storage: Storage, run_path: str, job: JobConfig) -> None:
    latest = checkpoint.latest(storage, run_path)
    where = f"{storage.uri.rstrip('/')}/{job.name}"
    if latest is None:
        log.info("starting run '%s' in %s", job.name, where)
    else:
        log.info("resuming run '%s' from %s (epoch %d of %d, step %d) in %s",
                 job.name, latest.name, latest.epoch, job.train.epochs, latest.step, where)


def summarize(storage: Storage, run_path: str, job: JobConfig) -> None:
    committed = checkpoint.list_committed(storage, run_path)
    metric = job.ranked_metric  # with train.ema on, the EMA weights' figure
    best = checkpoint.select_best(committed, metric, job.metric.mode)
    if best:
        value = checkpoint.metric_value(best[0], metric)
        log.info("best checkpoint by %s (%s): %s = %.4f at epoch %d -> %s",
                 metric, job.metric.mode, best[0].name, value, best[0].epoch, best[0].path)


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    job = resolve_local_paths(load_job(args.job, args.overrides))
    storage, run_path = prepare(job, skip_bad=args.skip_bad, source=args.job)
    if args.restart and storage.list_dirs(run_path):
        fresh = run_folder.fresh_run_name(storage, job.name)
        log.info("--restart: starting run '%s' beside '%s', which is kept as it is", fresh, job.name)
        job = job.model_copy(update={"name": fresh})
        run_path = storage.path(fresh)
    with Lease(storage, run_path) as lease:
        run_folder.check_same_job(storage, run_path, job, args.job)
        done = run_folder.read_done(storage, run_path)
        if done and done.get("epochs", 0) >= job.train.epochs:
            log.info("run '%s' already finished (%d epochs, step %d); raise train.epochs to train on",
                     job.name, done["epochs"], done["step"])
            return 0
        announce(storage, run_path, job)
        # only uploads no meta.json names and nothing has written to for a grace period: one in flight survives
        orphans = checkpoint.remove_uncommitted(storage, run_path, fence=lease.fence())
        if orphans:
            log.info("removed %d unfinished checkpoint upload(s): %s", len(orphans), ", ".join(orphans))

        from segjob.cluster import driver  # Ray is imported only once the job is known to be valid

        started = time.perf_counter()
        driver.connect()
        use_gpu = driver.resolve_use_gpu(job)
        driver.check_fits_local_cluster(job, use_gpu)
        driver.forget_ray_snapshot(storage, run_path)
        try:
            driver.fit(driver.build_trainer(job, storage, use_gpu, fence=lease.fence()))
        except BaseException:
            lease.raise_if_lost()  # the failure is the workers stopping because another driver took over
            raise
        lease.raise_if_lost()
        log.info("run '%s' finished in %.0f s", job.name, time.perf_counter() - started)
        summarize(storage, run_path, job)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
