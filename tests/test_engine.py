"""The engine in one plain process (no Ray): it trains, checkpoints, and resumes exactly."""

import json
import types

import pytest
import torch

from segjob.engine import loop
from segjob.engine.session import LocalSession
from segjob.job.schema import JobConfig
from segjob.store import checkpoint, run_folder
from segjob.store.storage import open_storage


def tiny_job(storage_uri: str, data: dict | None = None, **train) -> JobConfig:
    return JobConfig.model_validate({
        "name": "tiny",
        "seed": 3,
        "data": {"name": "synthetic", "num_classes": 3, "train_samples": 48, "val_samples": 10, "image_size": 32}
        | (data or {}),
        "model": {"name": "unet", "base_channels": 4, "depth": 2},
        "optim": {"name": "adam", "lr": 0.01, "schedule": {"name": "poly"}},
        "train": {"epochs": 2, "batch_size": 8, "checkpoint_every_steps": 4, "log_every_steps": 1} | train,
        "scaling": {"num_workers": 1, "torch_threads": 1},
        "storage": {"uri": storage_uri, "keep_best": 1},
        "preemption": {"aws_metadata_url": None, "gcp_metadata_url": None},  # tests talk to 127.0.0.1 only
    })


class CrashAfter(LocalSession):
    """A session whose process 'dies' right after the n-th report (its checkpoint is committed)."""

    def __init__(self, reports: int):
        super().__init__("cpu")
        self.remaining = reports

    def report(self, metrics, checkpoint_path):
        super().report(metrics, checkpoint_path)
        self.remaining -= 1
        if self.remaining == 0:
            raise KeyboardInterrupt("simulated crash")


