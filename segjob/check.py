"""Check a job before spending GPU time on it: the job file, the storage, every sample.

    python -m segjob.check jobs/pets_unet.yaml
    python -m segjob.check jobs/pets_unet.yaml --set data.root=/data/pets --limit 200 --workers 8

Builds both splits as training would and reads every sample fully, in parallel (threads:
PIL's decoders and h5py release the GIL), then lists every problem at once, one line each,
naming the file: unreadable or truncated images, image/mask size mismatches, mask values
outside the dataset's classes and ignore value, colour masks where label values are
expected, listed samples whose files are missing, empty splits. Warnings (a PNG or GIF
behind a .jpg name, an alpha channel, a mask without a labelled pixel) are listed too but
do not fail. Exit code 0 when no sample is bad, 1 when some are, 2 for a bad job or
storage. No Ray needed. `python -m segjob.train` runs the same check first and refuses to
start on errors (its --skip-bad leaves the bad samples out instead).
"""

from __future__ import annotations

import argparse
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .config import DataBase, JobConfig, add_job_arguments, load_job, resolve_local_paths
from .data import SegmentationDataset, build_datasets
from .errors import UserError, exits_cleanly_on_user_error, setup_logging
from .storage import open_storage

log = logging.getLogger("segjob")


@dataclass(frozen=True)
class Problem:
    split: str
    sample: str | None  # None: the whole split
    message: str
    fatal: bool = True

    def __str__(self) -> str:
        where = f"{self.split} sample '{self.sample}'" if self.sample is not None else f"{self.split} split"
        return f"{'error' if self.fatal else 'warning'}: {where}: {self.message}"


@dataclass
class DataReport:
    problems: list[Problem]
    sizes: dict[str, int]  # samples per split
    checked: int
    seconds: float
    errors: list[Problem] = field(init=False)
    warnings: list[Problem] = field(init=False)

    def __post_init__(self) -> None:
        self.errors = [problem for problem in self.problems if problem.fatal]
        self.warnings = [problem for problem in self.problems if not problem.fatal]

    @property
    def bad_samples(self) -> list[str]:
        """Names of the samples with at least one error, in the order found."""
        return list(dict.fromkeys(problem.sample for problem in self.errors if problem.sample is not None))

    def summary(self) -> str:
        splits = ", ".join(f"{count} {split}" for split, count in self.sizes.items())
        return (f"data: {self.checked} samples checked in {self.seconds:.1f} s ({splits} in all): "
                f"{len(self.bad_samples)} bad, {len(self.warnings)} warnings")


def check_data(cfg: DataBase, seed: int, limit: int | None = None, workers: int | None = None) -> DataReport:
    """Build the job's splits and inspect every sample (or the first `limit` of each)."""
    train, val = build_datasets(cfg, seed)
    return check_datasets({"train": train, "val": val}, limit, workers)


def check_datasets(datasets: dict[str, SegmentationDataset], limit: int | None = None, workers: int | None = None) -> DataReport:
    started = time.perf_counter()
    tasks = [(split, dataset, index) for split, dataset in datasets.items() for index in range(min(len(dataset), limit or len(dataset)))]
    problems = [Problem(split, None, "is empty: no sample listed; check the list files and data.exclude")
                for split, dataset in datasets.items() if len(dataset) == 0]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="segjob-check") as pool:
        for found in pool.map(_inspect, tasks):
            problems += found
    return DataReport(problems, {split: len(d) for split, d in datasets.items()}, len(tasks), time.perf_counter() - started)


def _inspect(task: tuple[str, SegmentationDataset, int]) -> list[Problem]:
    split, dataset, index = task
    name = dataset.sample_name(index)
    try:
        return [Problem(split, name, finding.message, finding.fatal) for finding in dataset.inspect(index)]
    except Exception as error:  # noqa: BLE001 - one odd sample must not hide the others
        return [Problem(split, name, f"could not be checked ({type(error).__name__}: {error})")]


def preflight(job: JobConfig, skip_bad: bool = False) -> None:
    """The check `segjob.train` runs on the driver before any worker starts: a UserError on bad
    samples, or, with skip_bad, those samples added to job.data.exclude (the job the workers get)."""
    report = check_data(job.data, job.seed)
    log.info(report.summary())
    if report.warnings:
        log.warning("data: %d warnings, the first: %s (python -m segjob.check lists them all)", len(report.warnings), report.warnings[0])
    if not report.errors:
        return
    whole_split = [problem for problem in report.errors if problem.sample is None]
    skippable = not whole_split and hasattr(job.data, "exclude")
    if not (skip_bad and skippable):
        hint = ", or pass --skip-bad to train without them" if skippable else ""
        raise UserError(f"data: {len(report.bad_samples) or len(whole_split)} problem(s), the first: {report.errors[0]}; "
                        f"python -m segjob.check on the job lists them all; fix or remove the files{hint}")
    for problem in report.errors:
        log.warning("--skip-bad: leaving out the sample because of %s", problem)
    job.data.exclude = sorted(set(job.data.exclude) | set(report.bad_samples))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m segjob.check", description=__doc__.split("\n\n")[0])
    add_job_arguments(parser)
    parser.add_argument("--limit", type=int, default=None, help="check only the first N samples of each split")
    parser.add_argument("--workers", type=int, default=None, help="threads reading samples (default: CPUs + 4, at most 32)")
    return parser.parse_args(argv)


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    job = resolve_local_paths(load_job(args.job, args.overrides))
    log.info("job %s: valid (%s, %s, %d epochs)", args.job, job.data.name, job.model.name, job.train.epochs)

    storage = open_storage(job.storage.uri, job.storage.endpoint_url)
    storage.check()
    log.info("storage %s: reachable", job.storage.uri)

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: give at least 1 (or leave it out to check everything)")
    report = check_data(job.data, job.seed, args.limit, args.workers)
    for problem in report.problems:
        print(problem)
    log.info(report.summary())
    if report.bad_samples and hasattr(job.data, "exclude"):
        log.info("to train without the bad samples: python -m segjob.train %s --skip-bad", args.job)
    return 1 if report.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
