"""The class names and colours a job's data section implies, read from the job alone (no files).

    names, palette = classes_of(job.data)      # None when the dataset's classes are only in its files

predict runs without the dataset, so it takes the classes from the checkpoint's job: the
published class lists of the named dataset (in the dataset modules), or the classes and
palette a `folder` job lists (validated by the job schema like any job file). They are the
same lists the dataset itself would give.
"""

from __future__ import annotations

from segjob.data import camvid, leaf, nyuv2, pets, synthetic, voc
from segjob.data.labels import Palette, default_palette
from segjob.job.schema import (
    CamVidData,
    DataBase,
    FolderData,
    LeafData,
    NYUv2Data,
    PetsData,
    SyntheticData,
    VOCData,
)


def classes_of(data: DataBase) -> tuple[list[str], Palette] | None:
    """(class names, colours) of the job's dataset; None for a dataset this table does not know."""
    names: list[str]
    palette: Palette | None = None
    if isinstance(data, SyntheticData):
        names = ["background", *synthetic.SHAPE_KINDS[: data.num_classes - 1]]
    elif isinstance(data, PetsData):
        names = pets.CLASS_NAMES[data.classes]
    elif isinstance(data, VOCData):
        names = voc.CLASS_NAMES
    elif isinstance(data, CamVidData):
        names, palette = camvid.CLASS_NAMES, camvid.PALETTE
    elif isinstance(data, NYUv2Data):
        names = nyuv2.CLASS_NAMES[data.classes]
    elif isinstance(data, LeafData):
        names, palette = leaf.CLASS_NAMES, leaf.PALETTE
    elif isinstance(data, FolderData):
        names, palette = data.classes, data.palette
    else:
        return None
    colours = [tuple(int(value) for value in colour) for colour in (palette or default_palette(len(names)))]
    return list(names), colours
