"""`python -m segjob.pull`: rank the committed checkpoints of a run or sweep by meta.json, download verified.

No Ray: the sweeps here are written straight into storage with segjob.store.checkpoint, the way
trials commit them (a local folder, the moto S3 server and the GCS emulator).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import torch

from segjob.job.schema import JobConfig
from segjob.pull import PULLED_FILE, main
from segjob.store import checkpoint
from segjob.store.storage import Storage, open_storage

# trial -> (optim.lr, [(step, epoch, val/miou or None for a step checkpoint)])
SWEEP = {
    "a1a1a1a1": (0.01, [(4, 1, 0.31), (8, 2, 0.52)]),
    "b2b2b2b2": (0.001, [(4, 1, 0.44), (6, 1, None), (8, 2, 0.47)]),
    "c3c3c3c3": (0.0001, [(4, 1, 0.21)]),
}


def commit(storage: Storage, run_path: str, job: dict, step: int, epoch: int,
           miou: float | None) -> checkpoint.CheckpointInfo:
    """A real (tiny) checkpoint, committed the way the engine commits one: payload, then meta.json."""
    metrics = {"epoch": epoch, "step": step, "train/loss": 1.0 / step}
    if miou is not None:
        metrics |= {"val/miou": miou, "val/loss": 1.0 - miou}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint.write_local(folder, {"weight": torch.full((2, 2), float(step))}, {"progress": {"step": step}},
                               [metrics])
        meta = checkpoint.build_meta(folder, job=job, step=step, epoch=epoch, metrics=metrics, reason="epoch")
        return checkpoint.commit(storage, run_path, folder, meta)


def write_sweep(uri: str, endpoint: str | None = None) -> Storage:
    storage = open_storage(uri, endpoint)
    for trial, (lr, checkpoints) in SWEEP.items():
        job = JobConfig(name=trial, optim={"lr": lr}, storage={"uri": f"{uri}/trials"}).model_dump(mode="json")
        for step, epoch, miou in checkpoints:
            commit(storage, storage.path("trials", trial), job, step, epoch, miou)
    return storage


def pull(*args: str) -> int:
    return main([str(arg) for arg in args])


def test_ranks_across_trials_and_pulls_the_best_verified(tmp_path, capsys):
    write_sweep(str(tmp_path / "sweep"))
    assert pull(tmp_path / "sweep", "--to", tmp_path / "best") == 0
    out = capsys.readouterr().out.splitlines()
    ranked = [line.split()[1:5] for line in out[1:]]
    assert ranked == [["a1a1a1a1", "step-000000008", "2", "0.5200"], ["b2b2b2b2", "step-000000008", "2", "0.4700"],
                      ["b2b2b2b2", "step-000000004", "1", "0.4400"], ["a1a1a1a1", "step-000000004", "1", "0.3100"],
                      ["c3c3c3c3", "step-000000004", "1", "0.2100"]], "step checkpoints without val/miou are not ranked"
    assert out[1].endswith("optim.lr=0.01") and out[3].endswith("optim.lr=0.001"), "the searched keys are shown"

    best = tmp_path / "best"
    loaded = checkpoint.load_folder(best, expected_run="a1a1a1a1")  # evaluate/predict load it this way
    assert loaded.meta["step"] == 8 and torch.equal(loaded.model_state["weight"], torch.full((2, 2), 8.0))
    pulled = json.loads((best / PULLED_FILE).read_text())
    # the committed attempt of that step (checkpoint.py: each commit attempt has a folder of its own)
    assert Path(pulled["source"]).parent == tmp_path / "sweep/trials/a1a1a1a1/checkpoints/step-000000008"
    assert pulled["value"] == 0.52 and pulled["params"] == {"optim.lr": 0.01}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "sweep"], "no temporary folder left behind"


def test_top_k_metric_and_mode_and_list(tmp_path, capsys):
    write_sweep(str(tmp_path / "sweep"))
    assert pull(tmp_path / "sweep", "--top", "2", "--metric", "val/loss", "--mode", "min",
                "--to", tmp_path / "top") == 0
    folders = sorted(p.name for p in (tmp_path / "top").iterdir())
    assert folders == ["01-a1a1a1a1-step-000000008", "02-b2b2b2b2-step-000000008", PULLED_FILE]
    for folder in folders[:2]:
        checkpoint.load_folder(tmp_path / "top" / folder)
    capsys.readouterr()

    assert pull(tmp_path / "sweep" / "trials" / "b2b2b2b2", "--list") == 0  # one run: its own checkpoints
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines[1:]] == ["step-000000008", "step-000000004"]
    assert lines[1].endswith("-"), "nothing varies within one run"
    assert not (Path.cwd() / "best").exists(), "--list downloads nothing"


def test_an_unfinished_upload_never_counts(tmp_path, capsys):
    storage = write_sweep(str(tmp_path / "sweep"))
    # the payload of a better checkpoint is there, its meta.json never was: an upload cut short
    best = checkpoint.list_committed(storage, storage.path("trials", "a1a1a1a1"))[-1]
    partial = Path(best.step_path).with_name("step-000000012")
    partial.mkdir()
    for name in checkpoint.PAYLOAD_FILES:
        (partial / name).write_bytes((Path(best.path) / name).read_bytes())
    assert pull(tmp_path / "sweep", "--list") == 0
    assert "step-000000012" not in capsys.readouterr().out


def test_a_damaged_checkpoint_is_refused_and_nothing_lands(tmp_path, capsys):
    storage = write_sweep(str(tmp_path / "sweep"))
    best = checkpoint.list_committed(storage, storage.path("trials", "a1a1a1a1"))[-1]
    (Path(best.path) / checkpoint.MODEL_FILE).write_bytes(b"tampered")
    assert pull(tmp_path / "sweep", "--to", tmp_path / "best") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "sha256 does not match" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]


def test_only_an_earlier_pull_is_replaced(tmp_path, capsys):
    write_sweep(str(tmp_path / "sweep"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert pull(tmp_path / "sweep", "--to", mine) == 2
    assert "is not an earlier pull" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"

    assert pull(tmp_path / "sweep", "--to", tmp_path / "best", "--metric", "val/loss", "--mode", "max") == 0
    assert pull(tmp_path / "sweep", "--to", tmp_path / "best") == 0  # replaces its own earlier pull
    assert json.loads((tmp_path / "best" / PULLED_FILE).read_text())["run"] == "a1a1a1a1"


def test_s3_a_key_escaping_the_destination_is_refused(s3_endpoint, s3_bucket, tmp_path, capsys):
    uri = f"s3://{s3_bucket}/runs/sweep"
    storage = write_sweep(uri, s3_endpoint)
    assert pull(uri, "--endpoint-url", s3_endpoint, "--to", tmp_path / "best") == 0
    assert checkpoint.load_folder(tmp_path / "best").meta["run"] == "a1a1a1a1"

    # inside the folder that is downloaded: step-000000008's committed attempt
    attempt = checkpoint.list_committed(storage, storage.path("trials", "a1a1a1a1"))[-1].path
    key = attempt.split("/", 1)[1] + "/../../../../../../../escaped.txt"
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    assert pull(uri, "--endpoint-url", s3_endpoint, "--to", tmp_path / "again") == 2
    assert "refusing unsafe key" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"], "nothing written, inside or outside"


def test_gcs_emulator(gcs_endpoint, gcs_bucket, tmp_path, capsys):
    uri = f"gs://{gcs_bucket}/runs/sweep"
    write_sweep(uri, gcs_endpoint)
    assert pull(uri, "--top", "3", "--to", tmp_path / "top") == 0
    pulled = json.loads((tmp_path / "top" / PULLED_FILE).read_text())
    assert pulled["source"] == f"gs://{gcs_bucket}/runs/sweep"
    assert pulled["checkpoints"][0] == "01-a1a1a1a1-step-000000008"
    assert json.loads((tmp_path / "top" / pulled["checkpoints"][2] / PULLED_FILE).read_text())["source"].startswith(
        f"gs://{gcs_bucket}/runs/sweep/trials/b2b2b2b2/checkpoints/step-000000004/attempt-")  # its committed attempt


def test_user_errors_are_one_line(tmp_path, capsys):
    assert pull(tmp_path / "nowhere") == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nowhere'}: no such folder"
    (tmp_path / "empty" / "run" / "checkpoints").mkdir(parents=True)
    assert pull(tmp_path / "empty") == 2
    assert "no committed checkpoints found" in capsys.readouterr().err
    write_sweep(str(tmp_path / "sweep"))
    assert pull(tmp_path / "sweep", "--metric", "val/dice") == 2
    assert ("no checkpoint carries 'val/dice'; metrics seen: epoch, step, train/loss, val/loss, val/miou"
            in capsys.readouterr().err)


def test_works_without_ray(tmp_path):
    write_sweep(str(tmp_path / "sweep"))
    code = ("import sys; sys.modules['ray'] = None\n"  # any `import ray` now fails
            "from segjob.pull import main\n"
            f"raise SystemExit(main([{str(tmp_path / 'sweep')!r}, '--to', {str(tmp_path / 'best')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "best" / checkpoint.META_FILE).is_file()
