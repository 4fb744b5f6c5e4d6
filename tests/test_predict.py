"""python -m segjob.predict on checkpoints trained here: masks, overlays, probability maps,
RGB-D inputs, ONNX export with an onnxruntime parity check, local and S3 checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trained_runs import PETS_ROOT, assert_figure, binary_run, pets_run, synthetic_run, upload_checkpoint

from segjob.errors import UserError
from segjob.job.schema import JobConfig
from segjob.models import UNet
from segjob.predict import export_onnx, main, output_stems, prepare
from segjob.results.trained import load_trained
from segjob.store import checkpoint
from segjob.store.storage import open_storage


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return synthetic_run(tmp_path_factory)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Two pictures of shapes, not square and not the training size."""
    from segjob.data.synthetic import render_sample

    folder = tmp_path_factory.mktemp("images")
    paths = []
    for number, (height, width) in enumerate([(45, 70), (64, 64)]):
        image, _ = render_sample(np.random.default_rng(number), 64, 3)
        picture = Image.fromarray((image * 255).round().astype(np.uint8)).resize((width, height))
        paths.append(folder / f"shapes{number}.png")
        picture.save(paths[-1])
    return paths


def test_masks_and_overlays_at_each_image_s_size(run, images, tmp_path):
    out = tmp_path / "out"
    assert main([str(run.checkpoint_dir), *map(str, images), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["class_names"] == ["background", "disc", "square"] and len(summary["images"]) == 2
    for path, record in zip(images, summary["images"]):
        with Image.open(path) as original:
            size = original.size
        with Image.open(out / f"{path.stem}.mask.png") as mask:
            assert mask.mode == "P" and mask.size == size  # indices, shown in the palette's colours
            labels = np.asarray(mask)
        assert set(np.unique(labels)) <= {0, 1, 2}
        assert record["class_share"] == pytest.approx({name: float((labels == c).mean()) for c, name in
                                                       enumerate(["background", "disc", "square"])}, abs=1e-6)
        with Image.open(out / f"{path.stem}.overlay.png") as overlay:
            assert overlay.mode == "RGB" and overlay.size == size
        assert not (out / f"{path.stem}.prob.png").exists()  # three classes: no probability map
        assert record["files"] == {"mask": f"{path.stem}.mask.png", "overlay": f"{path.stem}.overlay.png"}


def test_a_square_image_of_the_training_size_is_predicted_like_the_dataset(run, tmp_path):
    """What evaluation sees for a validation sample is what predict gives for the same picture."""
    trained = load_trained(str(run.checkpoint_dir), device="cpu")
    _, val_set = trained.datasets
    raw = val_set.load(0)["image"]  # float 0..1 from the generator; save it losslessly as 8 bits and back
    picture = (raw.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path = tmp_path / "sample.png"
    Image.fromarray(picture).save(path)
    prepared = prepare(trained, path, None, val_set.transform)
    assert prepared.tensor.shape == (3, 32, 32) and prepared.content == (32, 32)
    assert torch.allclose(prepared.tensor, val_set[0][0], atol=1 / 255 / 0.224)  # 8-bit rounding, in normalised units
    out = tmp_path / "out"
    assert main([str(run.checkpoint_dir), str(path), "--out", str(out), "--no-progress"]) == 0
    with torch.no_grad():
        expected = trained.model(prepared.tensor[None]).argmax(1)[0].numpy()
    with Image.open(out / "sample.mask.png") as mask:
        assert np.array_equal(np.asarray(mask), expected)


def test_fit_resizing_is_undone_for_the_output(run, tmp_path):
    trained = load_trained(str(run.checkpoint_dir), device="cpu", data_overrides={"resize": "fit"})
    path = tmp_path / "wide.png"
    Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8)).save(path)
    prepared = prepare(trained, path, None, trained.datasets[1].transform)
    assert prepared.tensor.shape == (3, 32, 32) and prepared.content == (16, 32)  # longer side to 32, padded below
    squashed = load_trained(str(run.checkpoint_dir), device="cpu", data_overrides={"resize": "squash"})
    assert prepare(squashed, path, None, squashed.datasets[1].transform).content == (32, 32)


def test_a_binary_model_writes_its_probability_map(tmp_path_factory, images, tmp_path):
    binary = binary_run(tmp_path_factory)
    shares = {}
    for threshold in ("0.2", "0.8"):
        out = tmp_path / threshold
        assert main([str(binary.checkpoint_dir), str(images[0]), "--out", str(out), "--threshold", threshold,
                     "--no-progress"]) == 0
        summary = json.loads((out / "predictions.json").read_text())
        assert summary["threshold"] == float(threshold)
        shares[threshold] = summary["images"][0]["class_share"][summary["class_names"][1]]  # the foreground
        with Image.open(out / f"{images[0].stem}.prob.png") as probability, Image.open(images[0]) as original:
            assert probability.mode == "L" and probability.size == original.size
            probability = np.asarray(probability) / 255
        with Image.open(out / f"{images[0].stem}.mask.png") as mask:
            labels = np.asarray(mask)
        # the mask is the probability map thresholded (up to the map's 8-bit rounding)
        clear = np.abs(probability - float(threshold)) > 1 / 255
        assert np.array_equal(labels[clear], (probability[clear] > float(threshold)).astype(np.uint8))
    assert shares["0.2"] >= shares["0.8"]


def test_onnx_export_matches_pytorch(run, images, tmp_path):
    model_file = tmp_path / "model.onnx"
    out = tmp_path / "out"
    assert main([str(run.checkpoint_dir), str(images[0]), "--out", str(out), "--export-onnx", str(model_file),
                 "--no-progress"]) == 0
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["onnx"]["max_abs_diff"] < 1e-3 and summary["onnx"]["input"] == [None, 3, 32, 32]
    assert model_file.is_file() and not Path(f"{model_file}.data").exists()  # small weights stay inside

    import onnxruntime

    trained = load_trained(str(run.checkpoint_dir), device="cpu")
    batch = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # another batch size than exported
    session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": batch.numpy()})
    with torch.no_grad():
        expected = trained.model(batch).numpy()
    assert logits.shape == (3, 3, 32, 32)
    print(f"U-Net ONNX parity: max abs diff {np.abs(logits - expected).max():.3g}")
    assert np.abs(logits - expected).max() < 1e-4


def test_export_alone_needs_no_images(run, tmp_path, capsys):
    assert main([str(run.checkpoint_dir), "--export-onnx", str(tmp_path / "m.onnx")]) == 0
    assert "max abs diff" in capsys.readouterr().err


class DataDependent(torch.nn.Module):
    """Branches on the values of its input: torch.export can't trace that into a graph."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        if int(y.sum().item()) % 2:
            return y * 2
        return y


def test_a_model_the_exporter_cannot_take_says_so(tmp_path):
    with pytest.raises(UserError, match=r"--export-onnx: the odd model cannot be exported to ONNX "
                                        r"by torch.onnx.export \(") as caught:
        export_onnx(DataDependent(), torch.randn(1, 3, 8, 8), tmp_path / "odd.onnx", "odd")
    assert "\n" not in str(caught.value)


def rgbd_checkpoint(folder: Path) -> Path:
    """A 4-channel U-Net checkpoint whose dataset (an absent Pets copy) isn't here: class names
    come from its recorded metrics and the input channels from its weights."""
    job = JobConfig.model_validate({
        "name": "rgbd", "data": {"name": "pets", "root": str(folder / "absent"), "image_size": 32},
        "model": {"name": "unet", "base_channels": 4, "depth": 2},
    })
    torch.manual_seed(0)
    model = UNet(4, 3, base_channels=4, depth=2)
    checkpoint.write_local(folder, model.state_dict(), {"progress": {}}, [])
    metrics = {"epoch": 1, "val/miou": 0.5, "val/iou/background": 0.6, "val/iou/pet": 0.5, "val/iou/border": 0.4}
    meta = checkpoint.build_meta(folder, job=job.model_dump(mode="json"), step=3, epoch=1, metrics=metrics,
                                 reason="epoch")
    (folder / checkpoint.META_FILE).write_text(json.dumps(meta))
    return folder


def test_rgbd_models_take_a_depth_file_per_image(images, tmp_path, capsys):
    ckpt = rgbd_checkpoint(tmp_path / "ckpt")
    trained = load_trained(str(ckpt), device="cpu")
    assert trained.in_channels == 4 and trained.class_names == ["background", "pet", "border"]
    assert trained.datasets is None
    with Image.open(images[0]) as picture:
        width, height = picture.size
    depth_npy = tmp_path / "d0.npy"
    np.save(depth_npy, np.linspace(0.5, 4.0, height * width, dtype=np.float32).reshape(height, width))
    depth_png = tmp_path / "d1.png"
    with Image.open(images[1]) as picture:
        Image.fromarray(np.full(picture.size[::-1], 1500, dtype=np.uint16)).save(depth_png)  # 1.5 m, in millimetres
    out = tmp_path / "out"
    assert main([str(ckpt), *map(str, images), "--depth", str(depth_npy), str(depth_png), "--out", str(out),
                 "--no-progress"]) == 0
    assert "no depth statistics: depth is normalised with mean 0 and std 1" in capsys.readouterr().err
    for path in images:
        with Image.open(out / f"{path.stem}.mask.png") as mask, Image.open(path) as original:
            assert mask.size == original.size


def test_rgbd_mistakes_are_named(images, tmp_path, capsys):
    ckpt = rgbd_checkpoint(tmp_path / "ckpt")
    out = str(tmp_path / "out")
    assert main([str(ckpt), str(images[0]), "--out", out]) == 2
    assert "RGB-D model (4 input channels); pass one depth file per image with --depth" in capsys.readouterr().err
    eight_bit = tmp_path / "d.png"
    Image.fromarray(np.zeros((45, 70), dtype=np.uint8)).save(eight_bit)
    assert main([str(ckpt), str(images[0]), "--depth", str(eight_bit), "--out", out]) == 2
    assert "depth PNGs must be 16-bit millimetres" in capsys.readouterr().err
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.ones((10, 10), dtype=np.float32))
    assert main([str(ckpt), str(images[0]), "--depth", str(wrong), "--out", out]) == 2
    assert "depth is 10x10 but its image is 70x45" in capsys.readouterr().err


def test_image_mistakes_are_named(run, images, tmp_path, capsys):
    out = str(tmp_path / "out")
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("hello")
    assert main([str(run.checkpoint_dir), str(not_an_image), "--out", out]) == 2
    assert f"{not_an_image}: cannot read it as an image" in capsys.readouterr().err
    assert main([str(run.checkpoint_dir), str(tmp_path / "missing.png"), "--out", out]) == 2
    assert "no such image" in capsys.readouterr().err
    assert main([str(run.checkpoint_dir), str(images[0]), "--out", out, "--depth", str(images[1])]) == 2
    assert "--depth: the model takes 3 input channels, no depth" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(run.checkpoint_dir), str(images[0])])  # no --out


def test_same_stems_do_not_overwrite_each_other():
    assert output_stems([Path("a/x.jpg"), Path("b/x.png"), Path("y.jpg"), Path("c/x.jpg")]) == ["x", "x-2", "y", "x-3"]


def test_pet_photos_from_a_checkpoint_on_s3(tmp_path_factory, s3_endpoint, s3_bucket, tmp_path):
    pets = pets_run(tmp_path_factory)
    storage = open_storage(f"s3://{s3_bucket}", endpoint_url=s3_endpoint)
    upload_checkpoint(pets.checkpoint_dir, storage, storage.path("best"))
    photos = sorted((PETS_ROOT / "images").glob("*.jpg"))[:2]
    out = tmp_path / "out"
    # the Pets copy is not needed to predict: class names and palette come from the checkpoint
    assert main([f"s3://{s3_bucket}/best", *map(str, photos), "--endpoint-url", s3_endpoint, "--out", str(out),
                 "--data", str(tmp_path / "not-here"), "--no-progress"]) == 0
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["checkpoint"] == f"s3://{s3_bucket}/best"
    assert summary["class_names"] == ["background", "pet", "border"]
    for photo in photos:
        with Image.open(photo) as original, Image.open(out / f"{photo.stem}.mask.png") as mask:
            assert mask.size == original.size
        assert_figure(out / f"{photo.stem}.overlay.png", min_width=100, min_height=100)
