"""`python -m segjob.check` and the check before training: every bad sample named, nothing crashes."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image
from servers import closed_port_url
from test_data import write_tiny_pets
from test_data_formats import write_leaf, write_nyuv2, write_voc

from segjob.check import main as check
from segjob.data import build_datasets
from segjob.data.audit import check_data, check_datasets
from segjob.errors import UserError
from segjob.job.load import load_job, resolve_local_paths
from segjob.job.schema import LeafData, NYUv2Data, VOCData
from segjob.train import main as train
from segjob.train import prepare


def pets_job(tmp_path: Path, root: Path, split: str = "official") -> Path:
    job = tmp_path / "pets.yaml"
    job.write_text(yaml.safe_dump({
        "name": "pets", "data": {"name": "pets", "root": str(root), "split": split, "image_size": 32},
        "storage": {"uri": str(tmp_path / "runs")},
    }))
    return job


def bad_pets(root: Path) -> Path:
    """The tiny Pet set with every kind of damage the real one has, and more."""
    write_tiny_pets(root)  # Bengal_2 is already an RGBA PNG behind a .jpg name
    (root / "images/Bengal_1.jpg").write_bytes((root / "images/Bengal_1.jpg").read_bytes()[:300])  # truncated JPEG
    # GIF named .jpg
    Image.fromarray(np.zeros((50, 30), dtype=np.uint8), "P").save(root / "images/Abyssinian_2.jpg", "GIF")
    trimap = np.asarray(Image.open(root / "annotations/trimaps/Beagle_1.png")).copy()
    trimap[0, 0] = 99
    Image.fromarray(trimap, "L").save(root / "annotations/trimaps/Beagle_1.png")  # a label outside 1..3
    # size mismatch
    Image.fromarray(np.full((7, 9), 2, dtype=np.uint8), "L").save(root / "annotations/trimaps/Abyssinian_1.png")
    (root / "annotations/test.txt").write_text("Bengal_2 6 1 6\nBeagle_1 7 2 7\nPersian_1 8 1 8\n")  # listed, no files
    return root


def lines_about(out: list[str], sample: str) -> list[str]:
    return [line for line in out if f"sample '{sample}'" in line]


def test_a_clean_dataset_passes(tmp_path, capsys):
    write_tiny_pets(tmp_path / "pets")
    assert check([str(pets_job(tmp_path, tmp_path / "pets"))]) == 0
    captured = capsys.readouterr()
    assert "5 samples checked" in captured.err and "0 bad" in captured.err
    # the RGBA PNG behind Bengal_2.jpg is named, as a warning only
    assert [line.split(":")[0] for line in captured.out.splitlines()] == ["warning", "warning"]


def test_every_bad_sample_is_named_and_nothing_crashes(tmp_path, capsys):
    root = bad_pets(tmp_path / "pets")
    assert check([str(pets_job(tmp_path, root))]) == 1
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert all(line.startswith(("error: ", "warning: ")) for line in out)
    truncated = lines_about(out, "Bengal_1")
    assert truncated == [f"error: train sample 'Bengal_1': image {root}/images/Bengal_1.jpg is truncated or corrupt "
                         + truncated[0].split("corrupt ", 1)[1]]
    assert any("is really a GIF file behind a .jpg name" in line and line.startswith("warning")
               for line in lines_about(out, "Abyssinian_2"))
    assert any("alpha channel (RGBA)" in line for line in lines_about(out, "Bengal_2"))
    assert any("is really a PNG file" in line for line in lines_about(out, "Bengal_2"))
    assert lines_about(out, "Beagle_1") == [
        f"error: val sample 'Beagle_1': trimap {root}/annotations/trimaps/Beagle_1.png "
        "has values 99 outside the dataset's values 1..3"]
    assert lines_about(out, "Abyssinian_1") == [
        f"error: train sample 'Abyssinian_1': image {root}/images/Abyssinian_1.jpg is 60x40 but its trimap "
        f"{root}/annotations/trimaps/Abyssinian_1.png is 9x7; fix or remove the pair"]
    assert lines_about(out, "Persian_1") == [
        f"error: val sample 'Persian_1': image {root}/images/Persian_1.jpg is missing",
        f"error: val sample 'Persian_1': trimap {root}/annotations/trimaps/Persian_1.png is missing"]
    assert "6 samples checked" in captured.err and "4 bad, 3 warnings" in captured.err and "--skip-bad" in captured.err


def test_colour_masks_other_values_and_empty_splits(tmp_path):
    voc = write_voc(tmp_path / "voc")
    green = np.dstack([np.zeros((40, 50), np.uint8), np.full((40, 50), 128, np.uint8), np.zeros((40, 50), np.uint8)])
    Image.fromarray(green, "RGB").save(voc / "SegmentationClass/2007_000001.png")  # a colour mask, not class indices
    mask = np.asarray(Image.open(voc / "SegmentationClass/2007_000002.png")).copy()
    mask[3, 3] = 99
    Image.fromarray(mask, "L").save(voc / "SegmentationClass/2007_000002.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("")
    report = check_data(VOCData(root=str(tmp_path / "voc")), seed=0)
    assert [str(problem).split(": ", 2)[1] for problem in report.errors] == [
        "val split", "train sample '2007_000001'", "train sample '2007_000002'"]
    assert "is a colour (RGB) mask; expected one label value per pixel" in report.errors[1].message
    assert "has values 99 outside the dataset's values 0..20, 255" in report.errors[2].message
    assert report.bad_samples == ["2007_000001", "2007_000002"]


def test_a_truncated_photo_is_caught_while_decoding_at_reduced_size(tmp_path):
    write_leaf(tmp_path, count=2, size=(480, 640))
    photo = tmp_path / "original_images/image1.jpeg"
    photo.write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])
    report = check_data(LeafData(root=str(tmp_path), val_fraction=0.5, image_size=64), seed=0)  # decoded at 1/8
    assert [problem.sample for problem in report.errors] == ["image1"]
    assert f"image {photo} is truncated or corrupt" in report.errors[0].message


def test_nyuv2_labels_outside_the_raw_classes_are_named(tmp_path):
    nyu = write_nyuv2(tmp_path)
    with h5py.File(nyu["path"], "r+") as file:
        labels = file["labels"][()]
        labels[2, 0, 0] = 1000
        file["labels"][...] = labels
    report = check_data(NYUv2Data(path=str(nyu["path"])), seed=0)
    assert [problem.sample for problem in report.errors] == ["nyuv2-0003"]
    assert "labels of frame 3 of" in report.errors[0].message and "has values 1000 outside" in report.errors[0].message


def test_an_inspection_that_fails_is_a_problem_not_a_crash(tmp_path, monkeypatch):
    write_tiny_pets(tmp_path)
    train, val = build_datasets(load_job(pets_job(tmp_path, tmp_path)).data, seed=0)
    monkeypatch.setattr(type(train), "inspect", lambda self, index: 1 / 0)
    report = check_datasets({"train": train, "val": val}, limit=2)
    assert report.checked == 4 and len(report.errors) == 4
    assert "could not be checked (ZeroDivisionError" in report.errors[0].message


def test_training_refuses_to_start_on_bad_samples_before_ray(tmp_path, capsys):
    job = pets_job(tmp_path, bad_pets(tmp_path / "pets"))
    assert train([str(job)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert "data: 4 problem(s), the first: error: train sample 'Abyssinian_1'" in errors[0]
    assert "--skip-bad" in errors[0]
    assert not (tmp_path / "runs" / "pets").exists()


def test_skip_bad_leaves_the_bad_samples_out(tmp_path, caplog):
    job = resolve_local_paths(load_job(pets_job(tmp_path, bad_pets(tmp_path / "pets"))))
    prepare(job, skip_bad=True)
    assert job.data.exclude == ["Abyssinian_1", "Beagle_1", "Bengal_1", "Persian_1"]
    assert caplog.text.count("--skip-bad: leaving out") == 5  # Persian_1 has two problems
    train_set, val_set = build_datasets(job.data, job.seed)  # what the workers build from the job they get
    assert train_set.names == ["Abyssinian_2"] and val_set.names == ["Bengal_2"]
    prepare(job, skip_bad=False)  # nothing bad is left


def test_an_empty_split_cannot_be_skipped(tmp_path):
    root = tmp_path / "pets"
    write_tiny_pets(root)
    (root / "annotations/test.txt").write_text("# nothing\n")
    job = resolve_local_paths(load_job(pets_job(tmp_path, root)))
    with pytest.raises(UserError, match="val split: is empty") as error:
        prepare(job, skip_bad=True)
    assert "--skip-bad" not in str(error.value)


def test_the_quickstart_job_checks_clean(capsys):
    assert check(["jobs/quickstart.yaml", "--limit", "8"]) == 0


def test_an_unreachable_bucket_is_one_line_before_any_training(tmp_path, capsys):
    for command in (train, check):
        code = command(["jobs/quickstart.yaml", "--set", "storage.uri=s3://segjob-nowhere/runs",
                        "--set", f"storage.endpoint_url={closed_port_url()}"])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert code == 2
        assert len(errors) == 1 and "segjob-nowhere" in errors[0] and "endpoint" in errors[0]
