"""The sample scan: every image and label read once, problems named, before any GPU time is spent;
and the job's metrics checked against the classes the dataset has (val/iou/<class>)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from segjob.data import build_datasets
from segjob.data.base import SegmentationDataset
from segjob.errors import UserError
from segjob.job.schema import DataBase, JobConfig, PlateauSchedule

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


def check_job_data(job: JobConfig, source: str = "job", limit: int | None = None, workers: int | None = None,
                   metric_key: str = "metric.name") -> DataReport:
    """Build the job's splits, check that its metrics name classes they have (a UserError naming
    `source` and the key), then inspect every sample (or the first `limit` of each)."""
    train, val = build_datasets(job.data, job.seed)
    try:
        check_metric_classes(job, train.class_names, metric_key)
    except ValueError as error:
        raise UserError(f"{source}: {error}") from None
    return check_datasets({"train": train, "val": val}, limit, workers)


def metric_classes_check(metric_key: str = "metric.name") -> Callable[[JobConfig], None]:
    """check_metric_classes for many jobs (a sweep's trials), each distinct data section built once."""
    classes: dict[str, list[str]] = {}

    def check(job: JobConfig) -> None:
        data = job.data.model_dump_json()
        if data not in classes:
            classes[data] = build_datasets(job.data, job.seed)[0].class_names
        check_metric_classes(job, classes[data], metric_key)

    return check


def check_metric_classes(job: JobConfig, class_names: list[str], metric_key: str = "metric.name") -> None:
    """A metric for one class (val/iou/<class>, val/dice/<class>) must name a class of the dataset:
    training never reports an unknown one, so ranking, retention and sweeps would find no value.
    ValueError naming the key, the dataset's classes and the fix."""
    metrics = {metric_key: job.metric.name}
    if isinstance(job.optim.schedule, PlateauSchedule):
        metrics["optim.schedule.plateau_metric"] = job.optim.schedule.plateau_metric
    for key, name in metrics.items():
        prefix, _, wanted = name.rpartition("/")
        if prefix.count("/") == 1 and wanted not in class_names:  # val/iou/<class>, val/dice/<class>
            raise ValueError(f"{key}: {name} names no class of data {job.data.name} (its classes: "
                             f"{', '.join(class_names)}); use {prefix}/<one of those>, or val/miou")


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


def preflight(job: JobConfig, skip_bad: bool = False, source: str = "job", metric_key: str = "metric.name") -> None:
    """The check `segjob.train` runs on the driver before any worker starts: a UserError on a metric
    naming no class of the data or on bad samples, or, with skip_bad, those samples added to
    job.data.exclude (the job the workers get)."""
    report = check_job_data(job, source, metric_key=metric_key)
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
