"""Scoring as papers count it: the label's own grid, sliding windows, test-time augmentation, crop mode.

Hand-made data where counting on the model's input and on the label file differ; models whose
answers are known (1x1 convolutions: translation- and flip-equivariant) to prove the sliding
window and the flips exact; tiny runs (no Ray) to prove the engine and `evaluate` count the same
way and say so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import ValidationError
from torchvision import tv_tensors
from trained_runs import train

from segjob.data import build_datasets
from segjob.data.labels import IGNORE_INDEX
from segjob.data.scoring import ScoringView
from segjob.data.transforms import build_transform, padding_fill
from segjob.engine.evaluation import Scorer
from segjob.engine.inference import Predictor, Protocol, blend_weights, window_starts
from segjob.evaluate import main as evaluate_main
from segjob.job.schema import FolderData, SyntheticData
from segjob.learning.metrics import ConfusionMatrix
from segjob.results.evaluation import evaluate
from segjob.results.trained import load_trained

HEIGHT, WIDTH = 30, 40  # the label files' grid; the job's scale is 16 x 16 (squash)


def thin_lines(root: Path, count: int = 4) -> None:
    """Images whose class-1 pixels are 1-pixel lines: resizing the label to 16 x 16 keeps or drops them."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
        mask[:, 7 + 5 * index] = 1
        mask[4 + 3 * index, :] = 1
        image = (rng.random((HEIGHT, WIDTH, 3)) * 60).astype(np.uint8)
        image[mask == 1] = (230, 40, 40)
        Image.fromarray(image).save(root / "images" / f"s{index}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{index}.png")


@pytest.fixture(scope="module")
def lines_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lines")
    thin_lines(root)
    data = {"name": "folder", "root": str(root), "classes": ["background", "line"], "val_fraction": 0.5,
            "image_size": 16, "resize": "squash", "loader_workers": 0}
    return train("lines", tmp_path_factory, "tiny-lines", data=data,
                 optim={"name": "adam", "lr": 1e-9}, train={"epochs": 1, "batch_size": 2})


def confusion(pairs) -> ConfusionMatrix:
    matrix = ConfusionMatrix(2)
    for target, predicted in pairs:
        matrix.update(target, predicted)
    return matrix


def test_the_engine_counts_the_label_files_pixels_not_the_resized_ones(lines_run):
    trained = load_trained(str(lines_run.checkpoint_dir), data_root=str(lines_run.job.data.root), device="cpu")
    _, val_set = trained.datasets
    original, resized = [], []
    with torch.no_grad():
        for index in range(len(val_set)):
            image, resized_target = val_set[index]  # the evaluation transform: image and mask at 16 x 16
            with Image.open(val_set.label_path(val_set.sample_name(index))) as file:
                label = torch.from_numpy(np.array(file)).long()[None]
            logits = trained.model(image[None])
            upsampled = F.interpolate(logits, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)
            original.append((label, upsampled.argmax(1)))
            resized.append((resized_target[None], logits.argmax(1)))
    at_original, at_input = confusion(original).compute()["miou"], confusion(resized).compute()["miou"]
    assert abs(at_original - at_input) > 1e-3  # the case is one where the two counts differ
    assert lines_run.metrics["val/miou"] == pytest.approx(at_original)

    # evaluate counts the same by default, and the old way on request
    assert evaluate(trained, progress=False).summary()["val/miou"] == pytest.approx(at_original)
    old_way = evaluate(trained, progress=False, protocol=Protocol(grid="input")).summary()["val/miou"]
    assert old_way == pytest.approx(at_input)
    meta = json.loads((lines_run.checkpoint_dir / "meta.json").read_text())
    assert meta["scoring"]["grid"] == "original" and meta["scoring"]["inference"] == {"mode": "whole image"}


