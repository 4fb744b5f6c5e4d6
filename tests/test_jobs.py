"""Every job file under jobs/ loads and validates, as the command that runs it would load it:
`python -m segjob.tune` for a sweep (a file with a `tune:` section), `python -m segjob.train` otherwise.

    .venv/bin/python -m pytest -q tests/test_jobs.py -ra

Datasets and weight files are the user's to provide, so a local path a job names that is absent
here is reported (a skip with the path and the --set that points the job elsewhere), not failed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from segjob.errors import UserError
from segjob.job.load import load_job

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
SHARED_DATA = ROOT.parent / "shared" / "data"
# Where ../shared/data holds a small real sample of a dataset, to suggest in the report.
SAMPLES = {"pets": "oxford-iiit-pet", "camvid": "camvid/CamVid", "voc": "voc2012-mini/VOCdevkit/VOC2012",
           "leaf": "soybean-rust-asrdnet"}


def job_id(path: Path) -> str:
    return path.name


def load(path: Path):
    """The validated job (for a sweep: its base job, after the whole sweep validated)."""
    raw = yaml.safe_load(path.read_text()) or {}
    if isinstance(raw, dict) and "tune" in raw:
        from segjob.job.sweep import load_sweep

        return load_sweep(path).job
    return load_job(path)


def test_there_are_jobs():
    assert JOBS, "jobs/ holds no job files"


@pytest.mark.parametrize("path", JOBS, ids=job_id)
def test_job_validates(path):
    try:
        load(path)
    except UserError as error:  # the one line a user would see, as the failure message
        pytest.fail(str(error), pytrace=False)


def test_job_names_are_unique():
    """Two job files with one name would share (and fight over) one run folder in storage."""
    names = {}
    for path in JOBS:
        raw = yaml.safe_load(path.read_text()) or {}
        names.setdefault(raw.get("name", path.stem), []).append(path.name)
    shared = {name: files for name, files in names.items() if len(files) > 1}
    assert not shared, f"job files sharing a run name: {shared}"


def local_paths(job) -> list[tuple[str, str]]:
    """(key, path) for every local file or folder the job reads: dataset and weight files."""
    found = []
    for key in job.data.path_keys():
        value = getattr(job.data, key, None)
        if value and "://" not in value:
            found.append((f"data.{key}", value))
    weights = getattr(job.model, "encoder_weights", None)
    if weights and "://" not in weights and weights.lower() not in ("none", "imagenet"):
        found.append(("model.encoder_weights", weights))
    return found


@pytest.mark.parametrize("path", JOBS, ids=job_id)
def test_job_data_paths_exist(path):
    try:
        job = load(path)
    except UserError:
        pytest.skip(f"{path.name}: does not validate (see test_job_validates)")
    missing = [(key, value) for key, value in local_paths(job) if not (ROOT / value).exists()]
    if not missing:
        return
    lines = []
    for key, value in missing:
        hint = f"--set {key}=/path/to/it"
        sample = SAMPLES.get(job.data.name)
        if key == "data.root" and sample and (SHARED_DATA / sample).exists():
            hint += f" (a small sample: --set {key}=../shared/data/{sample})"
        lines.append(f"{key}: {value} is absent here; run with {hint}")
    pytest.skip(f"{path.name}: " + "; ".join(lines))
