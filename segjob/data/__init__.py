"""Datasets by name: `build_datasets(job.data, job.seed)` returns (train, val).

    train, val = build_datasets(job.data, job.seed)
    image, target = train[(epoch, index)]     # augmented, seeded by (seed, epoch, index)
    findings = val.inspect(index)             # what `python -m segjob.check` reports

Each dataset module contributes one entry (its config class and a `build(cfg, seed)`);
a new dataset is a module plus one line in DATASETS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from segjob.data import camvid, folder, leaf, nyuv2, pets, synthetic, voc
from segjob.data.base import SegmentationDataset
from segjob.job.registry import Entry, Registry
from segjob.job.schema import CamVidData, DataBase, FolderData, LeafData, NYUv2Data, PetsData, SyntheticData, VOCData

__all__ = ["DATASETS", "DatasetEntry", "SegmentationDataset", "build_datasets"]


@dataclass(frozen=True)
class DatasetEntry(Entry):
    build: Callable[[DataBase, int], tuple[SegmentationDataset, SegmentationDataset]]  # (config, seed) -> (train, val)


DATASETS: Registry[DatasetEntry] = Registry(
    "dataset",
    (
        DatasetEntry("synthetic", SyntheticData, synthetic.build),
        DatasetEntry("pets", PetsData, pets.build),
        DatasetEntry("voc", VOCData, voc.build),
        DatasetEntry("camvid", CamVidData, camvid.build),
        DatasetEntry("nyuv2", NYUv2Data, nyuv2.build),
        DatasetEntry("leaf", LeafData, leaf.build),
        DatasetEntry("folder", FolderData, folder.build),
    ),
    where="data.name",
    suggest=False,  # data.name's message (pinned in tests/test_data.py) lists the names without a hint
)


def build_datasets(cfg: DataBase, seed: int) -> tuple[SegmentationDataset, SegmentationDataset]:
    """(train, val) for the job's data section; train augments, val is deterministic."""
    entry = DATASETS.lookup(getattr(cfg, "name", None))
    if not isinstance(cfg, entry.config_class):  # a programming error, not the user's
        raise TypeError(f"data.name '{entry.name}' needs a {entry.config_class.__name__}, got {type(cfg).__name__}")
    return entry.build(cfg, seed)