def final_weights(storage_uri: str) -> dict[str, torch.Tensor]:
    storage = open_storage(storage_uri)
    return checkpoint.load(storage, checkpoint.latest(storage, storage.path("tiny"))).model_state


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run shared by the tests below."""
    uri = str(tmp_path_factory.mktemp("reference"))
    session = LocalSession("cpu")
    metrics = loop.run(tiny_job(uri), session)
    return uri, session, metrics


def test_a_run_reports_flat_metrics_and_commits_checkpoints(reference):
    uri, session, metrics = reference
    steps_per_epoch = 48 // 8
    assert metrics["epoch"] == 2 and metrics["step"] == 2 * steps_per_epoch
    for key in ("train/loss", "val/loss", "val/miou", "val/pixel_acc", "val/iou/background", "lr"):
        assert isinstance(metrics[key], float), key
    # one report per mid-epoch checkpoint (step 4) and one per epoch end, each with a committed folder
    assert [m["step"] for m, _ in session.reports] == [4, 6, 8, 12]
    assert all(path for _, path in session.reports)
    storage = open_storage(uri)
    done = json.loads(storage.read_bytes(storage.path("tiny", run_folder.DONE_FILE)))
    assert done["epochs"] == 2 and done["step"] == 12
    # retention: best 1 by val/miou plus the newest
    assert 1 <= len(checkpoint.list_committed(storage, storage.path("tiny"))) <= 2


def test_resume_mid_epoch_ends_with_identical_weights_and_history(reference, tmp_path):
    reference_uri, reference_session, _ = reference
    uri = str(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        loop.run(tiny_job(uri), CrashAfter(reports=3))  # dies after step 8, mid-epoch 2
    resumed = LocalSession("cpu")
    loop.run(tiny_job(uri), resumed)
    assert [m["step"] for m, _ in resumed.reports] == [12], "finished steps are not repeated"

    expected, actual = final_weights(reference_uri), final_weights(uri)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name  # bit-identical on CPU

    storage, reference_storage = open_storage(uri), open_storage(reference_uri)
    history = checkpoint.load(storage, checkpoint.latest(storage, storage.path("tiny"))).history
    reference_history = checkpoint.load(
        reference_storage, checkpoint.latest(reference_storage, reference_storage.path("tiny"))
    ).history

    def strip(records):
        return [{k: v for k, v in r.items() if k != "train/images_per_s"} for r in records]

    assert strip(history) == strip(reference_history)
    steps = [r["step"] for r in history if "train/step_loss" in r]
    assert steps == list(range(1, 13)), "no duplicated or missing steps in the history"


def test_a_finished_run_trains_no_further(reference):
    uri, _, _ = reference
    session = LocalSession("cpu")
    loop.run(tiny_job(uri), session)
    assert session.reports == []


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_a_short_run_commits_to_object_storage(store, request):
    endpoint = request.getfixturevalue(f"{store}_endpoint")
    bucket = request.getfixturevalue(f"{store}_bucket")
    uri = f"{'s3' if store == 's3' else 'gs'}://{bucket}/runs"
    job = tiny_job(uri, epochs=1, max_steps_per_epoch=2, checkpoint_every_steps=0)
    job = job.model_copy(update={"storage": job.storage.model_copy(update={"endpoint_url": endpoint})})
    loop.run(job, LocalSession("cpu"))
    storage = open_storage(uri, endpoint_url=endpoint)
    [info] = checkpoint.list_committed(storage, storage.path("tiny"))
    assert info.step == 2 and "val/miou" in info.metrics
    checkpoint.load(storage, info, expected_run="tiny")


def test_bf16_autocast_and_gradient_accumulation(tmp_path):
    session = LocalSession("cpu")
    metrics = loop.run(tiny_job(str(tmp_path), epochs=1, amp="bf16", grad_accum_steps=2, checkpoint_every_steps=0),
                       session)
    assert metrics["step"] == 48 // 8 // 2, "one optimizer step per two micro-batches"
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_fp16_without_a_gpu_is_a_clear_error(tmp_path):
    from segjob.errors import UserError

    with pytest.raises(UserError, match="fp16 needs a GPU"):
        loop.run(tiny_job(str(tmp_path), amp="fp16"), LocalSession("cpu"))


def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(tmp_path, caplog):
    uri = str(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        # reports at steps 4, 6 (epoch end, kept as best) and 8 (mid-epoch, kept as newest)
        loop.run(tiny_job(uri), CrashAfter(reports=3))
    storage = open_storage(uri)
    assert [i.step for i in checkpoint.list_committed(storage, storage.path("tiny"))] == [6, 8]
    newest = checkpoint.latest(storage, storage.path("tiny"))
    storage.write_bytes(f"{newest.path}/{checkpoint.MODEL_FILE}", b"garbage")
    worker = loop.setup(tiny_job(uri), LocalSession("cpu"))
    assert (worker.progress.epoch, worker.progress.step, worker.progress.position) == (1, 6, 0)
    assert "cannot resume from step-000000008" in caplog.text
    assert f"{newest.path}/model.safetensors: sha256 does not match" in caplog.text


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    from segjob.errors import UserError

    uri = str(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        loop.run(tiny_job(uri, epochs=1), CrashAfter(reports=1))
    bigger = tiny_job(uri, epochs=1)
    bigger = bigger.model_copy(update={"model": bigger.model.model_copy(update={"base_channels": 8})})
    with pytest.raises(UserError, match="no usable checkpoint .* weights don't fit this job's model"):
        loop.setup(bigger, LocalSession("cpu"))


def test_an_auxiliary_head_adds_its_weighted_loss():
    """PSPNet-style outputs: loss(out) + aux_weight x loss(aux), with the job's own loss for both."""
    job = types.SimpleNamespace(model=types.SimpleNamespace(aux_weight=0.4))
    worker = types.SimpleNamespace(job=job, loss_fn=torch.nn.CrossEntropyLoss())
    generator = torch.Generator().manual_seed(0)
    out, aux = torch.randn(2, 3, 5, 5, generator=generator), torch.randn(2, 3, 5, 5, generator=generator)
    target = torch.randint(0, 3, (2, 5, 5), generator=generator)
    expected = worker.loss_fn(out, target) + job.model.aux_weight * worker.loss_fn(aux, target)
    torch.testing.assert_close(loop.training_loss(worker, {"out": out, "aux": aux}, target), expected)
    torch.testing.assert_close(loop.training_loss(worker, out, target), worker.loss_fn(out, target))


def test_mixup_and_cutmix_batches_train_and_resume_exactly(reference, tmp_path):
    """Mixed batches (soft targets) train, and a resumed run mixes each batch as the uninterrupted one did."""
    mixing = {"mixing": {"mixup": 0.5, "cutmix": 0.5, "alpha": 1.0}}
    loop.run(tiny_job(str(tmp_path / "whole"), data=mixing), LocalSession("cpu"))
    with pytest.raises(KeyboardInterrupt):
        loop.run(tiny_job(str(tmp_path / "cut"), data=mixing), CrashAfter(reports=2))
    loop.run(tiny_job(str(tmp_path / "cut"), data=mixing), LocalSession("cpu"))
    expected, actual = final_weights(str(tmp_path / "whole")), final_weights(str(tmp_path / "cut"))
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    unmixed = final_weights(reference[0])
    assert any(not torch.equal(unmixed[name], expected[name]) for name in expected), "the job's mixing changed nothing"
