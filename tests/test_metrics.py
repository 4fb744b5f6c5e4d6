"""The confusion matrix and every figure derived from it, against hand-computed values."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segjob.data.labels import IGNORE_INDEX
from segjob.learning.metrics import (
    ConfusionMatrix,
    ImageScores,
    assd,
    assd_per_class,
    per_image_confusion,
    predict_labels,
)

IGN = IGNORE_INDEX


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
    assert stats["mean_acc"] == pytest.approx(3 / 4)
    # Dice = 2TP / (|gt| + |pred|): class 0: 2/(2+1), class 1: 4/(2+3)
    torch.testing.assert_close(stats["dice"], torch.tensor([2 / 3, 4 / 5], dtype=torch.float64))
    assert stats["mean_dice"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_three_classes_with_ignored_pixels_and_an_absent_class():
    # Class 2 appears nowhere that counts: only as predictions on ignored pixels.
    target = [[[0, 0, 1, IGN], [1, 1, IGN, 0]]]
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
    assert stats["mean_acc"] == pytest.approx(2 / 3)
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
    """IoU, Dice, class accuracy and pixel accuracy straight from the definitions, one class at a time."""
    counted = target != IGNORE_INDEX
    iou, dice, accuracy = [], [], []
    for c in range(num_classes):
        tp = np.sum(counted & (target == c) & (prediction == c))
        fp = np.sum(counted & (target != c) & (prediction == c))
        fn = np.sum(counted & (target == c) & (prediction != c))
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else np.nan)
        dice.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else np.nan)
        accuracy.append(tp / (tp + fn) if tp + fn else np.nan)
    pixel_acc = np.sum(counted & (target == prediction)) / np.sum(counted)
    return np.array(iou), np.array(dice), np.array(accuracy), pixel_acc


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

    iou, dice, accuracy, pixel_acc = reference_scores(num_classes, target, prediction)
    stats = confusion.compute()
    np.testing.assert_allclose(stats["class_acc"].numpy(), accuracy)
    assert stats["mean_acc"] == pytest.approx(np.nanmean(accuracy))
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
        "val/mean_acc",
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
        confusion.update(torch.tensor([[0, bad, IGN]]), torch.tensor([[0, 1, 2]]))
    assert confusion.mat.sum() == 0  # nothing half-counted


def test_out_of_range_prediction_is_an_error_unless_ignored():
    confusion = ConfusionMatrix(3)
    confusion.update(torch.tensor([[0, IGN]]), torch.tensor([[0, 9]]))  # 9 sits on an ignored pixel
    assert confusion.mat.sum() == 1
    with pytest.raises(ValueError, match="predicted label 9"):
        confusion.update(torch.tensor([[0, 1]]), torch.tensor([[0, 9]]))


def test_shape_and_dtype_mistakes():
    confusion = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        confusion.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="predict_labels"):
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


# --- prediction -------------------------------------------------------------------------


def test_predict_labels_argmax_or_threshold():
    logits = torch.tensor([[[[0.0, 2.0]], [[1.0, -1.0]]]])  # [1, 2, 1, 2]
    assert predict_labels(logits).tolist() == [[[1, 0]]]
    binary = torch.tensor([[[[-1.0, 0.1, 2.0]]]])  # sigmoid: 0.27, 0.52, 0.88
    assert predict_labels(binary).tolist() == [[[0, 1, 1]]]
    assert predict_labels(binary, threshold=0.6).tolist() == [[[0, 0, 1]]]
    assert predict_labels(binary).dtype == torch.int64


# --- per image --------------------------------------------------------------------------


def test_per_image_confusion_matches_one_matrix_per_image():
    rng = np.random.default_rng(3)
    target = rng.integers(0, 4, size=(5, 7, 9))
    target[rng.random(target.shape) < 0.2] = IGNORE_INDEX
    target[2] = IGNORE_INDEX  # an image with nothing labelled
    prediction = rng.integers(0, 4, size=(5, 7, 9))
    batched = per_image_confusion(torch.from_numpy(target), torch.from_numpy(prediction), 4)
    assert batched.shape == (5, 4, 4) and batched.dtype == torch.int64
    for i in range(5):
        assert torch.equal(batched[i], confusion_of(4, target[i], prediction[i]).mat)
    assert batched[2].sum() == 0


def test_image_scores_by_hand_including_an_empty_mask():
    scores = ImageScores(3, with_assd=False)
    # image 7: perfect on classes 0 and 1; image 3: everything ignored; image 5: half right
    scores.update([7, 3], torch.tensor([[[0, 1]], [[IGN, IGN]]]), torch.tensor([[[0, 1]], [[2, 2]]]))
    scores.update([5], torch.tensor([[[0, 0]]]), torch.tensor([[[0, 2]]]))
    scores.gather()  # single process: sorts by index
    assert scores.indices.tolist() == [3, 5, 7]
    table = scores.scores()
    assert all(math.isnan(v) for v in table["miou"][:1])  # the empty image has no score at all
    assert math.isnan(table["pixel_acc"][0])
    assert table["pixel_acc"][1:].tolist() == [0.5, 1.0]
    assert table["iou"][1][0] == 0.5 and table["iou"][1][2] == 0.0 and math.isnan(table["iou"][1][1])
    assert table["miou"][1] == pytest.approx(0.25)  # (1/2 + 0) / 2: class 1 absent from both
    assert table["miou"][2] == 1.0 and table["mean_dice"][2] == 1.0 and table["mean_acc"][2] == 1.0
    total = scores.total_confusion()
    assert total.mat.tolist() == [[2, 0, 1], [0, 1, 0], [0, 0, 0]]
    with pytest.raises(RuntimeError, match=r"missing \[0, 1, 2, 4, 6\]"):
        scores.check_complete(8)


def test_check_complete_names_duplicates_and_missing_samples():
    scores = ImageScores(2, with_assd=False)
    scores.update([0, 1], torch.zeros(2, 1, 1, dtype=torch.long), torch.zeros(2, 1, 1, dtype=torch.long))
    scores.check_complete(2)
    scores.update([1], torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, dtype=torch.long))
    with pytest.raises(RuntimeError,
                       match=r"scored 3 images for a dataset of 3: counted more than once \[1\], missing \[2\]"):
        scores.check_complete(3)


# --- ASSD -------------------------------------------------------------------------------


def square(size: int, half: int, centre=(20, 20)) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[centre[0] - half: centre[0] + half + 1, centre[1] - half: centre[1] + half + 1] = True
    return mask


@pytest.mark.parametrize("outer,inner", [(10, 6), (12, 3), (5, 4)])
def test_assd_of_two_concentric_squares(outer, inner):
    """Inner square's surface (8*inner pixels, Chebyshev radius `inner`) is `outer - inner` from
    the outer surface everywhere; an outer surface pixel (x, y) is at the Euclidean distance
    from the filled inner square, sqrt(max(|x|-inner, 0)^2 + max(|y|-inner, 0)^2)."""
    target, prediction = square(41, outer), square(41, inner)
    inner_sum = 8 * inner * (outer - inner)
    ring = [(x, y) for x in range(-outer, outer + 1) for y in range(-outer, outer + 1) if max(abs(x), abs(y)) == outer]
    assert len(ring) == 8 * outer
    outer_sum = sum(math.hypot(max(abs(x) - inner, 0), max(abs(y) - inner, 0)) for x, y in ring)
    expected = (inner_sum + outer_sum) / (8 * inner + 8 * outer)
    assert assd(prediction, target) == pytest.approx(expected)
    assert assd(target, prediction) == pytest.approx(expected)  # symmetric


def test_assd_of_single_pixels_and_identical_masks():
    a, b = np.zeros((9, 9), bool), np.zeros((9, 9), bool)
    a[1, 1], b[4, 5] = True, True  # 3 down, 4 across
    assert assd(a, b) == pytest.approx(5.0)
    assert assd(a, a) == 0.0
    whole = np.ones((6, 8), bool)  # the image edge is the surface of a mask that fills it
    assert assd(whole, whole) == 0.0


def test_assd_convention_for_empty_masks():
    empty, something = np.zeros((30, 40), bool), np.zeros((30, 40), bool)
    something[5:9, 20:30] = True
    assert math.isnan(assd(empty, empty))
    assert assd(empty, something) == pytest.approx(50.0)  # the diagonal of a 30 x 40 image
    assert assd(something, empty) == pytest.approx(50.0)


def brute_force_assd(prediction: np.ndarray, target: np.ndarray) -> float:
    """All pairs of surface pixels; surface = what a 4-connected erosion (outside the image empty) removes."""
    from scipy import ndimage

    def surface(mask):
        eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), border_value=0)
        return np.argwhere(mask & ~eroded)

    p, t = surface(prediction), surface(target)
    distances = np.sqrt(((p[:, None, :] - t[None, :, :]) ** 2).sum(-1))
    return (distances.min(1).sum() + distances.min(0).sum()) / (len(p) + len(t))


@pytest.mark.parametrize("seed", range(4))
def test_assd_matches_brute_force_on_random_blobs(seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    blobs = ndimage.gaussian_filter(rng.random((2, 48, 40)), sigma=(0, 3, 3)) > 0.5
    prediction, target = blobs[0], blobs[1]
    if not (prediction.any() and target.any()):
        pytest.skip("a blob came out empty")
    assert assd(prediction, target) == pytest.approx(brute_force_assd(prediction, target))


def test_assd_per_class_leaves_predictions_on_ignored_pixels_out():
    target = np.full((20, 20), IGN)
    target[5:15, 5:15] = 1
    target[:, :2] = 0
    prediction = np.ones((20, 20), dtype=np.int64)  # class 1 everywhere, also where ignored
    prediction[:, :2] = 0
    per_class = assd_per_class(target, prediction, 3)
    assert per_class[0] == 0.0 and per_class[1] == 0.0  # what was predicted on ignored pixels doesn't count
    assert math.isnan(per_class[2])


def test_image_scores_carry_assd_per_class():
    target = torch.zeros(2, 41, 41, dtype=torch.long)
    prediction = torch.zeros(2, 41, 41, dtype=torch.long)
    target[0] = torch.from_numpy(square(41, 10)).long()
    prediction[0] = torch.from_numpy(square(41, 6)).long()
    target[1, 3:6, 3:6] = 1  # image 1: the object is missed entirely
    scores = ImageScores(2)
    scores.update([0, 1], target, prediction)
    table = scores.scores()
    assert table["assd"][0, 1] == pytest.approx(assd(square(41, 6), square(41, 10)))
    assert table["assd"][1, 1] == pytest.approx(math.hypot(41, 41))
    assert table["mean_assd"][0] == pytest.approx(np.mean(table["assd"][0]))


# --- distributed per-image gathering ----------------------------------------------------


def _gather_worker(rank: int, world_size: int, folder: str, duplicate: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world_size)
    try:
        scores = ImageScores(2)
        # rank 0 scores samples 0 and 2, rank 1 sample 1 (and, when duplicating, sample 0 again)
        indices = [0, 2] if rank == 0 else ([1, 0] if duplicate else [1])
        target = torch.tensor([[[i % 2, 1]] for i in indices])
        scores.update(indices, target, torch.ones_like(target))
        scores.gather()
        try:
            scores.check_complete(3)
            complete = "complete"
        except RuntimeError as error:
            complete = str(error)
        torch.save({"indices": scores.indices, "confusions": scores.confusions, "complete": complete},
                   f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("duplicate", [False, True])
def test_image_scores_gather_across_ranks(tmp_path, duplicate):
    ranks = mp.start_processes(_gather_worker, args=(2, str(tmp_path), duplicate), nprocs=2, join=False,
                               start_method="fork")
    deadline = time.monotonic() + 60
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two gloo ranks did not finish within 60 s")
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for result in results:
        if duplicate:
            assert result["indices"].tolist() == [0, 0, 1, 2]
            assert "counted more than once [0]" in result["complete"]
        else:
            assert result["indices"].tolist() == [0, 1, 2] and result["complete"] == "complete"
            # sample i's target is [i % 2, 1], predicted [1, 1]
            assert result["confusions"].tolist() == [[[0, 1], [0, 1]], [[0, 0], [0, 2]], [[0, 1], [0, 1]]]


def test_ties_go_to_the_first_class_and_empty_batches_count_nothing():
    logits = torch.tensor([[[[1.0]], [[1.0]], [[0.5]]]])  # classes 0 and 1 tie
    assert predict_labels(logits).tolist() == [[[0]]]
    confusion = ConfusionMatrix(3)
    confusion.update(torch.zeros(0, 4, 4, dtype=torch.long), torch.zeros(0, 4, 4, dtype=torch.long))
    assert confusion.mat.sum() == 0
    empty = torch.zeros(0, 4, 4, dtype=torch.long)
    assert per_image_confusion(empty, empty, 3).shape == (0, 3, 3)
