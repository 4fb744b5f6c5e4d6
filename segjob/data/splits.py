"""Train/validation splits: list files, seeded random splits, excluded samples.

    names = read_names(root / "ImageSets/Segmentation/train.txt")
    train, val = random_split(names, val_fraction=0.3, seed=job.seed)
    train = without(train, job.data.exclude)

A random split is a pure function of (the sorted names, val_fraction, seed): every node and
every resumed run gets the same one. Exclusion is applied after splitting, so leaving a bad
sample out never moves the others between train and val.
"""

from __future__ import annotations

from pathlib import Path

import torch

from segjob.data.base import mix_seed
from segjob.errors import UserError

SPLIT_STREAM = 0x5E7  # keeps the split's shuffle apart from other uses of the seed


def read_names(path: Path, layout: str = "") -> list[str]:
    """The first word of every line; blank lines and '#' comments skipped. May be empty
    (the check reports an empty split); a missing file is a UserError naming the layout."""
    if not path.is_file():
        hint = f"; the layout under root is {layout}" if layout else ""
        raise UserError(f"data: {path} not found{hint}")
    return [line.split()[0] for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def random_split(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val), both sorted; at least one sample on each side."""
    names = sorted(names)
    if len(names) < 2:
        raise UserError(f"data: a random split needs at least 2 samples, found {len(names)}")
    generator = torch.Generator().manual_seed(mix_seed(seed, SPLIT_STREAM))
    order = torch.randperm(len(names), generator=generator).tolist()
    num_val = min(max(round(len(names) * val_fraction), 1), len(names) - 1)
    val = sorted(names[i] for i in order[:num_val])
    train = sorted(names[i] for i in order[num_val:])
    return train, val


def without(names: list[str], exclude: list[str]) -> list[str]:
    """names minus the excluded ones, order kept."""
    if not exclude:
        return list(names)
    excluded = set(exclude)
    return [name for name in names if name not in excluded]
