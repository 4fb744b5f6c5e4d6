"""python -m segjob.evaluate end to end on checkpoints trained here (no Ray): synthetic data,
the Pet sample, a local folder and the moto S3 server; and the pieces it is made of."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from trained_runs import assert_figure, binary_run, pets_run, synthetic_run, upload_checkpoint

from segjob.engine.evaluation import labels_of
from segjob.errors import UserError
from segjob.evaluate import main
from segjob.learning.metrics import per_image_confusion
from segjob.results.evaluation import evaluate
from segjob.results.evaluation_outputs import best_median_worst, lowest_and_highest
from segjob.results.trained import load_trained
from segjob.store import checkpoint
from segjob.store.storage import open_storage


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return synthetic_run(tmp_path_factory)


def strict_json(path: Path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}: not standard JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_evaluation_reproduces_the_engine_s_own_figures(run):
    trained = load_trained(str(run.checkpoint_dir), device="cpu")
    summary = evaluate(trained, batch_size=4, progress=False).summary()
    for key in ("val/miou", "val/pixel_acc", "val/dice", "val/iou/disc", "val/mean_acc"):
        assert summary[key] == pytest.approx(run.metrics[key], nan_ok=True), key
    assert summary["val/loss"] == pytest.approx(run.metrics["val/loss"], rel=1e-4)


def test_the_command_writes_metrics_per_image_scores_and_figures(run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main([str(run.checkpoint_dir), "--out", str(out), "--workers", "0", "--batch-size", "4"]) == 0
    metrics = strict_json(out / "metrics.json")
    assert metrics["images"] == 9 and metrics["split"] == "val"
    assert metrics["class_names"] == ["background", "disc", "square"]
    assert metrics["step"] == run.metrics["step"]
    assert np.asarray(metrics["confusion_matrix"]).sum() == 9 * 32 * 32
    for key in ("val/miou", "val/pixel_acc", "val/mean_acc", "val/dice", "val/loss", "val/assd", "val/assd/disc"):
        assert key in metrics["metrics"], key

    with open(out / "per_image.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["index"] for row in rows] == [str(i) for i in range(9)]
    assert rows[0]["name"] == "synthetic-val-00000"
    assert {"loss", "pixel_acc", "miou", "mean_dice", "mean_assd", "iou/square", "dice/disc",
            "assd/background"} <= set(rows[0])
    # every image has 32 x 32 labelled pixels: the dataset's loss is the mean of the images' losses
    assert np.mean([float(row["loss"]) for row in rows]) == pytest.approx(metrics["metrics"]["val/loss"], rel=1e-5)
    pixel_acc = np.mean([float(row["pixel_acc"]) for row in rows])  # every image has 32 x 32 labelled pixels
    assert pixel_acc == pytest.approx(metrics["metrics"]["val/pixel_acc"], rel=1e-5)

    pictures = sorted((out / "figures").glob("*.png"))
    names = {path.name for path in pictures}
    assert {"iou_per_class.png", "confusion_matrix.png", "dice_per_image.png", "assd_per_image.png",
            "samples_miou.png", "samples_pixel_acc.png", "samples_dice_background.png",
            "samples_assd_background.png", "lowest_loss.png", "highest_loss.png"} <= names
    for path in pictures:
        assert_figure(path)
    assert "val/miou" in capsys.readouterr().err


def test_per_image_scores_add_up_to_the_dataset_matrix(run):
    trained = load_trained(str(run.checkpoint_dir), device="cpu")
    result = evaluate(trained, batch_size=5, with_assd=False, progress=False)
    _, val_set = trained.datasets
    images = torch.stack([val_set[i][0] for i in range(len(val_set))])
    targets = torch.stack([val_set[i][1] for i in range(len(val_set))])
    with torch.no_grad():
        predicted = trained.model(images).argmax(1)
    expected = per_image_confusion(targets, predicted, 3)
    assert np.array_equal(result.scores.confusions, expected.numpy())
    assert torch.equal(result.confusion.mat, expected.sum(0))


def test_a_run_folder_means_its_best_checkpoint_or_the_latest(run):
    storage = open_storage(str(run.storage_root))
    committed = checkpoint.list_committed(storage, storage.path(run.job.name))
    best = checkpoint.select_best(committed, "val/miou", "max")[0]
    assert load_trained(str(run.run_dir), device="cpu").source == best.path
    assert load_trained(str(run.run_dir), pick="latest", device="cpu").source == committed[-1].path
    assert load_trained(f"file://{run.run_dir}", device="cpu").source == best.path


def test_the_pet_sample_end_to_end(tmp_path_factory, tmp_path):
    pets = pets_run(tmp_path_factory)
    out = tmp_path / "pets"
    assert main([str(pets.run_dir), "--out", str(out), "--workers", "0", "--data", str(pets.job.data.root)]) == 0
    metrics = strict_json(out / "metrics.json")
    assert metrics["class_names"] == ["background", "pet", "border"]
    assert metrics["images"] == 18  # 30 % of the 60 listed images
    assert metrics["metrics"]["val/miou"] == pytest.approx(pets.metrics["val/miou"])
    with open(out / "per_image.csv") as file:
        names = [row["name"] for row in csv.DictReader(file)]
    assert all(name.split("_")[-1].isdigit() for name in names)  # Pets file stems, e.g. Abyssinian_12
    for path in (out / "figures").glob("samples_*_pet.png"):
        assert_figure(path)


def test_from_the_moto_s3_server(run, s3_endpoint, s3_bucket, tmp_path):
    storage = open_storage(f"s3://{s3_bucket}", endpoint_url=s3_endpoint)
    upload_checkpoint(run.checkpoint_dir, storage,
                      storage.path("runs", run.job.name, "checkpoints", run.checkpoint_dir.name))
    # a run folder on S3: its best (here only) checkpoint
    out = tmp_path / "s3"
    assert main([f"s3://{s3_bucket}/runs/{run.job.name}", "--endpoint-url", s3_endpoint, "--out", str(out),
                 "--workers", "0", "--no-assd", "--no-figures"]) == 0
    metrics = strict_json(out / "metrics.json")
    assert metrics["checkpoint"] == f"s3://{s3_bucket}/runs/{run.job.name}/checkpoints/{run.checkpoint_dir.name}"
    assert metrics["metrics"]["val/miou"] == pytest.approx(run.metrics["val/miou"])
    assert "val/assd" not in metrics["metrics"] and not (out / "figures").exists()

    # a damaged object is refused, and named where the user can find it
    remote = storage.path("runs", run.job.name, "checkpoints", run.checkpoint_dir.name, checkpoint.MODEL_FILE)
    storage.write_bytes(remote, b"not the weights")
    with pytest.raises(UserError, match=rf"s3://{s3_bucket}/runs/.*/model.safetensors: sha256 does not match"):
        load_trained(f"s3://{s3_bucket}/runs/{run.job.name}", endpoint_url=s3_endpoint)


def test_untrusted_checkpoints_are_verified_before_use(run, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(run.checkpoint_dir, tampered)
    weights = bytearray((tampered / checkpoint.MODEL_FILE).read_bytes())
    weights[-1] ^= 1
    (tampered / checkpoint.MODEL_FILE).write_bytes(bytes(weights))
    with pytest.raises(UserError, match="model.safetensors: sha256 does not match"):
        load_trained(str(tampered))

    odd_job = tmp_path / "odd-job"
    shutil.copytree(run.checkpoint_dir, odd_job)
    meta = json.loads((odd_job / checkpoint.META_FILE).read_text())
    meta["job"]["model"]["depth"] = 99
    (odd_job / checkpoint.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError) as caught:
        load_trained(str(odd_job))
    message = str(caught.value)
    assert "meta.json (job): model.depth" in message and "another segjob version" in message and "\n" not in message


def test_user_mistakes_are_one_line_and_exit_2(run, tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "no such folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--out", str(tmp_path / "x")]) == 2
    assert "neither a checkpoint folder" in capsys.readouterr().err
    assert main([str(run.checkpoint_dir), "--out", str(tmp_path / "x"), "--set", "model.depth=3"]) == 2
    assert "expected data.KEY=VALUE" in capsys.readouterr().err
    assert main([str(run.checkpoint_dir), "--out", str(tmp_path / "x"), "--threshold", "0.3"]) == 2
    assert "--threshold: only for one-channel" in capsys.readouterr().err
    assert main([str(run.checkpoint_dir), "--out", str(tmp_path / "x"), "--data", str(tmp_path)]) == 2
    assert "--data: the job's dataset (synthetic) reads no files" in capsys.readouterr().err
    assert main([str(run.checkpoint_dir), "--out", str(tmp_path / "x"), "--set", "data.image_size=tiny"]) == 2
    assert "error: --set data.image_size: data.image_size" in capsys.readouterr().err


def test_the_dataset_must_be_here_to_evaluate(tmp_path_factory, tmp_path, capsys):
    pets = pets_run(tmp_path_factory)
    assert main([str(pets.checkpoint_dir), "--out", str(tmp_path / "x"), "--data", str(tmp_path / "no-pets")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "data.root" in error and "no-pets" in error


def test_a_binary_model_thresholds_its_probability_map(tmp_path_factory, tmp_path):
    binary = binary_run(tmp_path_factory)
    trained = load_trained(str(binary.checkpoint_dir), device="cpu")
    assert trained.is_binary and trained.num_classes == 2
    default = evaluate(trained, progress=False, with_assd=False)
    assert default.summary()["val/miou"] == pytest.approx(binary.metrics["val/miou"])
    strict, lenient = (evaluate(trained, progress=False, with_assd=False, threshold=t) for t in (0.99, 0.01))
    foreground = lambda result: int(result.confusion.mat[:, 1].sum())  # noqa: E731
    assert foreground(strict) <= foreground(default) <= foreground(lenient)
    assert foreground(strict) < foreground(lenient)
    out = tmp_path / "binary"
    assert main([str(binary.checkpoint_dir), "--out", str(out), "--threshold", "0.4", "--no-assd", "--workers", "0",
                 "--no-figures"]) == 0
    assert strict_json(out / "metrics.json")["threshold"] == 0.4


def test_each_image_s_loss_is_the_job_s_loss_on_that_image_alone(run):
    trained = load_trained(str(run.checkpoint_dir), device="cpu")
    result = evaluate(trained, batch_size=4, with_assd=False, progress=False)
    _, val_set = trained.datasets
    with torch.no_grad():
        expected = [float(torch.nn.functional.cross_entropy(trained.model(val_set[i][0][None]), val_set[i][1][None]))
                    for i in range(len(val_set))]
    assert result.scores.indices.tolist() == list(range(9))
    np.testing.assert_allclose(result.image_losses, expected, rtol=1e-5)
    assert result.loss == pytest.approx(float(np.mean(expected)), rel=1e-5)  # equal pixel counts: the plain mean


def test_the_lowest_and_highest_loss_figures_show_as_many_images_as_asked(run, tmp_path):
    out = tmp_path / "three"
    assert main([str(run.checkpoint_dir), "--out", str(out), "--workers", "0", "--no-assd", "--loss-images", "3",
                 "--no-progress"]) == 0
    for name in ("lowest_loss.png", "highest_loss.png"):
        assert_figure(out / "figures" / name)
    none = tmp_path / "none"
    assert main([str(run.checkpoint_dir), "--out", str(none), "--workers", "0", "--no-assd", "--loss-images", "0",
                 "--no-progress"]) == 0
    assert not list((none / "figures").glob("*_loss.png"))
    assert (none / "figures" / "samples_miou.png").is_file()


def test_lowest_and_highest():
    losses = np.array([0.5, np.nan, 0.9, 0.1, 0.7, 0.1])
    assert lowest_and_highest(losses, 2) == ([3, 5], [2, 4])  # lowest first, highest first; ties in row order
    assert lowest_and_highest(losses, 9) == ([3, 5, 0, 4, 2], [2, 4, 0, 3, 5])  # nan (no labelled pixel) left out
    assert lowest_and_highest(losses, 0) == ([], [])
    assert lowest_and_highest(np.array([np.nan]), 16) == ([], [])


def test_best_median_and_worst():
    values = np.array([0.5, np.nan, 0.9, 0.1, 0.7])
    assert best_median_worst(values, lower_is_better=False) == [("best", 2), ("median", 0), ("worst", 3)]
    assert best_median_worst(values, lower_is_better=True) == [("best", 3), ("median", 0), ("worst", 2)]
    assert best_median_worst(np.array([np.nan, np.nan]), False) == []
    ties = np.array([3.0, 3.0, 3.0])  # e.g. a class missed in every image: ASSD is the diagonal in all
    assert best_median_worst(ties, lower_is_better=True) == [("best", 0), ("median", 1), ("worst", 2)]


def test_soft_targets_become_labels_for_scoring():
    soft = torch.zeros(1, 3, 1, 3)
    soft[0, :, 0, 0] = torch.tensor([0.2, 0.7, 0.1])
    soft[0, :, 0, 1] = torch.tensor([0.6, 0.4, 0.0])
    assert labels_of(soft).tolist() == [[[1, 0, 255]]]
    labels = torch.tensor([[[0, 255]]])
    assert labels_of(labels) is not None and labels_of(labels).tolist() == [[[0, 255]]]
    assert math.isclose(float(soft.sum()), 2.0)
