"""Segmentation metrics: a confusion matrix for the dataset, per-image scores, ASSD.

    confusion = ConfusionMatrix(num_classes, device=device)
    images = ImageScores(num_classes)                       # per-image scores (evaluate command)
    for indices, (x, masks) in loader:
        predicted = predict_labels(model(x), threshold)     # argmax, or sigmoid > threshold
        confusion.update(masks, predicted)
        images.update(indices, masks, predicted)
    confusion.all_reduce(); images.gather()                 # once, after the last update (DDP)
    images.check_complete(len(dataset))                     # no sample dropped or counted twice
    history.append(confusion.summary(class_names))          # {"val/miou": ..., "val/iou/pet": ...}

A confusion matrix counts pixels: row = ground-truth class, column = predicted class.
Pixels whose ground truth is the ignore value count for nothing, whatever was predicted
there. Summing matrices over batches and ranks is exact, so a distributed evaluation gives
the same figures as a single-process one over the same samples. Every figure (IoU, Dice/F1,
pixel accuracy, class accuracy) comes from a matrix: the dataset's, or one per image.

A class absent from both the ground truth and the predictions has no IoU or Dice (nan);
the means (mIoU, mean Dice) skip it, as torchvision and most papers do. A class that is
predicted but never present gets IoU 0.

ASSD (average symmetric surface distance, in pixels at the evaluated resolution) follows
Heimann et al. 2009 and MONAI: the surface of a mask is its pixels with a 4-neighbour
outside it (the image edge counts as outside); ASSD = (sum of Euclidean distances from
each predicted surface pixel to the nearest true one + the same the other way) / (number
of surface pixels of both). Pooled over both directions, unlike medpy's mean of the two means.
Predictions on ignored pixels are left out, as in the matrix.
Empty masks: both empty -> nan (no score; skipped by means, like IoU); exactly one empty
-> the image diagonal, the largest distance the image allows, so a missed or imagined
object counts as the worst case instead of vanishing from the mean.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from scipy.spatial import cKDTree

from segjob.data.labels import IGNORE_INDEX


def _cells(target: torch.Tensor, prediction: torch.Tensor, num_classes: int,
           ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(target*K + prediction, counted), both [N, H*W], for label maps [N, H, W]; checks the labels."""
    if target.shape != prediction.shape:
        raise ValueError(f"target {tuple(target.shape)} and prediction {tuple(prediction.shape)} differ in shape")
    if target.is_floating_point() or prediction.is_floating_point():
        raise TypeError("confusion matrices take integer label maps (use predict_labels(logits) for predictions)")
    n = num_classes
    images = target.shape[0] if target.dim() > 1 else 1
    pixels = math.prod(target.shape[1:]) if target.dim() > 1 else target.numel()
    target = target.reshape(images, pixels).long()  # before any arithmetic: uint8 masks would overflow
    prediction = prediction.reshape(images, pixels).to(target.device, torch.long)
    counted = target != ignore_index
    # Ranges by min/max (a few passes over the pixels, one host sync); the offending value is
    # looked for only when one is out of range. Predictions on ignored pixels may be anything.
    ranges = torch.stack([*torch.aminmax(torch.where(counted, target, 0)), *torch.aminmax(prediction)]).tolist() \
        if target.numel() else [0, 0, 0, 0]
    if ranges[0] < 0 or ranges[1] >= n or ranges[2] < 0 or ranges[3] >= n:
        bad_target = counted & ((target < 0) | (target >= n))
        if bool(bad_target.any()):
            value = int(target[bad_target][0])
            raise ValueError(f"target label {value} is outside 0..{n - 1} and is not the ignore value {ignore_index}")
        bad_prediction = counted & ((prediction < 0) | (prediction >= n))
        if bool(bad_prediction.any()):
            raise ValueError(f"predicted label {int(prediction[bad_prediction][0])} is outside 0..{n - 1}")
    return target * n + prediction, counted


