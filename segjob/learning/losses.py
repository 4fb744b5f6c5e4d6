"""Losses, built by name from the job's `loss` section.

    loss_fn = build_loss(job.loss, num_classes, train_set).to(device)
    model = create_model(job.model, in_channels, output_channels(job.loss, num_classes))
    loss = loss_fn(logits, target)   # logits [N, C, H, W] -> scalar

`target` is either int64 labels [N, H, W] (0..K-1, or IGNORE_INDEX) or float32 class
probabilities [N, K, H, W] (Mixup/CutMix, expert vote masks), all zero at ignored pixels.
Every loss takes both. Ignored pixels count for nothing, and a batch where every pixel is
ignored gives 0 with a zero gradient rather than NaN: DDP ranks must all run backward
through the same graph, and a NaN would poison every rank.

The family (`loss.name`): `ce`, `focal`, `dice`, the weighted sums `ce+dice` and
`focal+dice`, and for two-class data with a one-channel (sigmoid) output `bce` and
`bce+dice`, where the target's class 1 is the foreground. Cross-entropy-like terms take
class weights, given or computed from the training masks (`inverse`, `median`; see
`class_weights_from_data`). Losses compute in float32 whatever the autocast dtype.

Adding a loss is one `LossEntry` in `LOSSES`: its name (the `name` tag of its config
class in job/schema.py), that class, a builder taking (config, num_classes, class_weights),
and whether it needs the one-channel output.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segjob.data.labels import IGNORE_INDEX
from segjob.errors import UserError
from segjob.job.registry import Entry, Registry
from segjob.job.schema import (
    BCEConfig,
    BCEDiceConfig,
    BinaryOutput,
    CEDiceConfig,
    CrossEntropyConfig,
    DiceConfig,
    FocalConfig,
    FocalDiceConfig,
)

log = logging.getLogger("segjob")


# --- targets ----------------------------------------------------------------------------


def is_soft(target: torch.Tensor) -> bool:
    """Class probabilities [N, K, H, W] rather than labels [N, H, W]."""
    return target.is_floating_point()


def labelled_pixels(target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Bool [N, H, W]: the pixels a loss counts (soft targets: those with any probability)."""
    if is_soft(target):
        return target.sum(dim=1) > 0
    return target != ignore_index


def _check_shapes(logits: torch.Tensor, target: torch.Tensor, channels: int, num_classes: int) -> None:
    if logits.dim() != 4 or logits.shape[1] != channels:
        raise ValueError(f"expected logits [N, {channels}, H, W], got {tuple(logits.shape)}")
    n, _, h, w = logits.shape
    expected = (n, num_classes, h, w) if is_soft(target) else (n, h, w)
    if tuple(target.shape) != expected:
        kind = "soft target [N, K, H, W]" if is_soft(target) else "label target [N, H, W]"
        raise ValueError(f"{kind} of shape {tuple(target.shape)} does not fit logits {tuple(logits.shape)}")


