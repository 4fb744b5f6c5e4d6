"""Losses against torch's own cross-entropy, and the edge cases DDP cares about."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from segjob.config import LossConfig
from segjob.constants import IGNORE_INDEX
from segjob.errors import UserError
from segjob.losses import LOSSES, build_loss


def random_batch(num_classes: int = 4, ignored: float = 0.2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, num_classes, 9, 11, generator=generator) * 3
    target = torch.randint(0, num_classes, (2, 9, 11), generator=generator)
    target[torch.rand(target.shape, generator=generator) < ignored] = IGNORE_INDEX
    return logits.requires_grad_(), target


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("class_weights", [None, [1.0, 2.0, 0.5, 3.0]])
def test_cross_entropy_matches_torch(class_weights, label_smoothing):
    loss_fn = build_loss(LossConfig(class_weights=class_weights, label_smoothing=label_smoothing), num_classes=4)
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


def test_class_weights_change_the_loss():
    logits, target = random_batch()
    plain = build_loss(LossConfig(), 4)(logits, target)
    weighted = build_loss(LossConfig(class_weights=[1.0, 1.0, 1.0, 10.0]), 4)(logits, target)
    assert not torch.isclose(plain, weighted)
    # Only class 0 weighted: the loss is the mean over class-0 pixels alone.
    only_zero = build_loss(LossConfig(class_weights=[1.0, 0.0, 0.0, 0.0]), 4)(logits, target)
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[target == 0], target[target == 0])
    torch.testing.assert_close(only_zero, expected)


def test_ignored_pixels_count_for_nothing():
    logits, target = random_batch()
    loss_fn = build_loss(LossConfig(), 4)
    changed = logits.detach().clone()
    changed[(target == IGNORE_INDEX).unsqueeze(1).expand_as(changed)] = 100.0  # wild logits where ignored
    torch.testing.assert_close(loss_fn(changed, target), loss_fn(logits, target))


def test_wrong_number_of_class_weights_names_the_key_and_both_lengths():
    with pytest.raises(UserError, match=r"loss\.class_weights: 3 weights given but the dataset has 4 classes"):
        build_loss(LossConfig(class_weights=[1.0, 2.0, 3.0]), num_classes=4)


def test_negative_or_all_zero_weights_are_user_errors():
    with pytest.raises(UserError, match="loss.class_weights"):
        build_loss(LossConfig(class_weights=[1.0, -1.0]), num_classes=2)
    with pytest.raises(UserError, match="loss.class_weights"):
        build_loss(LossConfig(class_weights=[0.0, 0.0]), num_classes=2)


@pytest.mark.parametrize("class_weights", [None, [1.0, 2.0, 0.5, 3.0]])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_all_ignored_batch_is_zero_with_a_finite_gradient(class_weights, label_smoothing):
    # Every DDP rank must backpropagate every step; a NaN here would spread to all ranks.
    loss_fn = build_loss(LossConfig(class_weights=class_weights, label_smoothing=label_smoothing), 4)
    model = torch.nn.Conv2d(3, 4, kernel_size=1)
    images = torch.randn(2, 3, 5, 5)
    target = torch.full((2, 5, 5), IGNORE_INDEX)
    loss = loss_fn(model(images), target)
    assert loss.item() == 0.0
    loss.backward()
    for parameter in model.parameters():
        assert parameter.grad is not None
        assert torch.equal(parameter.grad, torch.zeros_like(parameter.grad))


def test_bf16_logits_give_a_float32_loss():
    logits, target = random_batch()
    loss_fn = build_loss(LossConfig(), 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(logits.bfloat16(), target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_fn(logits.bfloat16().float(), target))


def test_uint8_targets_are_accepted():
    logits, target = random_batch()
    loss_fn = build_loss(LossConfig(), 4)
    torch.testing.assert_close(loss_fn(logits, target.to(torch.uint8)), loss_fn(logits, target))


def test_class_weights_follow_the_module_to_a_device():
    loss_fn = build_loss(LossConfig(class_weights=[1.0, 2.0]), 2)
    assert "class_weights" in dict(loss_fn.named_buffers())
    assert loss_fn.state_dict() == {}  # derived from the job config, nothing to checkpoint
    loss_fn.to(torch.float64)  # e.g. a blanket .to(dtype): the loss still computes in float32
    logits, target = random_batch(num_classes=2)
    assert loss_fn(logits, target).dtype == torch.float32


def test_unknown_loss_lists_the_valid_names():
    assert "ce" in LOSSES
    with pytest.raises(UserError, match=r"loss\.name: unknown loss 'focal'; valid: ce"):
        build_loss(types.SimpleNamespace(name="focal"), 4)
