"""`python -m segjob.train` on a real local Ray (2 CPUs, gloo) with storage on a moto S3 server.

One Ray instance serves the whole module; every trainer run costs ~10-20 s here.
"""

import json

import pytest

from segjob.engine import loop
from segjob.engine.session import LocalSession
from segjob.job.load import load_job
from segjob.store import checkpoint, run_folder
from segjob.store.storage import open_storage
from segjob.train import main

pytestmark = pytest.mark.ray

SMALL = [
    "data.train_samples=64", "data.val_samples=16", "data.image_size=32",
    "model.base_channels=8", "model.depth=2",
    "train.batch_size=8", "train.checkpoint_every_steps=2", "train.log_every_steps=1",
    "preemption.aws_metadata_url=null", "preemption.gcp_metadata_url=null",  # tests talk to 127.0.0.1 only
]


def train(*overrides: str) -> int:
    return main(["jobs/quickstart.yaml", *[arg for o in [*SMALL, *overrides] for arg in ("--set", o)]])


def test_quickstart_on_s3_commits_resumes_and_finishes(ray_cluster, s3_endpoint, s3_bucket, capsys):
    storage_args = [f"storage.uri=s3://{s3_bucket}/runs", f"storage.endpoint_url={s3_endpoint}"]
    assert train(*storage_args, "train.epochs=1") == 0

    storage = open_storage(f"s3://{s3_bucket}/runs", endpoint_url=s3_endpoint)
    run_path = storage.path("quickstart")
    committed = checkpoint.list_committed(storage, run_path)
    assert committed and committed[-1].epoch == 1
    for info in committed:  # every committed folder is complete and verifies
        assert storage.exists(f"{info.path}/{checkpoint.META_FILE}")
        checkpoint.load(storage, info, expected_run="quickstart")
    assert "starting run 'quickstart'" in capsys.readouterr().err

    assert train(*storage_args, "train.epochs=2") == 0  # the same command, one more epoch: resumes
    assert "resuming run 'quickstart' from step-" in capsys.readouterr().err
    final = checkpoint.latest(storage, run_path)
    loaded = checkpoint.load(storage, final)
    epoch_ends = [r["epoch"] for r in loaded.history if r.get("checkpoint") == "epoch"]
    assert epoch_ends == [1, 2], "epoch 1 was not trained again"
    steps = [r["step"] for r in loaded.history if "train/step_loss" in r]
    assert steps == list(range(1, final.step + 1))
    assert json.loads(storage.read_bytes(f"{run_path}/{run_folder.DONE_FILE}"))["epochs"] == 2

    assert train(*storage_args, "train.epochs=2") == 0
    assert "already finished" in capsys.readouterr().err
    assert checkpoint.latest(storage, run_path).step == final.step


def test_engine_without_ray_matches_one_ray_worker(ray_cluster, tmp_path):
    common = [*SMALL, "train.epochs=1", "train.max_steps_per_epoch=2", "scaling.num_workers=1",
              "scaling.torch_threads=1"]
    assert train(*common[len(SMALL):], f"storage.uri={tmp_path / 'ray'}") == 0
    job = load_job("jobs/quickstart.yaml", [*common, f"storage.uri={tmp_path / 'local'}"])
    loop.run(job, LocalSession("cpu"))

    def first_loss(uri):
        storage = open_storage(uri)
        history = checkpoint.load(storage, checkpoint.latest(storage, storage.path("quickstart"))).history
        return next(r["train/step_loss"] for r in history if r["step"] == 1 and "train/step_loss" in r)

    assert first_loss(str(tmp_path / "ray")) == pytest.approx(first_loss(str(tmp_path / "local")), rel=1e-6)


def test_a_user_error_on_a_worker_comes_back_as_one_line(ray_cluster, tmp_path, capsys):
    # a finished 1-step run whose every checkpoint is then damaged: the worker can't resume
    common = [*SMALL, "train.max_steps_per_epoch=1", "scaling.num_workers=1", f"storage.uri={tmp_path}"]
    assert train(*common, "train.epochs=1") == 0
    damaged = list((tmp_path / "quickstart/checkpoints").rglob("model.safetensors"))  # in each step's attempt
    assert damaged
    for weights in damaged:
        weights.write_bytes(b"damaged")
    capsys.readouterr()
    assert train(*common, "train.epochs=2", "failure.max_failures=0") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no usable checkpoint" in errors[0] and "sha256" in errors[0]