def _mean(total: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """total / divisor, and 0 (not 0/0) when nothing was counted; no host sync."""
    return total / torch.where(divisor > 0, divisor, torch.ones_like(divisor))


# --- softmax losses ---------------------------------------------------------------------


class CrossEntropy(nn.Module):
    """Pixel-wise cross-entropy, mean over labelled pixels (weighted like torch's: divided by
    the summed weights of the target classes)."""

    def __init__(
        self,
        num_classes: int,
        class_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        ignore_index: int = IGNORE_INDEX,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        weight = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
        self.register_buffer("class_weights", weight, persistent=False)  # follows .to(device); not in state dicts

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, target, self.num_classes, self.num_classes)
        logits = logits.float()  # a bf16/fp16 log-softmax summed over many pixels loses precision
        weight = None if self.class_weights is None else self.class_weights.to(logits.dtype)
        if is_soft(target):
            return self._soft(logits, target.float(), weight)
        target = target.long()
        total = F.cross_entropy(
            logits, target, weight=weight, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, reduction="sum",
        )
        # torch's "mean" divides by the counted pixels (or their summed class weights) and
        # gives 0/0 = NaN when there are none; the same divisor computed here divides by 1 instead.
        counted = target != self.ignore_index
        if weight is None:
            return _mean(total, counted.sum())
        return _mean(total, (weight[target.masked_fill(~counted, 0)] * counted).sum())

    def _soft(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        counted = labelled_pixels(target, self.ignore_index)
        smoothed = target
        if self.label_smoothing:  # as torch does for probability targets, but only where labelled
            smoothed = (target * (1 - self.label_smoothing)
                        + counted.unsqueeze(1) * (self.label_smoothing / self.num_classes))
        if weight is not None:
            weight = weight.view(1, -1, 1, 1)
            smoothed, target = smoothed * weight, target * weight
        total = -(smoothed * F.log_softmax(logits, dim=1)).sum()
        return _mean(total, target.sum())  # the labelled pixels, or their expected class weight


class Focal(nn.Module):
    """Focal loss (Lin et al. 2017): -sum_c alpha_c t_c (1 - p_c) ** gamma log p_c per pixel,
    divided like CrossEntropy, so gamma 0 with the same weights is exactly cross-entropy."""

    def __init__(self, num_classes: int, gamma: float = 2.0, class_weights: Sequence[float] | None = None,
                 ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.num_classes = num_classes
        self.gamma = gamma
        self.ignore_index = ignore_index
        weight = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
        self.register_buffer("class_weights", weight, persistent=False)

    def _modulation(self, log_p: torch.Tensor) -> torch.Tensor:
        # 1 - p as -expm1(log p): exact near p = 1; the clamp keeps the gradient finite for gamma < 1
        return (-torch.expm1(log_p)).clamp(min=1e-12) ** self.gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, target, self.num_classes, self.num_classes)
        log_p = F.log_softmax(logits.float(), dim=1)
        weight = None if self.class_weights is None else self.class_weights.to(log_p.dtype)
        if is_soft(target):
            target = target.float()
            if weight is not None:
                target = target * weight.view(1, -1, 1, 1)
            return _mean(-(target * self._modulation(log_p) * log_p).sum(), target.sum())
        counted = target != self.ignore_index
        index = target.long().masked_fill(~counted, 0)
        log_p_true = log_p.gather(1, index.unsqueeze(1)).squeeze(1)
        pixel_weight = counted.to(log_p.dtype) if weight is None else weight[index] * counted
        total = -(pixel_weight * self._modulation(log_p_true) * log_p_true).sum()
        return _mean(total, pixel_weight.sum())


class Dice(nn.Module):
    """Soft multi-class Dice loss over the batch's labelled pixels: 1 - mean over classes of
    (2 sum p t + smooth) / (sum p + sum t + smooth). A class absent from both scores 1."""

    def __init__(self, num_classes: int, smooth: float = 1.0, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.num_classes = num_classes
        self.smooth = smooth
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, target, self.num_classes, self.num_classes)
        counted = labelled_pixels(target, self.ignore_index)
        probs = F.softmax(logits.float(), dim=1) * counted.unsqueeze(1)
        predicted = probs.sum(dim=(0, 2, 3))
        if is_soft(target):
            target = target.float()
            overlap = (probs * target).sum(dim=(0, 2, 3))
            present = target.sum(dim=(0, 2, 3))
        else:  # per-class sums by index_add: no one-hot [N, K, H, W] copy of the labels
            index = target.long().masked_fill(~counted, 0)
            p_true = probs.gather(1, index.unsqueeze(1)).reshape(-1)
            overlap = probs.new_zeros(self.num_classes).index_add(0, index.reshape(-1), p_true)
            present = probs.new_zeros(self.num_classes).index_add(
                0, index.reshape(-1), counted.reshape(-1).to(probs.dtype)
            )
        dice = (2 * overlap + self.smooth) / (predicted + present + self.smooth)
        return 1 - dice.mean()


# --- one-channel (sigmoid) losses for two-class data -------------------------------------


def foreground_target(target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(foreground probability float [N, H, W], labelled bool [N, H, W]) from either target form."""
    counted = labelled_pixels(target, ignore_index)
    if is_soft(target):
        return target[:, 1].float(), counted
    return (target == 1).float(), counted


class BinaryCrossEntropy(nn.Module):
    """Sigmoid cross-entropy of one logit channel against the foreground probability,
    -(w1 t log s + w0 (1 - t) log(1 - s)), divided by the pixels' expected weight."""

    def __init__(self, class_weights: Sequence[float] | None = None, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.ignore_index = ignore_index
        weight = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
        self.register_buffer("class_weights", weight, persistent=False)  # [background, foreground]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, target, 1, 2)
        x = logits[:, 0].float()
        foreground, counted = foreground_target(target, self.ignore_index)
        if self.class_weights is None:
            per_pixel = F.binary_cross_entropy_with_logits(x, foreground, reduction="none")
            return _mean((per_pixel * counted).sum(), counted.sum())
        w0, w1 = self.class_weights.to(x.dtype)
        per_pixel = -(w1 * foreground * F.logsigmoid(x) + w0 * (1 - foreground) * F.logsigmoid(-x))
        expected_weight = (w1 * foreground + w0 * (1 - foreground)) * counted
        return _mean((per_pixel * counted).sum(), expected_weight.sum())


class BinaryDice(nn.Module):
    """Dice loss of the sigmoid foreground map over the batch's labelled pixels."""

    def __init__(self, smooth: float = 1.0, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.smooth = smooth
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, target, 1, 2)
        foreground, counted = foreground_target(target, self.ignore_index)
        probs = torch.sigmoid(logits[:, 0].float()) * counted
        foreground = foreground * counted
        dice = (2 * (probs * foreground).sum() + self.smooth) / (probs.sum() + foreground.sum() + self.smooth)
        return 1 - dice


class WeightedSum(nn.Module):
    """sum of weight x loss, e.g. CE + Dice."""

    def __init__(self, terms: list[tuple[float, nn.Module]]):
        super().__init__()
        self.weights = [float(weight) for weight, _ in terms]
        self.terms = nn.ModuleList(term for _, term in terms)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = self.weights[0] * self.terms[0](logits, target)
        for weight, term in zip(self.weights[1:], self.terms[1:]):
            total = total + weight * term(logits, target)
        return total


# --- class weights from the training masks -----------------------------------------------


def evenly_spaced(count: int, limit: int) -> list[int]:
    """At most `limit` indices spread over range(count): the same on every rank and run."""
    if count <= limit:
        return list(range(count))
    return sorted(set(np.linspace(0, count - 1, limit).round().astype(int).tolist()))


def count_classes(dataset: Any, num_classes: int, max_samples: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(pixels per class, pixels of the images where each class is present, samples read).

    Reads the training set as epoch 0 serves it (its augmentation is seeded per sample,
    so every rank reads identical masks), at most `max_samples` samples evenly spaced.
    Soft targets count their probabilities.
    """
    class_pixels = np.zeros(num_classes, dtype=np.float64)
    present_pixels = np.zeros(num_classes, dtype=np.float64)
    indices = evenly_spaced(len(dataset), max_samples)
    for index in indices:
        _, target = dataset[index]
        if is_soft(target):
            per_class = target.double().sum(dim=(1, 2)).numpy()
            labelled = float(per_class.sum())
        else:
            labels = target.reshape(-1).long()
            labels = labels[labels != IGNORE_INDEX]
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
                bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
                name = dataset.sample_name(index) if hasattr(dataset, "sample_name") else f"#{index}"
                raise UserError(f"training sample '{name}': label {bad} is outside 0..{num_classes - 1}; "
                                f"run python -m segjob.check on the job")
            per_class = torch.bincount(labels, minlength=num_classes).double().numpy()
            labelled = float(labels.numel())
        class_pixels += per_class
        present_pixels += np.where(per_class > 0, labelled, 0.0)
    return class_pixels, present_pixels, len(indices)


def weights_from_counts(kind: str, class_pixels: np.ndarray, present_pixels: np.ndarray) -> list[float]:
    """inverse: total / (K x pixels_c) (1 for every class when balanced).
    median (Eigen & Fergus 2015, SegNet): f_c = pixels_c / pixels of the images holding c,
    weight_c = median(f) / f_c. A class never seen gets the largest weight of the others."""
    seen = class_pixels > 0
    if not seen.any():
        raise UserError("loss.class_weights: the training masks counted hold no labelled pixel; give weights as a list")
    weights = np.zeros_like(class_pixels)
    if kind == "inverse":
        weights[seen] = class_pixels.sum() / (len(class_pixels) * class_pixels[seen])
    elif kind == "median":
        frequency = class_pixels[seen] / present_pixels[seen]
        weights[seen] = np.median(frequency) / frequency
    else:
        raise ValueError(f"unknown class weighting '{kind}'")
    weights[~seen] = weights[seen].max()
    return weights.tolist()


def class_weights_from_data(kind: str, dataset: Any, num_classes: int, max_samples: int) -> list[float]:
    class_pixels, present_pixels, samples = count_classes(dataset, num_classes, max_samples)
    weights = weights_from_counts(kind, class_pixels, present_pixels)
    names = getattr(dataset, "class_names", [str(c) for c in range(num_classes)])
    unseen = [name for name, pixels in zip(names, class_pixels) if pixels == 0]
    log.info("loss.class_weights=%s from %d training samples: %s", kind, samples,
             ", ".join(f"{name} {weight:.3g}" for name, weight in zip(names, weights)))
    if unseen:
        log.warning("loss.class_weights: no pixel of %s in the %d samples counted; weighted like the rarest class",
                    ", ".join(unseen), samples)
    return weights


def resolve_class_weights(cfg: Any, num_classes: int, train_set: Any) -> list[float] | None:
    weights = getattr(cfg, "class_weights", None)
    if isinstance(weights, str):
        if train_set is None:
            raise ValueError(f"loss.class_weights={weights} is computed from the training set: pass it to build_loss")
        return class_weights_from_data(weights, train_set, num_classes, cfg.frequency_samples)
    if weights is not None and len(weights) != num_classes:
        raise UserError(
            f"loss.class_weights: {len(weights)} weights given but the dataset has {num_classes} classes; "
            f"give one weight per class"
        )
    if weights is not None and (any(w < 0 for w in weights) or not any(w > 0 for w in weights)):
        raise UserError(f"loss.class_weights: weights must be >= 0 and not all 0 (got {weights})")
    return weights


# --- the registry -----------------------------------------------------------------------


@dataclass(frozen=True)
class LossEntry(Entry):
    build: Callable[[Any, int, list[float] | None], nn.Module]  # (config, num_classes, class_weights)
    binary: bool = False  # one sigmoid output channel for two-class data


LOSSES: Registry[LossEntry] = Registry(
    "loss",
    (
        LossEntry("ce", CrossEntropyConfig,
                  lambda cfg, k, w: CrossEntropy(k, w, cfg.label_smoothing)),
        LossEntry("focal", FocalConfig,
                  lambda cfg, k, w: Focal(k, cfg.gamma, w)),
        LossEntry("dice", DiceConfig,
                  lambda cfg, k, w: Dice(k, cfg.smooth)),
        LossEntry("ce+dice", CEDiceConfig,
                  lambda cfg, k, w: WeightedSum([(cfg.ce_weight, CrossEntropy(k, w, cfg.label_smoothing)),
                                                 (cfg.dice_weight, Dice(k, cfg.smooth))])),
        LossEntry("focal+dice", FocalDiceConfig,
                  lambda cfg, k, w: WeightedSum([(cfg.focal_weight, Focal(k, cfg.gamma, w)),
                                                 (cfg.dice_weight, Dice(k, cfg.smooth))])),
        LossEntry("bce", BCEConfig,
                  lambda cfg, k, w: BinaryCrossEntropy(w), binary=True),
        LossEntry("bce+dice", BCEDiceConfig,
                  lambda cfg, k, w: WeightedSum([(cfg.bce_weight, BinaryCrossEntropy(w)),
                                                 (cfg.dice_weight, BinaryDice(cfg.smooth))]), binary=True),
    ),
    where="loss.name",
)


def _entry(cfg: Any, num_classes: int) -> LossEntry:
    entry = LOSSES.lookup(getattr(cfg, "name", None))
    if not isinstance(cfg, entry.config_class):  # a programming error, not the user's
        raise TypeError(f"loss '{cfg.name}' needs a {entry.config_class.__name__}, got {type(cfg).__name__}")
    if entry.binary and num_classes != 2:
        raise UserError(
            f"loss.name: '{entry.name}' is for two-class data (background, foreground) with one output channel; "
            f"this dataset has {num_classes} classes: use ce, focal, dice or ce+dice"
        )
    return entry


def build_loss(cfg: Any, num_classes: int, train_set: Any = None) -> nn.Module:
    """The job's loss. `train_set` is read only for class_weights inverse/median."""
    entry = _entry(cfg, num_classes)
    return entry.build(cfg, num_classes, resolve_class_weights(cfg, num_classes, train_set))


def output_channels(cfg: Any, num_classes: int) -> int:
    """Channels the model must output for this loss: 1 for bce / bce+dice, else num_classes."""
    return 1 if _entry(cfg, num_classes).binary else num_classes


def binary_threshold(cfg: Any) -> float:
    """Where a one-channel model's sigmoid probability becomes foreground: the one place that resolves it.

    Softmax losses have no threshold (their models take the argmax); they get the schema's default.
    """
    return float(getattr(cfg, "threshold", BinaryOutput.model_fields["threshold"].default))
