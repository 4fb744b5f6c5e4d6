"""A trained checkpoint scored on a split of its dataset, image by image. No Ray.

    result = evaluate(load_trained("./best"), split="val")
    result.summary()      # {"val/miou": ..., "val/loss": ..., "val/assd": ...}: training's names
    result.scores         # per-image confusion matrices (and ASSD), keyed by sample index
    result.image_losses   # the job's loss per image, in the order of result.scores.indices

Every sample of the split (or the first `limit`) is scored exactly once, with the engine's
own evaluation core and, by default, the job's own protocol (eval.grid, data.crop), so the
figures are the ones training reported for the same weights. Another grid or test-time
augmentation is a Protocol passed in; the Evaluation records the one used.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from segjob.data.scoring import ScoringView, collate_scoring
from segjob.data.transforms import padding_fill
from segjob.engine.evaluation import Scorer, summary
from segjob.engine.inference import Protocol, protocol_of
from segjob.errors import UserError
from segjob.learning.losses import build_loss
from segjob.learning.metrics import ConfusionMatrix, ImageScores
from segjob.results.trained import Trained


@dataclass
class Evaluation:
    trained: Trained
    split: str
    dataset: Any
    scores: ImageScores
    loss: float
    threshold: float
    protocol: Protocol  # how the pixels were counted (grid, whole image or sliding window, test-time views)
    image_losses: np.ndarray  # float64 [N]: each image's loss, as `loss` counts it, in the order of scores.indices

    @property
    def confusion(self) -> ConfusionMatrix:
        return self.scores.total_confusion()

    def summary(self) -> dict[str, float]:
        """Flat names as in training (val/miou, ...), for this split, plus loss and ASSD means."""
        assd = self.scores.assd if self.scores.with_assd else None
        return summary(self.confusion, self.trained.class_names, self.split, self.loss, assd)


@torch.inference_mode()
def evaluate(trained: Trained, split: str = "val", batch_size: int = 8, workers: int = 0, limit: int | None = None,
             with_assd: bool = True, threshold: float | None = None, progress: bool = True,
             protocol: Protocol | None = None) -> Evaluation:
    """Score every sample of the split (or the first `limit`) once; the loss is the job's own. The
    protocol (default: the job's, as training scored) says which grid counts and how the model runs."""
    train_set, val_set = trained.require_data()
    dataset = val_set if split == "val" else train_set
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise UserError(f"data: the {split} split is empty")
    threshold = trained.threshold if threshold is None else threshold
    protocol = protocol or protocol_of(trained.job)
    loss_fn = build_loss(trained.job.loss, trained.num_classes, train_set).to(trained.device)
    scorer = Scorer(trained.model.eval(), loss_fn, threshold, trained.device, protocol=protocol,
                    fill=padding_fill(trained.job.data, trained.in_channels))
    scores = ImageScores(trained.num_classes, with_assd=with_assd)
    losses: dict[int, float] = {}
    loader = DataLoader(ScoringView(dataset, trained.job.data, count), batch_size=batch_size, num_workers=workers,
                        shuffle=False, collate_fn=collate_scoring,
                        multiprocessing_context="forkserver" if workers else None)
    for indices, images, targets in tqdm(loader, desc=f"evaluate {split}", unit="batch", disable=not progress,
                                         file=sys.stderr, dynamic_ncols=True):
        for index, (labels, predicted) in zip(indices.tolist(), scorer.score(images, targets)):
            scores.update([index], labels.cpu(), predicted.cpu())
        losses.update(zip(indices.tolist(), scorer.image_losses.tolist()))
    scores.gather()
    scores.check_complete(count)
    image_losses = np.array([losses[int(index)] for index in scores.indices], dtype=np.float64)
    return Evaluation(trained, split, dataset, scores, scorer.loss, threshold, protocol, image_losses)
