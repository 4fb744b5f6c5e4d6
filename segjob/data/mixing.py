"""Mixup and CutMix on a training batch, with soft targets (the PSPNet recipe).

    mixer = build_mixer(job.data, num_classes)       # None when the job mixes nothing
    if mixer:
        images, targets = mixer(images, targets, seed=batch_seed)

Per batch, one of the two is picked at random (probabilities `data.mixing.mixup` and
`data.mixing.cutmix`; the rest of the time the batch passes unchanged). Each sample is
paired with another of the batch (a random permutation) and gets its own ratio from
Beta(alpha, alpha):

- Mixup blends the images (depth included: it is an image channel) and the targets;
- CutMix pastes a box of the partner, of area 1 - ratio at a random place, into both the
  image and the target, exactly (no blending inside the box).

Targets come back as float [N, K, H, W] probabilities. An ignored pixel has all-zero
probabilities; where Mixup blends a labelled pixel with an ignored one, the labelled one's
distribution is kept (the pixel still shows that content), so every labelled pixel sums to 1.
All randomness comes from torch.Generator().manual_seed(seed): the engine derives the seed
from (job seed, epoch, position, rank), which keeps resumed runs exact.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.special
import torch
import torch.nn.functional as F

from segjob.data.labels import IGNORE_INDEX
from segjob.job.schema import DataBase, MixingConfig


def soft_targets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 [N, H, W] labels -> float [N, K, H, W] one-hot, all zero at IGNORE_INDEX; soft targets pass."""
    if targets.is_floating_point():
        if targets.dim() != 4 or targets.shape[1] != num_classes:
            raise ValueError(f"soft targets must be [N, {num_classes}, H, W], got {list(targets.shape)}")
        return targets
    labelled = targets != IGNORE_INDEX
    one_hot = F.one_hot(torch.where(labelled, targets, 0), num_classes).permute(0, 3, 1, 2)
    return one_hot.to(torch.float32) * labelled.unsqueeze(1)


def beta_ratios(count: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """count draws from Beta(alpha, alpha), by the inverse CDF of uniforms from generator
    (torch's own Beta sampler cannot take a generator)."""
    uniforms = torch.rand(count, generator=generator, dtype=torch.float64)
    if alpha == 1.0:
        return uniforms.float()  # Beta(1, 1) is uniform
    return torch.from_numpy(np.asarray(scipy.special.betaincinv(alpha, alpha, uniforms.numpy()))).float()


class BatchMixer:
    def __init__(self, cfg: MixingConfig, num_classes: int):
        self.mixup, self.cutmix, self.alpha = cfg.mixup, cfg.cutmix, cfg.alpha
        self.num_classes = num_classes

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        # the same number of draws whatever is picked, so a batch's outcome never shifts another's
        pick = float(torch.rand((), generator=generator))
        partner = torch.randperm(images.shape[0], generator=generator)
        ratios = beta_ratios(images.shape[0], self.alpha, generator)
        corners = torch.rand(images.shape[0], 2, generator=generator)
        if pick < self.mixup:
            return self.apply_mixup(images, targets, partner, ratios)
        if pick < self.mixup + self.cutmix:
            return self.apply_cutmix(images, targets, partner, ratios, corners)
        return images, targets

    def apply_mixup(self, images, targets, partner, ratios):
        device = images.device
        partner, ratios = partner.to(device), ratios.to(device)
        weight = ratios.view(-1, 1, 1, 1)
        mixed_images = weight * images + (1 - weight) * images[partner]
        soft = soft_targets(targets, self.num_classes)
        own = weight * soft.sum(1, keepdim=True)  # 0 where the pixel is ignored
        other = (1 - weight) * soft[partner].sum(1, keepdim=True)
        total = own + other
        mixed = (weight * soft + (1 - weight) * soft[partner]) / total.clamp_min(1e-12)
        return mixed_images, torch.where(total > 0, mixed, torch.zeros_like(mixed))

    def apply_cutmix(self, images, targets, partner, ratios, corners):
        height, width = images.shape[-2:]
        soft = soft_targets(targets, self.num_classes)
        mixed_images, mixed_targets = images.clone(), soft.clone()
        for i, (j, ratio, (along_y, along_x)) in enumerate(zip(partner.tolist(), ratios.tolist(), corners.tolist())):
            top, left, bottom, right = cutmix_box(height, width, ratio, along_y, along_x)
            mixed_images[i, :, top:bottom, left:right] = images[j, :, top:bottom, left:right]
            mixed_targets[i, :, top:bottom, left:right] = soft[j, :, top:bottom, left:right]
        return mixed_images, mixed_targets


def cutmix_box(height: int, width: int, ratio: float, along_y: float, along_x: float) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of a box covering about 1 - ratio of the image, wholly inside it,
    its corner at fractions (along_y, along_x) of the free play."""
    side = math.sqrt(1.0 - ratio)
    box_height, box_width = round(height * side), round(width * side)
    top = round(along_y * (height - box_height))
    left = round(along_x * (width - box_width))
    return top, left, top + box_height, left + box_width


def build_mixer(cfg: DataBase, num_classes: int) -> BatchMixer | None:
    """The job's batch mixer, or None when it mixes nothing."""
    mixing = cfg.mixing
    if mixing.mixup == 0 and mixing.cutmix == 0:
        return None
    return BatchMixer(mixing, num_classes)