def scores_from_confusion(mat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every figure from confusion matrices [..., K, K] (float64 CPU tensors, nan where undefined):
    iou, dice, class_acc [..., K]; miou, mean_dice, mean_acc, pixel_acc [...]."""
    mat = mat.detach().to("cpu", torch.float64)  # float64: pixel counts exceed float32's 2**24 exactly
    true_positive = mat.diagonal(dim1=-2, dim2=-1)
    in_target = mat.sum(dim=-1)
    in_prediction = mat.sum(dim=-2)
    # 0/0 is nan in torch: a class with no pixels on either side has no score rather than 0 or 1.
    iou = true_positive / (in_target + in_prediction - true_positive)
    dice = 2 * true_positive / (in_target + in_prediction)
    class_acc = true_positive / in_target
    return {
        "iou": iou,
        "dice": dice,
        "class_acc": class_acc,
        "miou": torch.nanmean(iou, dim=-1),
        "mean_dice": torch.nanmean(dice, dim=-1),
        "mean_acc": torch.nanmean(class_acc, dim=-1),
        "pixel_acc": true_positive.sum(dim=-1) / mat.sum(dim=(-2, -1)),
    }


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str | None = None):
        if num_classes < 1:
            raise ValueError(f"ConfusionMatrix needs num_classes >= 1 (got {num_classes})")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class label (num_classes={num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, target: torch.Tensor, prediction: torch.Tensor) -> None:
        """Count one batch: target and prediction are integer label maps of the same shape ([N, H, W])."""
        n = self.num_classes
        cells, counted = _cells(target, prediction, n, self.ignore_index)
        # Ignored pixels go to an extra bin n*n that is dropped, which avoids a boolean-mask copy.
        cells = torch.where(counted, cells, n * n)
        counts = torch.bincount(cells.reshape(-1), minlength=n * n + 1)[: n * n]
        self.mat += counts.view(n, n).to(self.mat.device)

    def reset(self) -> None:
        self.mat.zero_()

    def all_reduce(self) -> None:
        """Sum the matrix over all ranks (in place); a no-op without torch.distributed. Call it once."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        mat = self.mat
        if dist.get_backend() == "nccl" and mat.device.type != "cuda":  # NCCL reduces CUDA tensors only
            mat = mat.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(mat, op=dist.ReduceOp.SUM)
        if mat is not self.mat:
            self.mat.copy_(mat)

    def compute(self) -> dict:
        """iou, class_acc, dice: float64 CPU tensors [C] (nan where undefined);
        miou, pixel_acc, mean_acc (mean class accuracy), mean_dice: floats."""
        stats = scores_from_confusion(self.mat)
        return {
            "iou": stats["iou"],
            "miou": stats["miou"].item(),
            "pixel_acc": stats["pixel_acc"].item(),
            "class_acc": stats["class_acc"],
            "mean_acc": stats["mean_acc"].item(),
            "dice": stats["dice"],
            "mean_dice": stats["mean_dice"].item(),
        }

    def summary(self, class_names: list[str], prefix: str = "val") -> dict[str, float]:
        """Flat floats for reporting: {prefix}/miou, /pixel_acc, /mean_acc, /dice (mean),
        /iou/<class>, /dice/<class>.

        Every class always has its keys, so every report carries the same names (Tune and
        checkpoint ranking need the metric in each result); a class absent from both the
        ground truth and the predictions so far reads nan.
        """
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names given for {self.num_classes} classes")
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"class names repeat: {class_names}")
        stats = self.compute()
        result = {
            f"{prefix}/miou": stats["miou"],
            f"{prefix}/pixel_acc": stats["pixel_acc"],
            f"{prefix}/mean_acc": stats["mean_acc"],
            f"{prefix}/dice": stats["mean_dice"],
        }
        for name, iou in zip(class_names, stats["iou"].tolist()):
            result[f"{prefix}/iou/{name}"] = iou
        for name, dice in zip(class_names, stats["dice"].tolist()):
            result[f"{prefix}/dice/{name}"] = dice
        return result


