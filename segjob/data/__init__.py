"""Datasets by name: `build_datasets(job.data, job.seed)` returns (train, val).

Each dataset module contributes one entry (its config class and a `build(cfg, seed)`);
a new dataset is a module plus one line in DATASETS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import DataBase, PetsData, SyntheticData
from ..errors import UserError
from . import pets, synthetic
from .base import SegmentationDataset

__all__ = ["DATASETS", "DatasetEntry", "SegmentationDataset", "build_datasets"]


@dataclass(frozen=True)
class DatasetEntry:
    name: str  # the job file's data.name
    config: type[DataBase]
    build: Callable[[DataBase, int], tuple[SegmentationDataset, SegmentationDataset]]


DATASETS: dict[str, DatasetEntry] = {
    entry.name: entry
    for entry in (
        DatasetEntry("synthetic", SyntheticData, synthetic.build),
        DatasetEntry("pets", PetsData, pets.build),
    )
}


def build_datasets(cfg: DataBase, seed: int) -> tuple[SegmentationDataset, SegmentationDataset]:
    """(train, val) for the job's data section; train augments, val is deterministic."""
    name = getattr(cfg, "name", None)
    entry = DATASETS.get(name)
    if entry is None:
        raise UserError(f"data.name: unknown dataset '{name}'; valid: {', '.join(sorted(DATASETS))}")
    if not isinstance(cfg, entry.config):
        raise TypeError(f"data.name '{name}' needs a {entry.config.__name__}, got {type(cfg).__name__}")
    return entry.build(cfg, seed)