def test_scoring_samples_keep_the_label_file_s_grid(lines_run):
    cfg = lines_run.job.data
    _, val_set = build_datasets(cfg, seed=0)
    view = ScoringView(val_set, cfg)
    index, image, target = view[0]
    assert index == 0 and image.shape == (3, 16, 16) and target.shape == (HEIGHT, WIDTH)
    with Image.open(val_set.label_path(val_set.sample_name(0))) as file:
        assert torch.equal(target, torch.from_numpy(np.array(file)).long())
    fitted = FolderData(**{**cfg.model_dump(), "resize": "fit"})
    _, image, _ = ScoringView(build_datasets(fitted, seed=0)[1], fitted)[0]
    assert image.shape == (3, 12, 16)  # the longer side at the job's scale, unpadded: the inference pads


def one_by_one(in_channels: int = 3, classes: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Conv2d(in_channels, classes, kernel_size=1).eval()


class Recording(torch.nn.Module):
    """A model that notes the input shapes it was given."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.shapes = model, []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.model(x)


@pytest.mark.parametrize("blend", ["gaussian", "uniform"])
@pytest.mark.parametrize(("rows", "cols", "window", "overlap"),
                         [(50, 70, 24, 0.5), (37, 61, 16, 0.25), (40, 40, 20, 0.0), (12, 30, 16, 0.5)])
def test_sliding_windows_give_the_whole_image_s_logits_for_a_1x1_conv(blend, rows, cols, window, overlap):
    model = Recording(one_by_one())
    image = torch.randn(3, rows, cols, generator=torch.Generator().manual_seed(1))
    fill = torch.tensor([-2.0, -1.0, 0.5])
    whole = Predictor(model, Protocol(), fill, torch.device("cpu"))([image], [(rows, cols)])[0]
    model.shapes.clear()
    protocol = Protocol(window=window, overlap=overlap, blend=blend)
    sliding = Predictor(model, protocol, fill, torch.device("cpu"), window_batch=3)([image], [(rows, cols)])[0]
    assert sliding.shape == whole.shape == (4, rows, cols)
    torch.testing.assert_close(sliding, whole, atol=1e-5, rtol=1e-5)
    assert {shape[1:] for shape in model.shapes} == {(3, window, window)}  # every window at the training crop size
    windows = len(window_starts(max(rows, window), window, protocol.stride))
    windows *= len(window_starts(max(cols, window), window, protocol.stride))
    assert sum(shape[0] for shape in model.shapes) == windows > (1 if rows > window else 0)


def test_window_places_cover_the_image_and_gaussian_weights_favour_the_centre():
    assert window_starts(50, 24, 12) == [0, 12, 24, 26]
    assert window_starts(24, 24, 12) == [0]
    weights = blend_weights(24, "gaussian", torch.device("cpu"))
    assert weights.min() > 0 and weights[11:13, 11:13].min() > 0.95 and weights[0, 0] < 0.01
    assert torch.equal(blend_weights(8, "uniform", torch.device("cpu")), torch.ones(8, 8))


def test_the_whole_image_is_padded_to_a_square_with_the_normalised_black_pixel():
    seen = []
    model = Recording(torch.nn.Identity())
    model.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].clone()))
    fill = padding_fill(SyntheticData(), 3)
    image = torch.randn(3, 10, 16)
    out = Predictor(model, Protocol(), fill, torch.device("cpu"))([image], [(20, 32)])[0]
    assert seen[0].shape == (1, 3, 16, 16)
    assert torch.equal(seen[0][0, :, :10], image)
    assert torch.equal(seen[0][0, :, 10:], fill.view(3, 1, 1).expand(3, 6, 16))
    torch.testing.assert_close(out, F.interpolate(image[None], size=(20, 32), mode="bilinear")[0])
    # what the evaluation transform's padding gives, before normalising
    cfg = SyntheticData(resize="fit", image_size=16)
    padded = build_transform(cfg, train=False)({"image": tv_tensors.Image(torch.zeros(3, 10, 16, dtype=torch.uint8)),
                                                "mask": tv_tensors.Mask(torch.zeros(10, 16, dtype=torch.uint8))})
    assert torch.equal(padded["image"][:, 15, 0], padding_fill(cfg, 3))


def test_a_flipped_view_changes_nothing_for_a_mirror_symmetric_model_and_is_undone_for_others():
    image = torch.randn(3, 20, 28, generator=torch.Generator().manual_seed(2))
    symmetric = one_by_one()
    plain = Predictor(symmetric, Protocol(), torch.zeros(3), torch.device("cpu"))([image], [(20, 28)])[0]
    flipped = Predictor(symmetric, Protocol(flip=True), torch.zeros(3), torch.device("cpu"))([image], [(20, 28)])[0]
    torch.testing.assert_close(flipped, torch.log_softmax(plain, dim=0), atol=1e-5, rtol=1e-5)

    torch.manual_seed(3)
    lopsided = torch.nn.Conv2d(3, 4, kernel_size=(1, 3), padding=(0, 1)).eval()  # looks to one side
    tta = Predictor(lopsided, Protocol(flip=True), torch.zeros(3), torch.device("cpu"))([image], [(20, 28)])[0]
    with torch.no_grad():
        direct = torch.softmax(lopsided(image[None])[0], dim=0)
        mirrored = torch.softmax(lopsided(image.flip(-1)[None])[0].flip(-1), dim=0)
    torch.testing.assert_close(tta, torch.log((direct + mirrored) / 2), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(direct, mirrored, atol=1e-3)


def test_scaled_views_are_averaged_as_probabilities_on_the_output_grid():
    image = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(4))
    model = one_by_one(classes=1)  # one channel: sigmoid probabilities, logits back out
    protocol = Protocol(scales=(0.5, 1.0))
    out = Predictor(model, protocol, torch.zeros(3), torch.device("cpu"))([image], [(32, 32)])[0]
    with torch.no_grad():
        half = F.interpolate(image[None], size=(8, 8), mode="bilinear", antialias=True)
        views = [model(half), model(image[None])]
    probabilities = sum(torch.sigmoid(F.interpolate(v, size=(32, 32), mode="bilinear")) for v in views) / 2
    torch.testing.assert_close(torch.sigmoid(out), probabilities[0], atol=1e-5, rtol=1e-5)


def test_input_grid_scoring_resizes_the_label_to_the_model_s_input():
    model = one_by_one(classes=2)
    scorer = Scorer(model, torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX), 0.5, torch.device("cpu"),
                    protocol=Protocol(grid="input"), fill=torch.zeros(3))
    label = torch.zeros(30, 40, dtype=torch.int64)
    ((labels, predicted),) = scorer.score([torch.randn(3, 15, 20)], [label])
    assert labels.shape == predicted.shape == (1, 15, 20)
    original = Scorer(model, None, 0.5, torch.device("cpu"), fill=torch.zeros(3))
    ((labels, predicted),) = original.score([torch.randn(3, 15, 20)], [label])
    assert labels.shape == predicted.shape == (1, 30, 40)


# --- crop mode --------------------------------------------------------------------------


def test_crop_mode_cuts_crop_sized_squares_from_the_zoomed_image_and_ignores_the_padding():
    sample = {"image": tv_tensors.Image(torch.full((3, 40, 60), 200, dtype=torch.uint8)),
              "mask": tv_tensors.Mask(torch.ones(40, 60, dtype=torch.uint8))}
    small = SyntheticData(image_size=60, resize="fit", crop={"size": 32, "scale": [0.25, 0.25]})
    out = build_transform(small, train=True)(dict(sample), torch.Generator().manual_seed(0))
    assert out["image"].shape == (3, 32, 32) and out["mask"].shape == (32, 32)
    assert int((out["mask"] != IGNORE_INDEX).sum()) == 10 * 15  # the 40 x 60 image at 0.25 of 60/60
    assert set(out["mask"].unique().tolist()) == {1, IGNORE_INDEX}
    large = SyntheticData(image_size=60, resize="fit", crop={"size": 32, "scale": [2.0, 2.0]})
    out = build_transform(large, train=True)(dict(sample), torch.Generator().manual_seed(0))
    assert out["mask"].shape == (32, 32) and bool((out["mask"] == 1).all())  # inside the image: no padding
    assert build_transform(large, train=True).decode_size(600, 400) == (120, 80)  # decoded for the largest zoom

    train_set, val_set = build_datasets(SyntheticData(image_size=48, crop={"size": 32}), seed=0)
    image, target = train_set[(0, 3)]
    assert image.shape == (3, 32, 32) and target.shape == (32, 32)
    assert val_set[0][0].shape == (3, 48, 48)  # evaluation sees the whole image at the job's scale


def test_crop_mode_takes_its_zoom_from_crop_scale_alone():
    with pytest.raises(ValidationError, match="crop.scale"):
        SyntheticData(crop={"size": 32}, augment={"scale": [0.5, 1.0]})
    with pytest.raises(ValidationError, match="size"):
        SyntheticData(crop={"size": 8})
    assert SyntheticData(crop={"size": 32}, augment={"strength": 1.0}).crop.scale == (0.5, 2.0)


@pytest.fixture(scope="module")
def crop_run(tmp_path_factory):
    data = {"name": "synthetic", "num_classes": 3, "train_samples": 16, "val_samples": 4, "image_size": 48,
            "crop": {"size": 32, "scale": [0.75, 1.25], "blend": "uniform"}}
    return train("crop", tmp_path_factory, "tiny-crop", data=data, train={"epochs": 1, "batch_size": 4})


def test_a_crop_run_is_scored_with_sliding_windows_and_evaluate_says_so(crop_run, tmp_path):
    meta = json.loads((crop_run.checkpoint_dir / "meta.json").read_text())
    assert meta["scoring"]["inference"] == {"mode": "sliding window", "window": 32, "overlap": 0.5,
                                            "blend": "uniform"}
    trained = load_trained(str(crop_run.checkpoint_dir), device="cpu")
    summary = evaluate(trained, progress=False).summary()
    assert summary["val/miou"] == pytest.approx(crop_run.metrics["val/miou"])
    assert summary["val/loss"] == pytest.approx(crop_run.metrics["val/loss"], rel=1e-5)

    out = tmp_path / "eval"
    assert evaluate_main([str(crop_run.checkpoint_dir), "--out", str(out), "--no-figures", "--no-progress",
                          "--tta-flip", "--tta-scales", "0.75", "1"]) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["protocol"] == {
        "grid": "original", "scale": {"image_size": 48, "resize": "squash"},
        "inference": {"mode": "sliding window", "window": 32, "overlap": 0.5, "blend": "uniform"},
        "tta": {"flip": True, "scales": [0.75, 1.0]},
    }
    assert np.asarray(record["confusion_matrix"]).sum() == 4 * 48 * 48


def test_predict_runs_sliding_windows_and_test_time_views_at_the_photo_s_size(crop_run, tmp_path):
    from segjob.predict import main as predict_main

    path = tmp_path / "wide.png"
    Image.fromarray((np.random.default_rng(0).random((50, 90, 3)) * 255).astype(np.uint8)).save(path)
    out = tmp_path / "out"
    assert predict_main([str(crop_run.checkpoint_dir), str(path), "--out", str(out), "--no-progress",
                         "--tta-flip", "--tta-scales", "1", "1.5"]) == 0
    record = json.loads((out / "predictions.json").read_text())
    assert record["protocol"]["inference"]["mode"] == "sliding window"
    assert record["protocol"]["tta"] == {"flip": True, "scales": [1.0, 1.5]}
    with Image.open(out / "wide.mask.png") as mask:
        assert mask.size == (90, 50)
    with pytest.raises(SystemExit):
        predict_main([str(crop_run.checkpoint_dir), str(path), "--out", str(out), "--tta-scales", "0"])
