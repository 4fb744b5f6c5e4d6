"""Losses against torch and direct formulas, with both target forms, and the edge cases DDP cares about."""

from __future__ import annotations

import math
import re
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import TypeAdapter
from trained_runs import SegjobLog, tiny_job

from segjob.data.labels import IGNORE_INDEX
from segjob.errors import UserError
from segjob.job.schema import LossConfig
from segjob.learning.losses import (
    LOSSES,
    build_loss,
    count_classes,
    evenly_spaced,
    output_channels,
    weights_from_counts,
)

IGN = IGNORE_INDEX
as_loss = TypeAdapter(LossConfig).validate_python


def loss_of(num_classes: int = 4, train_set=None, **cfg):
    return build_loss(as_loss({"name": "ce", **cfg}), num_classes, train_set)


def random_batch(num_classes: int = 4, ignored: float = 0.2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, num_classes, 9, 11, generator=generator) * 3
    target = torch.randint(0, num_classes, (2, 9, 11), generator=generator)
    target[torch.rand(target.shape, generator=generator) < ignored] = IGNORE_INDEX
    return logits.requires_grad_(), target


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Soft target [N, K, H, W] equal to the labels: one-hot, all zero where ignored."""
    counted = target != IGNORE_INDEX
    hot = F.one_hot(target.masked_fill(~counted, 0), num_classes).permute(0, 3, 1, 2).float()
    return hot * counted.unsqueeze(1)


def soft_batch(num_classes: int = 4, seed: int = 0):
    """Mixup-like probabilities, with some pixels ignored (all zero)."""
    logits, target = random_batch(num_classes, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    probs = torch.softmax(torch.randn(2, num_classes, 9, 11, generator=generator), dim=1)
    return logits, probs * (target != IGNORE_INDEX).unsqueeze(1)


# --- cross-entropy ----------------------------------------------------------------------


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("class_weights", [None, [1.0, 2.0, 0.5, 3.0]])
def test_cross_entropy_matches_torch(class_weights, label_smoothing):
    loss_fn = loss_of(class_weights=class_weights, label_smoothing=label_smoothing)
    logits, target = random_batch()
    weight = None if class_weights is None else torch.tensor(class_weights)
    expected = F.cross_entropy(
        logits, target, weight=weight, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing
    )
    actual = loss_fn(logits, target)
    assert actual.shape == ()
    torch.testing.assert_close(actual, expected)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    (actual_grad,) = torch.autograd.grad(actual, logits)
    torch.testing.assert_close(actual_grad, expected_grad)


WEIGHTS = {"class_weights": [1.0, 2.0, 0.5, 3.0]}
SMOOTHING = {"label_smoothing": 0.1}
SOFTMAX_LOSSES = [("ce", {}), ("ce", WEIGHTS), ("ce", SMOOTHING), ("focal", {}), ("focal", WEIGHTS), ("dice", {}),
                  ("ce+dice", {}), ("ce+dice", {**WEIGHTS, **SMOOTHING}), ("focal+dice", WEIGHTS)]


@pytest.mark.parametrize("name,options", SOFTMAX_LOSSES, ids=lambda v: str(v))
def test_one_hot_soft_targets_give_the_same_loss_as_labels(name, options):
    loss_fn = build_loss(as_loss({"name": name, **options}), 4)
    logits, target = random_batch()
    hard = loss_fn(logits, target)
    soft = loss_fn(logits, one_hot(target, 4))
    torch.testing.assert_close(soft, hard)
    torch.testing.assert_close(torch.autograd.grad(soft, logits)[0], torch.autograd.grad(hard, logits)[0])


def test_soft_cross_entropy_against_the_direct_formula():
    logits, probs = soft_batch()
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0])
    log_p = torch.log_softmax(logits, dim=1)
    w = weights.view(1, -1, 1, 1)
    expected = -(w * probs * log_p).sum() / (w * probs).sum()
    torch.testing.assert_close(loss_of(class_weights=weights.tolist())(logits, probs), expected)
    counted = (probs.sum(1) > 0).sum()
    torch.testing.assert_close(loss_of()(logits, probs), -(probs * log_p).sum() / counted)


def test_class_weights_change_the_loss():
    logits, target = random_batch()
    plain = loss_of()(logits, target)
    weighted = loss_of(class_weights=[1.0, 1.0, 1.0, 10.0])(logits, target)
    assert not torch.isclose(plain, weighted)
    # Only class 0 weighted: the loss is the mean over class-0 pixels alone.
    only_zero = loss_of(class_weights=[1.0, 0.0, 0.0, 0.0])(logits, target)
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[target == 0], target[target == 0])
    torch.testing.assert_close(only_zero, expected)


@pytest.mark.parametrize("name", ["ce", "focal", "dice", "ce+dice", "focal+dice"])
def test_ignored_pixels_count_for_nothing(name):
    loss_fn = build_loss(as_loss({"name": name}), 4)
    logits, target = random_batch()
    changed = logits.detach().clone()
    changed[(target == IGNORE_INDEX).unsqueeze(1).expand_as(changed)] = 100.0  # wild logits where ignored
    torch.testing.assert_close(loss_fn(changed, target), loss_fn(logits, target))
    _, probs = soft_batch()
    torch.testing.assert_close(loss_fn(changed, probs), loss_fn(logits, probs))


# --- focal ------------------------------------------------------------------------------


@pytest.mark.parametrize("class_weights", [None, [1.0, 2.0, 0.5, 3.0]])
def test_focal_at_gamma_0_is_cross_entropy(class_weights):
    logits, target = random_batch()
    _, probs = soft_batch()
    focal = build_loss(as_loss({"name": "focal", "gamma": 0.0, "class_weights": class_weights}), 4)
    ce = loss_of(class_weights=class_weights)
    for t in (target, probs):
        torch.testing.assert_close(focal(logits, t), ce(logits, t))


def test_focal_against_the_direct_formula():
    logits, target = random_batch()
    gamma, weights = 2.0, torch.tensor([0.25, 1.0, 2.0, 0.5])
    counted = target != IGNORE_INDEX
    t = target[counted]
    p = torch.softmax(logits, dim=1).permute(0, 2, 3, 1)[counted]  # [pixels, K]
    p_true = p[torch.arange(len(t)), t]
    expected = (-(weights[t]) * (1 - p_true) ** gamma * torch.log(p_true)).sum() / weights[t].sum()
    focal = build_loss(as_loss({"name": "focal", "gamma": gamma, "class_weights": weights.tolist()}), 4)
    actual = focal(logits, target)
    torch.testing.assert_close(actual, expected)
    assert actual < loss_of(class_weights=weights.tolist())(logits, target)  # easy pixels weigh less


def test_focal_gradient_is_finite_when_a_pixel_is_certain():
    logits = torch.tensor([[[[60.0]], [[-60.0]]]], requires_grad=True)  # p = 1 exactly in float32
    loss = build_loss(as_loss({"name": "focal", "gamma": 0.5}), 2)(logits, torch.tensor([[[0]]]))
    loss.backward()
    assert torch.isfinite(logits.grad).all()


# --- dice -------------------------------------------------------------------------------


def dice_reference(probs: torch.Tensor, target_probs: torch.Tensor, smooth: float) -> torch.Tensor:
    """1 - mean_c (2 sum p t + s) / (sum p + sum t + s) over labelled pixels, straight from the definition."""
    counted = (target_probs.sum(1, keepdim=True) > 0).float()
    p, t = probs * counted, target_probs
    scores = [(2 * (p[:, c] * t[:, c]).sum() + smooth) / (p[:, c].sum() + t[:, c].sum() + smooth)
              for c in range(p.shape[1])]
    return 1 - torch.stack(scores).mean()


@pytest.mark.parametrize("smooth", [1.0, 1e-3])
def test_dice_against_the_direct_formula(smooth):
    logits, target = random_batch()
    dice = build_loss(as_loss({"name": "dice", "smooth": smooth}), 4)
    expected = dice_reference(torch.softmax(logits, 1), one_hot(target, 4), smooth)
    torch.testing.assert_close(dice(logits, target), expected)
    _, probs = soft_batch()
    torch.testing.assert_close(dice(logits, probs), dice_reference(torch.softmax(logits, 1), probs, smooth))


def test_dice_of_a_perfect_prediction_is_zero():
    _, target = random_batch(ignored=0.3)
    perfect = 200.0 * one_hot(target, 4) - 100.0  # softmax gives 1 at the true class, 0 elsewhere
    for name in ("dice", "ce+dice"):
        loss = build_loss(as_loss({"name": name}), 4)(perfect, target)
        assert loss.item() == pytest.approx(0.0, abs=1e-6), name
    # and the worst prediction scores about 1: nothing where the truth is
    worst = -perfect
    dice = build_loss(as_loss({"name": "dice", "smooth": 1e-6}), 4)
    assert dice(worst, target).item() == pytest.approx(1.0, abs=1e-6)


def test_weighted_sums_add_their_terms():
    logits, target = random_batch()
    ce, dice = loss_of()(logits, target), build_loss(as_loss({"name": "dice"}), 4)(logits, target)
    combo = build_loss(as_loss({"name": "ce+dice", "ce_weight": 0.5, "dice_weight": 2.0}), 4)
    torch.testing.assert_close(combo(logits, target), 0.5 * ce + 2.0 * dice)
    focal = build_loss(as_loss({"name": "focal", "gamma": 1.5}), 4)(logits, target)
    combo = build_loss(as_loss({"name": "focal+dice", "gamma": 1.5, "focal_weight": 3.0, "dice_weight": 0.0}), 4)
    torch.testing.assert_close(combo(logits, target), 3.0 * focal)


# --- one-channel binary losses ----------------------------------------------------------


def binary_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 1, 8, 10, generator=generator) * 3).requires_grad_()
    target = torch.randint(0, 2, (3, 8, 10), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.2] = IGNORE_INDEX
    votes = torch.randint(0, 4, target.shape, generator=generator).float() / 3  # expert votes 0, 1/3, 2/3, 1
    soft = torch.stack([1 - votes, votes], dim=1) * (target != IGNORE_INDEX).unsqueeze(1)
    return logits, target, soft


def test_binary_losses_need_one_channel_and_two_classes():
    for name in ("bce", "bce+dice"):
        assert output_channels(as_loss({"name": name}), 2) == 1
        with pytest.raises(UserError, match=rf"loss.name: '{re.escape(name)}' is for two-class data.*3 classes"):
            output_channels(as_loss({"name": name}), 3)
    for name in ("ce", "focal", "dice", "ce+dice", "focal+dice"):
        assert output_channels(as_loss({"name": name}), 2) == 2
        assert output_channels(as_loss({"name": name}), 5) == 5


def test_bce_against_torch_with_hard_and_vote_targets():
    logits, target, soft = binary_batch()
    bce = build_loss(as_loss({"name": "bce"}), 2)
    counted = target != IGNORE_INDEX
    expected = F.binary_cross_entropy_with_logits(logits[:, 0][counted], (target[counted] == 1).float())
    torch.testing.assert_close(bce(logits, target), expected)
    counted = soft.sum(1) > 0
    expected = F.binary_cross_entropy_with_logits(logits[:, 0][counted], soft[:, 1][counted])
    torch.testing.assert_close(bce(logits, soft), expected)


def test_weighted_bce_against_the_direct_formula():
    logits, _, soft = binary_batch()
    w0, w1 = 0.5, 4.0
    bce = build_loss(as_loss({"name": "bce", "class_weights": [w0, w1]}), 2)
    counted = soft.sum(1) > 0
    x, t = logits[:, 0][counted], soft[:, 1][counted]
    s = torch.sigmoid(x)
    expected = -(w1 * t * torch.log(s) + w0 * (1 - t) * torch.log(1 - s)).sum() / (w1 * t + w0 * (1 - t)).sum()
    torch.testing.assert_close(bce(logits, soft), expected)


def test_binary_dice_against_the_direct_formula_and_perfect_prediction():
    logits, target, soft = binary_batch()
    loss = build_loss(as_loss({"name": "bce+dice", "bce_weight": 0.0, "smooth": 1.0}), 2)
    counted = (soft.sum(1) > 0).float()
    p, t = torch.sigmoid(logits[:, 0]) * counted, soft[:, 1]
    torch.testing.assert_close(loss(logits, soft), 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))
    perfect = torch.where(target == 1, 100.0, -100.0).unsqueeze(1)
    assert loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)


def test_bce_plus_dice_adds_its_terms():
    logits, target, _ = binary_batch()
    bce = build_loss(as_loss({"name": "bce"}), 2)(logits, target)
    dice = build_loss(as_loss({"name": "bce+dice", "bce_weight": 0.0}), 2)(logits, target)
    combo = build_loss(as_loss({"name": "bce+dice", "bce_weight": 2.0, "dice_weight": 0.5}), 2)(logits, target)
    torch.testing.assert_close(combo, 2.0 * bce + 0.5 * dice)


def test_a_two_channel_output_is_refused_by_a_binary_loss():
    with pytest.raises(ValueError, match=r"expected logits \[N, 1, H, W\]"):
        build_loss(as_loss({"name": "bce"}), 2)(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))


# --- every loss: degenerate batches, dtypes, devices --------------------------------------

ALL = [({"name": "ce"}, 4), ({"name": "ce", "label_smoothing": 0.1, "class_weights": [1, 2, 0.5, 3]}, 4),
       ({"name": "focal"}, 4), ({"name": "focal", "class_weights": [1, 2, 0.5, 3]}, 4), ({"name": "dice"}, 4),
       ({"name": "ce+dice"}, 4), ({"name": "focal+dice"}, 4), ({"name": "bce"}, 2),
       ({"name": "bce", "class_weights": [1, 3]}, 2), ({"name": "bce+dice"}, 2)]


@pytest.mark.parametrize("cfg,num_classes", ALL, ids=lambda v: str(v))
@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft"])
def test_all_ignored_batch_is_zero_with_a_finite_gradient(cfg, num_classes, soft):
    # Every DDP rank must backpropagate every step; a NaN here would spread to all ranks.
    loss_fn = build_loss(as_loss(cfg), num_classes)
    model = torch.nn.Conv2d(3, output_channels(as_loss(cfg), num_classes), kernel_size=1)
    images = torch.randn(2, 3, 5, 5)
    target = torch.zeros(2, num_classes, 5, 5) if soft else torch.full((2, 5, 5), IGNORE_INDEX)
    loss = loss_fn(model(images), target)
    assert loss.item() == 0.0
    loss.backward()
    for parameter in model.parameters():
        assert parameter.grad is not None
        assert torch.equal(parameter.grad, torch.zeros_like(parameter.grad))


@pytest.mark.parametrize("cfg,num_classes", ALL, ids=lambda v: str(v))
def test_bf16_logits_give_a_float32_loss(cfg, num_classes):
    loss_fn = build_loss(as_loss(cfg), num_classes)
    channels = output_channels(as_loss(cfg), num_classes)
    logits, target = random_batch(num_classes)
    logits = logits[:, :channels]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(logits.bfloat16(), target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_fn(logits.bfloat16().float(), target))


def test_uint8_targets_are_accepted():
    logits, target = random_batch()
    for name in ("ce", "focal", "dice"):
        loss_fn = build_loss(as_loss({"name": name}), 4)
        torch.testing.assert_close(loss_fn(logits, target.to(torch.uint8)), loss_fn(logits, target))


def test_class_weights_follow_the_module_to_a_device():
    loss_fn = loss_of(2, class_weights=[1.0, 2.0])
    assert "class_weights" in dict(loss_fn.named_buffers())
    assert loss_fn.state_dict() == {}  # derived from the job config, nothing to checkpoint
    loss_fn.to(torch.float64)  # e.g. a blanket .to(dtype): the loss still computes in float32
    logits, target = random_batch(num_classes=2)
    assert loss_fn(logits, target).dtype == torch.float32
    combo = build_loss(as_loss({"name": "focal+dice", "class_weights": [1.0, 2.0]}), 2)
    assert combo.state_dict() == {}


def test_mismatched_target_shapes_are_named():
    loss_fn = loss_of()
    with pytest.raises(ValueError, match=r"soft target \[N, K, H, W\] of shape \(2, 3, 9, 11\)"):
        loss_fn(torch.zeros(2, 4, 9, 11), torch.zeros(2, 3, 9, 11))
    with pytest.raises(ValueError, match=r"label target"):
        loss_fn(torch.zeros(2, 4, 9, 11), torch.zeros(2, 9, 10, dtype=torch.long))


# --- configuration and class weights from data --------------------------------------------


def test_wrong_number_of_class_weights_names_the_key_and_both_lengths():
    with pytest.raises(UserError, match=r"loss\.class_weights: 3 weights given but the dataset has 4 classes"):
        loss_of(class_weights=[1.0, 2.0, 3.0])


def test_negative_or_all_zero_weights_are_rejected_by_the_config():
    for weights in ([1.0, -1.0], [0.0, 0.0]):
        with pytest.raises(ValueError, match="weights must be >= 0 and not all 0"):
            as_loss({"name": "ce", "class_weights": weights})
    with pytest.raises(UserError, match="loss.class_weights"):  # a config built without validation
        build_loss(as_loss({"name": "ce"}).model_copy(update={"class_weights": [0.0, 0.0]}), 2)


def test_unknown_loss_lists_the_valid_names():
    assert set(LOSSES) == {"ce", "focal", "dice", "ce+dice", "focal+dice", "bce", "bce+dice"}
    with pytest.raises(UserError, match=r"loss\.name: unknown loss 'focall' \(did you mean 'focal'\?\); valid: bce, "):
        build_loss(types.SimpleNamespace(name="focall"), 4)


def test_the_job_file_names_a_bad_loss_key(tmp_path):
    from segjob.job.load import load_job

    path = tmp_path / "job.yaml"
    path.write_text("loss:\n  name: focal\n  gama: 2\n")
    with pytest.raises(UserError, match=r"loss.gama: unknown key \(did you mean 'gamma'\?\)"):
        load_job(path)
    path.write_text("loss:\n  name: dise\n")
    with pytest.raises(UserError, match=r"loss.name: unknown name 'dise' \(did you mean 'dice'\?\)"):
        load_job(path)
    path.write_text("loss:\n  name: ce\n  class_weights: mean\n")
    with pytest.raises(UserError, match=r"loss.class_weights"):
        load_job(path)


class Masks:
    """A dataset stand-in: (image, target) pairs from given masks."""

    class_names = ["a", "b", "c"]

    def __init__(self, masks):
        self.masks = masks
        self.reads = []

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, index):
        self.reads.append(index)
        return torch.zeros(3, 2, 2), self.masks[index]

    def sample_name(self, index):
        return f"mask-{index}"


def test_inverse_and_median_frequency_weights_by_hand():
    # image 0: 3 a, 1 b; image 1: 2 a, 2 c; image 2: 3 a and 1 ignored pixel (3 counted)
    masks = [torch.tensor([[0, 0], [0, 1]]), torch.tensor([[0, 2], [0, 2]]), torch.tensor([[0, 0], [0, IGN]])]
    class_pixels, present_pixels, samples = count_classes(Masks(masks), 3, max_samples=10)
    assert class_pixels.tolist() == [8, 1, 2] and present_pixels.tolist() == [11, 4, 4] and samples == 3
    inverse = weights_from_counts("inverse", class_pixels, present_pixels)
    assert inverse == pytest.approx([11 / (3 * 8), 11 / (3 * 1), 11 / (3 * 2)])
    # frequencies 8/11, 1/4, 2/4: median 1/2
    median = weights_from_counts("median", class_pixels, present_pixels)
    assert median == pytest.approx([0.5 / (8 / 11), 0.5 / 0.25, 0.5 / 0.5])
    loss_fn = loss_of(3, train_set=Masks(masks), class_weights="median")
    assert loss_fn.class_weights.tolist() == pytest.approx(median)


def test_frequency_weights_from_soft_targets_count_probabilities():
    soft = torch.zeros(3, 2, 2)
    soft[0] = 0.5
    soft[1] = 0.5  # every pixel half a, half b
    class_pixels, present_pixels, _ = count_classes(Masks([soft]), 3, 10)
    assert class_pixels.tolist() == [2.0, 2.0, 0.0] and present_pixels.tolist() == [4.0, 4.0, 0.0]


def test_a_class_never_seen_gets_the_largest_weight():
    data = Masks([torch.tensor([[0, 0], [0, 1]])])
    with SegjobLog() as log:
        loss_fn = loss_of(3, train_set=data, class_weights="inverse")
    weights = loss_fn.class_weights.tolist()
    assert weights[2] == max(weights[:2]) == pytest.approx(4 / 3)
    assert "loss.class_weights=inverse from 1 training samples" in log.text
    assert "no pixel of c" in log.text


def test_frequency_counting_reads_a_capped_evenly_spaced_sample():
    assert evenly_spaced(5, 10) == [0, 1, 2, 3, 4]
    assert evenly_spaced(101, 5) == [0, 25, 50, 75, 100]
    data = Masks([torch.tensor([[0, 1]])] * 50)
    loss_of(2, train_set=data, class_weights="inverse", frequency_samples=7)
    assert data.reads == evenly_spaced(50, 7) and len(data.reads) == 7


def test_frequency_weights_need_the_training_set_and_valid_labels():
    with pytest.raises(ValueError, match="computed from the training set"):
        loss_of(3, class_weights="median")
    with pytest.raises(UserError, match=r"training sample 'mask-1': label 5 is outside 0..2"):
        loss_of(3, train_set=Masks([torch.tensor([[0]]), torch.tensor([[5]])]), class_weights="inverse")
    with pytest.raises(UserError, match="no labelled pixel"):
        loss_of(3, train_set=Masks([torch.tensor([[IGN]])]), class_weights="inverse")


def test_frequency_weights_on_synthetic_data_are_identical_each_time():
    from segjob.data import build_datasets
    from segjob.job.schema import SyntheticData

    train, _ = build_datasets(SyntheticData(num_classes=3, train_samples=12, val_samples=2, image_size=32), seed=1)
    first = loss_of(3, train_set=train, class_weights="median").class_weights
    train_again, _ = build_datasets(SyntheticData(num_classes=3, train_samples=12, val_samples=2, image_size=32),
                                    seed=1)
    assert torch.equal(first, loss_of(3, train_set=train_again, class_weights="median").class_weights)
    assert first[0] < first[1] and first[0] < first[2]  # the background is the common class
    assert np.isfinite(first.numpy()).all() and not math.isnan(float(first.sum()))


def test_the_engine_trains_with_weights_from_the_data_and_a_warmup(tmp_path):
    from segjob.engine import loop
    from segjob.engine.session import LocalSession

    job = tiny_job("weighted", tmp_path,
                   loss={"name": "focal+dice", "class_weights": "median", "frequency_samples": 16},
                   optim={"name": "sgd", "lr": 0.05, "nesterov": True,
                          "schedule": {"name": "poly", "warmup_steps": 2}},
                   train={"epochs": 1, "batch_size": 8, "max_steps_per_epoch": 3, "log_every_steps": 1})
    with SegjobLog() as log:
        metrics = loop.run(job, LocalSession("cpu"))
    assert "loss.class_weights=median from 16 training samples" in log.text
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    assert metrics["lr"] == 0.0  # 3 steps: 2 of warmup, then poly over the last one, down to 0
