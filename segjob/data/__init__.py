"""Datasets by name: `build_datasets(job.data, job.seed)` returns (train, val).

    train, val = build_datasets(job.data, job.seed)
    image, target = train[(epoch, index)]     # augmented, seeded by (seed, epoch, index)
    findings = val.inspect(index)             # what `python -m segjob.check` reports

Each dataset module contributes one entry (its config class and a `build(cfg, seed)`);
a new dataset is a module plus one line in DATASETS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from segjob.data import camvid, folder, leaf, nyuv2, pets, synthetic, voc
from segjob.data.base import SegmentationDataset
from segjob.errors import UserError
from segjob.job.schema import CamVidData, DataBase, FolderData, LeafData, NYUv2Data, PetsData, SyntheticData, VOCData

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
        DatasetEntry("voc", VOCData, voc.build),
        DatasetEntry("camvid", CamVidData, camvid.build),
        DatasetEntry("nyuv2", NYUv2Data, nyuv2.build),
        DatasetEntry("leaf", LeafData, leaf.build),
        DatasetEntry("folder", FolderData, folder.build),
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
