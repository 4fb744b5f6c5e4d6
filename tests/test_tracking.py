"""Tracking: TensorBoard event files in the run's storage (read back by TensorBoard's own loader, from a
folder and from s3:// on a moto server), an MLflow run on a local file:// store, and rank 0's progress line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
from test_engine import tiny_job

from segjob.engine import loop
from segjob.engine.session import LocalSession
from segjob.engine.tracking import ProgressLine, check_mlflow, tensorboard
from segjob.errors import UserError
from segjob.store import checkpoint
from segjob.store.storage import open_storage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train(uri: str, endpoint_url: str | None = None, **train_keys) -> list[dict]:
    job = tiny_job(uri, **train_keys)
    job = job.model_copy(update={"storage": job.storage.model_copy(update={"endpoint_url": endpoint_url})})
    loop.run(job, LocalSession("cpu"))
    storage = open_storage(uri, endpoint_url)
    return checkpoint.load(storage, checkpoint.latest(storage, storage.path("tiny"))).history


def tensorboard_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard itself reads from a folder of event files (its EventAccumulator, as `--logdir` does)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(logdir, size_guidance={"scalars": 0})  # 0: keep every point
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def history_points(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in history if key in r]


def test_tensorboard_shows_the_history_a_resumed_run_checkpointed(tmp_path):
    train(str(tmp_path), epochs=1)
    files_after_one_epoch = sorted((tmp_path / "tiny" / tensorboard.FOLDER).iterdir())
    history = train(str(tmp_path), epochs=2)  # resumes: only what follows the resumed step is written again

    files = sorted((tmp_path / "tiny" / tensorboard.FOLDER).iterdir())
    assert files[:len(files_after_one_epoch)] == files_after_one_epoch  # nothing rewritten: object stores can't
    assert len(files) > len(files_after_one_epoch)
    seen = tensorboard_scalars(str(tmp_path / "tiny" / tensorboard.FOLDER))
    for key in ("val/miou", "val/loss", "train/loss", "lr", "train/step_loss", "val/pixel_acc", "train/images_per_s"):
        expected = history_points(history, key)
        assert expected, key
        assert [step for step, _ in seen[key]] == [step for step, _ in expected], key
        assert [value for _, value in seen[key]] == pytest.approx([value for _, value in expected], rel=1e-6), key
    assert len(seen["val/miou"]) == 2  # one point per epoch
    assert any(tag.startswith("val/iou/") for tag in seen)  # every metric, per class too


def test_tensorboard_off_writes_nothing(tmp_path):
    job = tiny_job(str(tmp_path), epochs=1)
    job = job.model_copy(update={"tracking": job.tracking.model_copy(update={"tensorboard": False})})
    loop.run(job, LocalSession("cpu"))
    assert not (tmp_path / "tiny" / tensorboard.FOLDER).exists()


def test_tensorboard_reads_the_event_files_from_s3(s3_endpoint, s3_bucket):
    """The run on the moto server, read back by TensorBoard through s3:// with a custom endpoint. Its S3
    filesystem takes the endpoint from S3_ENDPOINT when tensorboard is imported: a process of its own."""
    history = train(f"s3://{s3_bucket}/runs", s3_endpoint, epochs=1)
    code = textwrap.dedent(f"""
        import json
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        folder = "s3://{s3_bucket}/runs/tiny/{tensorboard.FOLDER}"
        accumulator = EventAccumulator(folder, size_guidance={{"scalars": 0}})
        accumulator.Reload()
        print(json.dumps({{tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
                          for tag in accumulator.Tags()["scalars"]}}))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90,
                            env={**os.environ, "S3_ENDPOINT": s3_endpoint})
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert [step for step, _ in seen["val/miou"]] == [step for step, _ in history_points(history, "val/miou")]
    assert len(seen["train/step_loss"]) == len(history_points(history, "train/step_loss"))


def test_an_unwritable_tensorboard_folder_never_stops_training(tmp_path, caplog):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / tensorboard.FOLDER).write_text("a file where the folder should be")
    train(str(tmp_path), epochs=1)  # finishes
    warnings = [r for r in caplog.records if "could not upload TensorBoard events" in r.getMessage()]
    assert len(warnings) == 1  # said once, not per epoch


# --- MLflow ------------------------------------------------------------------------------


def mlflow_job(tmp_path, epochs: int):
    job = tiny_job(str(tmp_path / "runs"), epochs=epochs)
    tracking = job.tracking.model_copy(update={"mlflow_uri": (tmp_path / "mlruns").as_uri(),
                                               "mlflow_experiment": "tests", "tensorboard": False})
    return job.model_copy(update={"tracking": tracking})


def test_mlflow_run_on_a_local_file_store_continues_on_resume(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store for opt-in users
    loop.run(mlflow_job(tmp_path, 1), LocalSession("cpu"))
    loop.run(mlflow_job(tmp_path, 2), LocalSession("cpu"))  # resumes: the same MLflow run goes on

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "unet" and run.data.params["optim.lr"] == "0.01"
    storage = open_storage(str(tmp_path / "runs"))
    history = checkpoint.load(storage, checkpoint.latest(storage, storage.path("tiny"))).history
    for key in ("val/miou", "val/dice", "val/dice/background", "train/step_loss", "lr"):  # "/" is "." on a file store
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key.replace("/", ".")))
        expected = history_points(history, key)
        assert [step for step, _ in logged] == [step for step, _ in expected], key
        assert [value for _, value in logged] == pytest.approx([value for _, value in expected]), key


def test_mlflow_missing_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets where it is not installed
    with pytest.raises(UserError, match=r"^tracking.mlflow_uri is set but mlflow is not installed here; pip install"):
        check_mlflow(mlflow_job(tmp_path, 1))
    with pytest.raises(UserError, match="tracking.mlflow_uri"):
        loop.run(mlflow_job(tmp_path, 1), LocalSession("cpu"))


# --- the progress line -------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_is_rate_limited_and_says_speed_and_time_left(caplog):
    caplog.set_level(logging.INFO, logger="segjob")
    clock = Clock()
    line = ProgressLine(30.0, epoch=2, epochs=12, steps_per_epoch=100, global_batch=32, first_step=10, clock=clock)
    losses = []
    clock.now += 29.0
    assert line.after_step(15, lambda: losses.append(1) or 0.5) is None
    assert losses == []  # the loss is not even read when no line is due
    clock.now += 1.0  # 30 s for 10 steps of 32 images since the epoch (resumed at step 10) began
    said = line.after_step(20, lambda: 0.4121)
    assert said == ("epoch 3/12  step 20/100 of the epoch  train/step_loss 0.4121  10.7 img/s  "
                    "epoch ends in 4m 00s")
    assert caplog.messages[-1] == said
    clock.now += 10.0
    assert line.after_step(25, lambda: 0.4) is None  # 10 s after the last line
    clock.now += 20.0
    assert "5.3 img/s" in line.after_step(25, lambda: 0.4)  # 5 steps x 32 in the 30 s since the last line
    clock.now += 60.0
    assert line.after_step(100, lambda: 0.4) is None  # the epoch's own line follows its last step


def test_progress_every_zero_is_off():
    clock = Clock()
    line = ProgressLine(0.0, epoch=0, epochs=1, steps_per_epoch=100, global_batch=8, first_step=0, clock=clock)
    clock.now += 3600
    assert line.after_step(50, lambda: 0.1) is None
