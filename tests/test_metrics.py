"""The confusion matrix and every figure derived from it, against hand-computed values."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segjob.constants import IGNORE_INDEX
from segjob.metrics import ConfusionMatrix

I = IGNORE_INDEX


def confusion_of(num_classes: int, target, prediction) -> ConfusionMatrix:
    confusion = ConfusionMatrix(num_classes)
    confusion.update(torch.tensor(target), torch.tensor(prediction))
    return confusion


def test_two_classes_by_hand():
    # ground truth 0 0 1 1, predicted 0 1 1 1: one 0 taken for a 1.
    confusion = confusion_of(2, [[[0, 0, 1, 1]]], [[[0, 1, 1, 1]]])
    assert confusion.mat.tolist() == [[1, 1], [0, 2]]
    assert confusion.mat.dtype == torch.int64
    stats = confusion.compute()
    torch.testing.assert_close(stats["iou"], torch.tensor([1 / 2, 2 / 3], dtype=torch.float64))
    assert stats["miou"] == pytest.approx(7 / 12)
    assert stats["pixel_acc"] == pytest.approx(3 / 4)
    torch.testing.assert_close(stats["class_acc"], torch.tensor([1 / 2, 1.0], dtype=torch.float64))
    # Dice = 2TP / (|gt| + |pred|): class 0: 2/(2+1), class 1: 4/(2+3)
    torch.testing.assert_close(stats["dice"], torch.tensor([2 / 3, 4 / 5], dtype=torch.float64))
    assert stats["mean_dice"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_three_classes_with_ignored_pixels_and_an_absent_class():
    # Class 2 appears nowhere that counts: only as predictions on ignored pixels.
    target = [[[0, 0, 1, I], [1, 1, I, 0]]]
    prediction = [[[0, 1, 1, 2], [1, 0, 2, 0]]]
    confusion = confusion_of(3, target, prediction)
    assert confusion.mat.tolist() == [[2, 1, 0], [1, 2, 0], [0, 0, 0]]
    stats = confusion.compute()
    assert stats["iou"][:2].tolist() == pytest.approx([0.5, 0.5])  # 2 / (3 + 3 - 2)
    assert math.isnan(stats["iou"][2])
    assert stats["miou"] == pytest.approx(0.5)  # the absent class doesn't drag the mean to 1/3
    assert stats["pixel_acc"] == pytest.approx(4 / 6)
    assert stats["class_acc"][:2].tolist() == pytest.approx([2 / 3, 2 / 3])
    assert math.isnan(stats["class_acc"][2])
    assert stats["dice"][:2].tolist() == pytest.approx([2 / 3, 2 / 3])
    assert math.isnan(stats["dice"][2])
    assert stats["mean_dice"] == pytest.approx(2 / 3)


def test_a_class_only_predicted_scores_zero_not_nan():
    confusion = confusion_of(3, [[0, 0, 0, 0]], [[0, 0, 1, 1]])
    stats = confusion.compute()
    assert stats["iou"][1] == 0.0 and stats["dice"][1] == 0.0
    assert math.isnan(stats["class_acc"][1])  # no ground-truth pixels to be right about
    assert math.isnan(stats["iou"][2])
    assert stats["miou"] == pytest.approx((0.5 + 0.0) / 2)


def reference_scores(num_classes: int, target: np.ndarray, prediction: np.ndarray):
    """IoU, Dice and pixel accuracy straight from the definitions, one class at a time."""
    counted = target != IGNORE_INDEX
    iou, dice = [], []
    for c in range(num_classes):
        tp = np.sum(counted & (target == c) & (prediction == c))
        fp = np.sum(counted & (target != c) & (prediction == c))
        fn = np.sum(counted & (target == c) & (prediction != c))
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else np.nan)
        dice.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else np.nan)
    pixel_acc = np.sum(counted & (target == prediction)) / np.sum(counted)
    return np.array(iou), np.array(dice), pixel_acc


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_batches_match_an_independent_formulation(seed):
    rng = np.random.default_rng(seed)
    num_classes = 6
    batches = []
    confusion = ConfusionMatrix(num_classes)
    for _ in range(3):  # several updates accumulate
        target = rng.integers(0, num_classes - 1, size=(2, 17, 23))  # the last class never occurs in truth
        target[rng.random(target.shape) < 0.2] = IGNORE_INDEX
        prediction = rng.integers(0, num_classes - 2, size=(2, 17, 23))  # ... nor in predictions: absent
        batches.append((target, prediction))
        confusion.update(torch.from_numpy(target).to(torch.uint8), torch.from_numpy(prediction))
    target = np.concatenate([t for t, _ in batches])
    prediction = np.concatenate([p for _, p in batches])

    iou, dice, pixel_acc = reference_scores(num_classes, target, prediction)
    stats = confusion.compute()
    np.testing.assert_allclose(stats["iou"].numpy(), iou)  # nan compares equal to nan here
    np.testing.assert_allclose(stats["dice"].numpy(), dice)
    assert np.isnan(iou[-1])
    assert stats["miou"] == pytest.approx(np.nanmean(iou))
    assert stats["mean_dice"] == pytest.approx(np.nanmean(dice))
    assert stats["pixel_acc"] == pytest.approx(pixel_acc)
    assert confusion.mat.sum() == np.sum(target != IGNORE_INDEX)


def test_summary_names():
    confusion = confusion_of(3, [[[0, 1, 1, 2]]], [[[0, 1, 2, 2]]])
    summary = confusion.summary(["background", "pet", "border"])
    assert set(summary) == {
        "val/miou",
        "val/pixel_acc",
        "val/dice",
        "val/iou/background",
        "val/iou/pet",
        "val/iou/border",
        "val/dice/background",
        "val/dice/pet",
        "val/dice/border",
    }
    assert all(type(value) is float for value in summary.values())
    assert summary["val/pixel_acc"] == pytest.approx(3 / 4)
    assert summary["val/iou/pet"] == pytest.approx(1 / 2)
    assert set(confusion.summary(["a", "b", "c"], prefix="train")) >= {"train/miou", "train/iou/a"}
    with pytest.raises(ValueError, match="2 class names"):
        confusion.summary(["a", "b"])


def test_summary_keeps_an_absent_class_as_nan():
    summary = confusion_of(3, [[0, 1]], [[0, 1]]).summary(["a", "b", "c"])
    assert math.isnan(summary["val/iou/c"]) and math.isnan(summary["val/dice/c"])
    assert summary["val/miou"] == 1.0


@pytest.mark.parametrize("bad", [3, 7, -1])
def test_out_of_range_target_names_the_value(bad):
    confusion = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=f"target label {bad} "):
        confusion.update(torch.tensor([[0, bad, I]]), torch.tensor([[0, 1, 2]]))
    assert confusion.mat.sum() == 0  # nothing half-counted


def test_out_of_range_prediction_is_an_error_unless_ignored():
    confusion = ConfusionMatrix(3)
    confusion.update(torch.tensor([[0, I]]), torch.tensor([[0, 9]]))  # 9 sits on an ignored pixel
    assert confusion.mat.sum() == 1
    with pytest.raises(ValueError, match="predicted label 9"):
        confusion.update(torch.tensor([[0, 1]]), torch.tensor([[0, 9]]))


def test_shape_and_dtype_mistakes():
    confusion = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        confusion.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="argmax"):
        confusion.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="ignore_index"):
        ConfusionMatrix(3, ignore_index=1)


def test_reset_and_empty_matrix():
    confusion = confusion_of(2, [[0, 1]], [[0, 1]])
    confusion.reset()
    assert confusion.mat.sum() == 0
    stats = confusion.compute()  # nothing counted: every figure is undefined, nothing raises
    assert math.isnan(stats["miou"]) and math.isnan(stats["pixel_acc"])


def test_all_reduce_without_distributed_is_a_no_op():
    assert not dist.is_initialized()
    confusion = confusion_of(2, [[0, 1]], [[0, 0]])
    confusion.all_reduce()
    assert confusion.mat.tolist() == [[1, 0], [1, 0]]


def _all_reduce_worker(rank: int, world_size: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world_size)
    try:
        confusion = ConfusionMatrix(3)
        # rank 0 sees one correct pixel of class 0, rank 1 two pixels of class 2 taken for 1.
        target, prediction = ([[0]], [[0]]) if rank == 0 else ([[2, 2]], [[1, 1]])
        confusion.update(torch.tensor(target), torch.tensor(prediction))
        confusion.all_reduce()
        torch.save(confusion.mat, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_over_ranks(tmp_path):
    # fork, not spawn: a fresh interpreter per rank would spend seconds importing torch.
    ranks = mp.start_processes(_all_reduce_worker, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 60
    while not ranks.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two gloo ranks did not finish within 60 s")
    expected = [[1, 0, 0], [0, 0, 0], [0, 2, 0]]
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt").tolist() == expected
