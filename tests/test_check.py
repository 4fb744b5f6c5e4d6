"""`python -m segjob.check` and the driver's early checks: bad input found before training."""

from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from servers import closed_port_url
from test_data import write_tiny_pets

from segjob.check import main as check
from segjob.train import main as train


def pets_job(tmp_path: Path, root: Path) -> Path:
    job = tmp_path / "pets.yaml"
    job.write_text(yaml.safe_dump({
        "name": "pets", "data": {"name": "pets", "root": str(root), "split": "official", "image_size": 32},
        "storage": {"uri": str(tmp_path / "runs")},
    }))
    return job


def test_a_clean_dataset_passes(tmp_path, capsys):
    write_tiny_pets(tmp_path / "pets")
    assert check([str(pets_job(tmp_path, tmp_path / "pets"))]) == 0
    assert "5 samples checked" in capsys.readouterr().err


def test_every_bad_sample_is_named_and_nothing_crashes(tmp_path, capsys):
    root = tmp_path / "pets"
    write_tiny_pets(root)
    (root / "images/Bengal_1.jpg").write_bytes((root / "images/Bengal_1.jpg").read_bytes()[:40])  # truncated JPEG
    Image.fromarray(np.full((5, 5), 2, dtype=np.uint8), "L").save(root / "annotations/trimaps/Beagle_1.png")
    assert check([str(pets_job(tmp_path, root))]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert any("'Bengal_1': cannot read" in line for line in out)
    assert any("'Beagle_1'" in line and "but its trimap" in line for line in out)


def test_the_quickstart_job_checks_clean(capsys):
    assert check(["jobs/quickstart.yaml", "--limit", "8"]) == 0


def test_an_unreachable_bucket_is_one_line_before_any_training(tmp_path, capsys):
    for command in (train, check):
        code = command(["jobs/quickstart.yaml", "--set", "storage.uri=s3://segjob-nowhere/runs",
                        "--set", f"storage.endpoint_url={closed_port_url()}"])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert code == 2
        assert len(errors) == 1 and "segjob-nowhere" in errors[0] and "endpoint" in errors[0]
