"""A dataset's samples as scoring sees them: the image at the job's scale, the label on its own grid.

    view = ScoringView(val_set, job.data)                  # or (train_set, job.data, count=200)
    loader = DataLoader(view, batch_sampler=EvalBatchSampler(...), collate_fn=collate_scoring)
    for indices, images, targets in loader: ...            # lists: every image keeps its own size

Published figures count the pixels of the label files as they are (a 500x375 VOC mask, a
480x360 CamVid one), so the label is never resized here; the image is resized to the job's
scale (data.image_size, data.resize) and normalised, unpadded. Images and labels differ in size
from sample to sample, so a batch is a list of each rather than a stacked tensor: the inference
batches what it can (segjob.engine.inference).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from segjob.data.base import SegmentationDataset, split_key
from segjob.data.transforms import build_scoring_transform
from segjob.job.schema import DataBase


class ScoringView(Dataset):
    """(index, image [C, h, w] at the job's scale, target on the label's grid) for the first `count`
    samples of a dataset, never augmented; keys may be indices or (epoch, index) pairs."""

    def __init__(self, dataset: SegmentationDataset, cfg: DataBase, count: int | None = None):
        self.dataset, self.transform = dataset, build_scoring_transform(cfg)
        self.count = len(dataset) if count is None else min(count, len(dataset))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[int, torch.Tensor, torch.Tensor]:
        _, index = split_key(key)
        if not 0 <= index < self.count:
            raise IndexError(f"sample index {index} out of range for {self.count} samples")
        image, target = self.dataset.scoring_item(index, self.transform)
        return index, image, target


def collate_scoring(items: list[tuple[int, torch.Tensor, torch.Tensor]]
                    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(indices int64 [N], images, targets): sizes differ between samples, so no stacking."""
    indices = torch.tensor([index for index, _, _ in items], dtype=torch.int64)
    return indices, [image for _, image, _ in items], [target for _, _, target in items]