def predict_labels(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Label maps int64 [N,H,W] from logits [N,C,H,W]: argmax, or sigmoid > threshold for one channel."""
    if logits.shape[1] == 1:
        return (torch.sigmoid(logits[:, 0].float()) > threshold).long()
    # max(dim).indices is argmax (the first maximum on ties) at a fraction of argmax's cost on CPU
    return logits.max(dim=1).indices


# --- per image --------------------------------------------------------------------------


@torch.no_grad()
def per_image_confusion(
    target: torch.Tensor, prediction: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """One confusion matrix per image: int64 [N, K, K] from label maps [N, H, W], in one bincount."""
    n, k = target.shape[0], num_classes
    cells, counted = _cells(target, prediction, k, ignore_index)
    offsets = torch.arange(n, device=cells.device).unsqueeze(1) * (k * k)  # image i counts into bins i*K*K..
    cells = torch.where(counted, cells + offsets, n * k * k)
    return torch.bincount(cells.reshape(-1), minlength=n * k * k + 1)[: n * k * k].view(n, k, k)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask with a 4-neighbour outside it; outside the array counts as outside."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def assd(prediction: np.ndarray, target: np.ndarray) -> float:
    """ASSD in pixels between two boolean masks [H, W]; the empty-mask convention is in the module doc."""
    has_prediction, has_target = bool(prediction.any()), bool(target.any())
    if not (has_prediction or has_target):
        return math.nan
    if has_prediction != has_target:
        return math.hypot(*target.shape)
    if np.array_equal(prediction, target):
        return 0.0
    # Only the union's bounding box matters; every pixel on its edge that belongs to a mask is
    # a surface pixel whether or not the box is cut out, so cutting it out changes nothing.
    rows = np.flatnonzero((prediction | target).any(axis=1))
    cols = np.flatnonzero((prediction | target).any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    predicted_surface = np.argwhere(_surface(prediction[box]))
    true_surface = np.argwhere(_surface(target[box]))
    # exact nearest surface pixels through k-d trees: O(surface log surface), not O(image) like a distance transform
    to_true, _ = cKDTree(true_surface).query(predicted_surface, k=1)
    to_predicted, _ = cKDTree(predicted_surface).query(true_surface, k=1)
    return float((to_true.sum() + to_predicted.sum()) / (to_true.size + to_predicted.size))


def assd_per_class(target: np.ndarray, prediction: np.ndarray, num_classes: int,
                   ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """ASSD of every class for one image: float64 [K] from label maps [H, W]."""
    labelled = target != ignore_index
    return np.array([assd((prediction == c) & labelled, target == c) for c in range(num_classes)])


class ImageScores:
    """Per-image scores of an evaluation: a confusion matrix per image (so every matrix
    figure per image) and, optionally, ASSD per class. Keyed by dataset index, so a
    distributed evaluation can prove that each sample was scored exactly once."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, with_assd: bool = True):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.with_assd = with_assd
        self._indices: list[np.ndarray] = []
        self._confusions: list[np.ndarray] = []
        self._assd: list[np.ndarray] = []

    def update(self, indices: Sequence[int], target: torch.Tensor, prediction: torch.Tensor) -> None:
        """Score a batch: label maps [N, H, W] of the samples `indices` of the dataset."""
        if len(indices) != target.shape[0]:
            raise ValueError(f"{len(indices)} indices for a batch of {target.shape[0]} images")
        self._indices.append(np.asarray(indices, dtype=np.int64))
        matrices = per_image_confusion(target, prediction, self.num_classes, self.ignore_index)
        self._confusions.append(matrices.cpu().numpy())
        if self.with_assd:
            target_np, prediction_np = target.cpu().numpy(), prediction.cpu().numpy()
            self._assd.append(np.stack([
                assd_per_class(t, p, self.num_classes, self.ignore_index) for t, p in zip(target_np, prediction_np)
            ]))

    @property
    def indices(self) -> np.ndarray:
        return np.concatenate(self._indices) if self._indices else np.zeros(0, dtype=np.int64)

    @property
    def confusions(self) -> np.ndarray:
        """int64 [N, K, K] in the order of `indices`."""
        k = self.num_classes
        return np.concatenate(self._confusions) if self._confusions else np.zeros((0, k, k), dtype=np.int64)

    @property
    def assd(self) -> np.ndarray:
        """float64 [N, K] in the order of `indices` (empty without with_assd)."""
        return np.concatenate(self._assd) if self._assd else np.zeros((0, self.num_classes))

    def gather(self) -> None:
        """Collect every rank's images on every rank, sorted by index; a no-op without torch.distributed."""
        local = (self.indices, self.confusions, self.assd)
        parts = [local]
        if dist.is_available() and dist.is_initialized():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
        indices = np.concatenate([part[0] for part in parts])
        order = np.argsort(indices, kind="stable")
        self._indices = [indices[order]]
        self._confusions = [np.concatenate([part[1] for part in parts])[order]]
        self._assd = [np.concatenate([part[2] for part in parts])[order]] if self.with_assd else []

    def check_complete(self, dataset_length: int) -> None:
        """Raise unless the scored indices are exactly 0..dataset_length-1, each once."""
        indices = np.sort(self.indices)
        if indices.size == dataset_length and np.array_equal(indices, np.arange(dataset_length)):
            return
        unique, counts = np.unique(indices, return_counts=True)
        twice = unique[counts > 1][:5].tolist()
        missing = np.setdiff1d(np.arange(dataset_length), unique)[:5].tolist()
        raise RuntimeError(
            f"scored {indices.size} images for a dataset of {dataset_length}: "
            f"counted more than once {twice or 'none'}, missing {missing or 'none'}"
        )

    def total_confusion(self) -> ConfusionMatrix:
        """The dataset's matrix: the sum of the per-image ones."""
        matrix = ConfusionMatrix(self.num_classes, self.ignore_index)
        matrix.mat += torch.from_numpy(self.confusions.sum(axis=0))
        return matrix

    def scores(self) -> dict[str, np.ndarray]:
        """float64 arrays in the order of `indices`: iou, dice, class_acc, assd [N, K];
        miou, mean_dice, mean_acc, pixel_acc, mean_assd [N] (nan where undefined)."""
        stats = {key: value.numpy() for key, value in scores_from_confusion(torch.from_numpy(self.confusions)).items()}
        if self.with_assd:
            stats["assd"] = self.assd
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an image without any class on either side
                stats["mean_assd"] = np.nanmean(stats["assd"], axis=1)
        return stats
