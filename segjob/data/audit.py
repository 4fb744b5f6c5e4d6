"""The sample scan: every image and label read once, problems named, before any GPU time is spent."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from segjob.data import build_datasets
from segjob.data.base import SegmentationDataset
from segjob.errors import UserError
from segjob.job.schema import DataBase, JobConfig

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


def check_datasets(datasets: dict[str, SegmentationDataset], limit: int | None = None,
                   workers: int | None = None) -> DataReport:
    started = time.perf_counter()
    tasks = [(split, dataset, index) for split, dataset in datasets.items()
             for index in range(min(len(dataset), limit or len(dataset)))]
    problems = [Problem(split, None, "is empty: no sample listed; check the list files and data.exclude")
                for split, dataset in datasets.items() if len(dataset) == 0]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="segjob-check") as pool:
        for found in pool.map(_inspect, tasks):
            problems += found
    return DataReport(problems, {split: len(d) for split, d in datasets.items()}, len(tasks),
                      time.perf_counter() - started)


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
        log.warning("data: %d warnings, the first: %s (python -m segjob.check lists them all)",
                    len(report.warnings), report.warnings[0])
    if not report.errors:
        return
    whole_split = [problem for problem in report.errors if problem.sample is None]
    skippable = not whole_split and hasattr(job.data, "exclude")
    if not (skip_bad and skippable):
        hint = ", or pass --skip-bad to train without them" if skippable else ""
        raise UserError(f"data: {len(report.bad_samples) or len(whole_split)} problem(s), "
                        f"the first: {report.errors[0]}; "
                        f"python -m segjob.check on the job lists them all; fix or remove the files{hint}")
    for problem in report.errors:
        log.warning("--skip-bad: leaving out the sample because of %s", problem)
    job.data.exclude = sorted(set(job.data.exclude) | set(report.bad_samples))
