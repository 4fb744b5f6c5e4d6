"""Batch mixing: Mixup targets are distributions, CutMix boxes match between image and target, seeds decide all."""

from __future__ import annotations

import pytest
import torch

from segjob.data.labels import IGNORE_INDEX
from segjob.data.mixing import BatchMixer, beta_ratios, build_mixer, cutmix_box, soft_targets
from segjob.job.schema import MixingConfig, SyntheticData

K = 4


def batch(n: int = 6, size: int = 16, ignored: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 4, size, size, generator=generator)  # RGB + depth
    labels = torch.randint(0, K, (n, size, size), generator=generator)
    if ignored:
        labels[:, :3, :] = IGNORE_INDEX  # padding rows
        labels[0, 5:9, 5:9] = IGNORE_INDEX
    return images, labels


def draws(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The partners and ratios a mixer draws from `seed` (after its pick)."""
    generator = torch.Generator().manual_seed(seed)
    torch.rand((), generator=generator)
    partner = torch.randperm(n, generator=generator)
    return partner, beta_ratios(n, 1.0, generator)


def mixer(mixup: float = 0.0, cutmix: float = 0.0, alpha: float = 1.0) -> BatchMixer:
    return BatchMixer(MixingConfig(mixup=mixup, cutmix=cutmix, alpha=alpha), K)


def test_no_mixing_configured_means_no_mixer():
    assert build_mixer(SyntheticData(), K) is None
    cfg = SyntheticData(mixing=MixingConfig(mixup=0.5, cutmix=0.5))
    assert isinstance(build_mixer(cfg, K), BatchMixer)
    with pytest.raises(ValueError, match="at most one mixing per batch"):
        MixingConfig(mixup=0.7, cutmix=0.5)


def test_soft_targets_are_one_hot_and_zero_where_ignored():
    _, labels = batch()
    soft = soft_targets(labels, K)
    assert soft.shape == (6, K, 16, 16) and soft.dtype == torch.float32
    labelled = labels != IGNORE_INDEX
    assert torch.equal(soft.sum(1), labelled.float())
    assert torch.equal(soft.argmax(1)[labelled], labels[labelled])
    assert soft_targets(soft, K) is soft  # already soft: passes
    with pytest.raises(ValueError, match=r"\[N, 4, H, W\]"):
        soft_targets(torch.zeros(2, 3, 4, 4), K)


@pytest.mark.parametrize("seed", range(5))
def test_mixup_targets_sum_to_one_where_labelled(seed):
    images, labels = batch()
    mixed_images, targets = mixer(mixup=1.0)(images, labels, seed)
    assert targets.shape == (6, K, 16, 16) and targets.dtype == torch.float32
    assert (targets >= 0).all()
    sums = targets.sum(1)
    # a pixel ignored in a sample and in its partner stays ignored (all zero), every other sums to 1
    partner, _ = draws(seed, 6)
    ignored = labels == IGNORE_INDEX
    both_ignored = ignored & ignored[partner]
    assert both_ignored.any() and (~both_ignored).any()
    assert torch.allclose(sums[~both_ignored], torch.ones(()))
    assert (sums[both_ignored] == 0).all()
    assert mixed_images.shape == images.shape and not torch.equal(mixed_images, images)


def test_mixup_blends_images_and_targets_with_one_ratio_per_sample():
    images, labels = batch(ignored=False)
    seed = 11
    partner, ratios = draws(seed, 6)
    mixed_images, targets = mixer(mixup=1.0)(images, labels, seed)
    soft = soft_targets(labels, K)
    for i in range(6):
        j, ratio = int(partner[i]), float(ratios[i])
        assert torch.allclose(mixed_images[i], ratio * images[i] + (1 - ratio) * images[j], atol=1e-6)
        assert torch.allclose(targets[i], ratio * soft[i] + (1 - ratio) * soft[j], atol=1e-6)


def test_mixup_keeps_the_labelled_side_where_the_partner_is_ignored():
    images, labels = batch(n=2, ignored=False)
    labels[1] = IGNORE_INDEX  # the whole partner is padding
    labels[0, 0, 0] = IGNORE_INDEX
    for seed in range(10):
        _, targets = mixer(mixup=1.0)(images, labels, seed)
        own = soft_targets(labels, K)
        # sample 0 keeps its own one-hot wherever it is labelled (its partner, 1 or itself, adds nothing
        # else), and its ignored pixel stays ignored
        labelled = labels[0] != IGNORE_INDEX
        assert torch.allclose(targets[0][:, labelled], own[0][:, labelled])
        assert (targets[0][:, 0, 0] == 0).all()


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_box_matches_between_image_and_target(seed):
    images, labels = batch()
    mixed_images, targets = mixer(cutmix=1.0)(images, labels, seed)
    soft = soft_targets(labels, K)
    for i in range(images.shape[0]):
        # each pixel comes whole from one sample: the same one in the image (all 4 channels) and the target
        from_self = (mixed_images[i] == images[i]).all(0) & (targets[i] == soft[i]).all(0)
        sources = [(mixed_images[i] == images[j]).all(0) & (targets[i] == soft[j]).all(0)
                   for j in range(images.shape[0])]
        assert torch.stack(sources).any(0).all(), "every pixel's image and target come from the same sample"
        pasted = ~from_self
        if pasted.any():  # the pasted part is one axis-aligned box
            rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
            box = pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.all()
    assert set(targets.sum(1).unique().tolist()) <= {0.0, 1.0}  # CutMix never blends


def test_cutmix_box_area_follows_the_ratio():
    assert cutmix_box(100, 60, 0.75, 0.0, 0.0) == (0, 0, 50, 30)  # sqrt(0.25) of each side
    assert cutmix_box(100, 60, 0.75, 1.0, 1.0) == (50, 30, 100, 60)  # wholly inside
    assert cutmix_box(10, 10, 1.0, 0.5, 0.5)[2:] == cutmix_box(10, 10, 1.0, 0.5, 0.5)[:2]  # ratio 1: empty


def test_the_seed_decides_everything_and_probabilities_pick_per_batch():
    images, labels = batch()
    both = mixer(mixup=0.5, cutmix=0.5)
    first, again = both(images, labels, 42), both(images, labels, 42)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    kinds = {"mixup": 0, "cutmix": 0, "none": 0}
    half = mixer(mixup=0.3, cutmix=0.3)
    for seed in range(300):
        out_images, out_targets = half(images, labels, seed)
        if out_targets is labels:
            kinds["none"] += 1
        elif (set(out_targets.sum(1).unique().tolist()) <= {0.0, 1.0}
              and ((out_targets == 0) | (out_targets == 1)).all()):
            kinds["cutmix"] += 1
        else:
            kinds["mixup"] += 1
    assert all(60 < count < 140 for count in kinds.values()), kinds


def test_mixing_leaves_the_global_rng_alone():
    images, labels = batch()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    mixer(mixup=0.5, cutmix=0.5, alpha=0.4)(images, labels, 3)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_ratios_follow_beta_alpha_alpha(alpha):
    ratios = beta_ratios(20000, alpha, torch.Generator().manual_seed(0))
    assert 0 <= ratios.min() and ratios.max() <= 1
    assert ratios.mean().item() == pytest.approx(0.5, abs=0.01)
    assert ratios.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.05)  # Beta(a, a): 1 / (4 (2a + 1))


def test_soft_input_targets_mix_too():
    images, labels = batch(n=3, ignored=False)
    leaf_votes = torch.rand(3, 1, 16, 16)
    soft = torch.cat([1 - leaf_votes, leaf_votes], 1)  # a two-class vote map, as the leaf dataset gives
    _, targets = BatchMixer(MixingConfig(mixup=1.0), 2)(images, soft, 5)
    assert torch.allclose(targets.sum(1), torch.ones(()))
