"""train.ema: the moving average of the weights is computed as torch's AveragedModel computes it, evaluated
(val_ema/...), checkpointed (ema.safetensors, verified like the rest), resumed exactly, ranked by the job's
metric, and used by evaluate/predict (and ranked by pull) unless --raw-weights. One plain process, no Ray."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from test_engine import CrashAfter, tiny_job
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from segjob.engine import loop
from segjob.engine.committer import Committer
from segjob.engine.session import LocalSession
from segjob.errors import UserError
from segjob.job.schema import EmaConfig, JobConfig
from segjob.job.sweep import load_sweep
from segjob.learning.ema import WeightAverage
from segjob.pull import main as pull
from segjob.results.trained import choose_checkpoint, load_trained
from segjob.store import checkpoint
from segjob.store.storage import Storage, open_storage

EMA = {"decay": 0.9, "warmup_steps": 10}


def conv_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def train_steps(model: nn.Module, steps: int, after_step) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        loss = model(torch.randn(2, 3, 8, 8, generator=generator)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after_step(step)


def latest(uri: str) -> checkpoint.LoadedCheckpoint:
    storage = open_storage(uri)
    return checkpoint.load(storage, checkpoint.latest(storage, storage.path("tiny")))


def assert_same_state(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name  # bit-identical on CPU


# --- the average itself -----------------------------------------------------------------


def test_the_average_is_torch_averaged_model_with_buffers():
    """Without warm-up, every floating tensor (weights and BatchNorm statistics) equals AveragedModel(use_buffers=True)
    with torch's EMA function, bit for bit; the count of batches BatchNorm tracked is copied, not averaged."""
    model = conv_bn()
    ours = WeightAverage(model, EmaConfig(decay=0.8, warmup_steps=0))
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    train_steps(model, 7, lambda step: (ours.after_step(model, step), theirs.update_parameters(model)))

    averaged, reference, current = ours.model.state_dict(), theirs.module.state_dict(), model.state_dict()
    assert ours.updates == 7
    for name, tensor in averaged.items():
        if tensor.is_floating_point():
            assert torch.equal(tensor, reference[name]), name
        else:
            assert torch.equal(tensor, current[name]), name
    for name in ("0.weight", "1.weight", "1.running_mean", "1.running_var", "3.weight"):  # 0.bias: BatchNorm undoes it
        assert not torch.equal(averaged[name], current[name]), f"{name} is not averaged"
    assert not ours.model.training and not any(p.requires_grad for p in ours.model.parameters())


def test_the_decay_warms_up_and_updates_come_every_n_steps():
    model = conv_bn()
    average = WeightAverage(model, EmaConfig(decay=0.99, warmup_steps=10, update_every_steps=3))
    decays = []
    for step in range(1, 13):
        if step % 3 == 0:
            decays.append(average.decay())
        average.after_step(model, step)
    assert average.updates == 4, "steps 3, 6, 9, 12"
    assert decays == [0.0, 2 / 11, 3 / 12, 4 / 13], "a copy first, then min(decay, (1 + n) / (10 + n))"
    late = WeightAverage(model, EmaConfig(decay=0.9, warmup_steps=10))
    late.updates = 1000
    assert late.decay() == 0.9
    assert WeightAverage(model, EmaConfig(decay=0.9, warmup_steps=0)).decay() == 0.0  # the first update copies


def test_ema_is_off_by_default_and_its_keys_are_checked():
    job = JobConfig(name="x")
    assert not job.train.ema.enabled and job.ranked_metric == "val/miou"
    on = JobConfig(name="x", train={"ema": {"decay": 0.999}})
    assert on.ranked_metric == "val_ema/miou" and on.metric.name == "val/miou"
    assert JobConfig(name="x", train={"ema": {"decay": 0.999}}, metric={"name": "val/loss"}).ranked_metric \
        == "val_ema/loss"
    assert JobConfig(name="x", train={"ema": {"decay": 0.999}}, metric={"name": "train/loss"}).ranked_metric \
        == "train/loss", "only validation figures have an EMA twin"
    with pytest.raises(ValueError, match="less than 1"):
        JobConfig(name="x", train={"ema": {"decay": 1.0}})


# --- in the engine ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run with EMA, shared by the tests below."""
    uri = str(tmp_path_factory.mktemp("ema-reference"))
    session = LocalSession("cpu")
    metrics = loop.run(tiny_job(uri, ema=EMA), session)
    return uri, session, metrics


def test_both_scores_are_reported_and_the_average_is_checkpointed(reference):
    uri, session, metrics = reference
    for key in ("val/miou", "val/loss", "val_ema/miou", "val_ema/loss", "val_ema/iou/background"):
        assert isinstance(metrics[key], float), key
    assert metrics["val/miou"] != metrics["val_ema/miou"], "the average is scored, not the trained weights again"
    loaded = latest(uri)
    epochs = [record for record in loaded.history if record.get("checkpoint") == "epoch"]
    assert len(epochs) == 2 and all("val/miou" in r and "val_ema/miou" in r for r in epochs), "the history keeps both"

    storage = open_storage(uri)
    info = checkpoint.latest(storage, storage.path("tiny"))
    assert set(info.meta["files"]) == {*checkpoint.PAYLOAD_FILES, checkpoint.EMA_FILE}
    assert loaded.train_state["ema"] == {"updates": 12}, "one update per step"
    assert loaded.ema_state.keys() == loaded.model_state.keys()
    assert any(not torch.equal(loaded.ema_state[k], loaded.model_state[k]) for k in loaded.model_state)
    assert checkpoint.verify(storage, info) is None


def test_a_damaged_average_fails_verification(reference, tmp_path):
    uri, _, _ = reference
    storage = open_storage(uri)
    info = checkpoint.latest(storage, storage.path("tiny"))
    copy = tmp_path / "copy"
    checkpoint.fetch(storage, info.path, copy)
    (copy / checkpoint.EMA_FILE).write_bytes(b"\0" * (copy / checkpoint.EMA_FILE).stat().st_size)
    with pytest.raises(UserError, match=r"ema\.safetensors: sha256 does not match meta\.json"):
        checkpoint.load_folder(copy)
    local = open_storage(str(tmp_path))
    copied = checkpoint.CheckpointInfo(local.path("copy"), info.name, info.step, info.epoch, info.metrics, info.meta)
    assert "ema.safetensors: sha256 does not match" in checkpoint.verify(local, copied)


def test_resume_mid_epoch_gives_the_same_average_bit_for_bit(reference, tmp_path):
    reference_uri, _, _ = reference
    uri = str(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        loop.run(tiny_job(uri, ema=EMA), CrashAfter(reports=3))  # dies after step 8, mid-epoch 2
    loop.run(tiny_job(uri, ema=EMA), LocalSession("cpu"))
    expected, actual = latest(reference_uri), latest(uri)
    assert_same_state(expected.model_state, actual.model_state)
    assert_same_state(expected.ema_state, actual.ema_state)
    assert actual.train_state["ema"] == expected.train_state["ema"]

    def strip(records):
        return [{k: v for k, v in r.items() if k != "train/images_per_s"} for r in records]

    assert strip(actual.history) == strip(expected.history), "val_ema/... included"


def test_ema_turned_on_for_a_run_without_one_starts_at_its_weights(tmp_path, caplog):
    uri = str(tmp_path)
    loop.run(tiny_job(uri, epochs=1), LocalSession("cpu"))
    before = latest(uri)
    assert before.ema_state is None and checkpoint.EMA_FILE not in before.meta["files"]
    with caplog.at_level(logging.INFO, logger="segjob"):
        worker = loop.setup(tiny_job(uri, epochs=2, ema=EMA), LocalSession("cpu"))
    assert "holds no EMA of the weights: the average starts at its weights" in caplog.text
    assert worker.ema.updates == 0
    assert_same_state(before.model_state, worker.ema.model.state_dict())
    worker.committer.close()
    worker.watcher.stop()


# --- ranking: retention, sweeps, pull, evaluate/predict ---------------------------------


def ema_job(name: str, uri: str) -> dict:
    return JobConfig(name=name, train={"ema": {"decay": 0.99}}, storage={"uri": uri}).model_dump(mode="json")


def commit(storage: Storage, run_path: str, job: dict, step: int, raw: float, ema: float) -> None:
    """A tiny checkpoint whose trained and averaged weights score differently (each holds its own weights)."""
    metrics = {"epoch": step, "step": step, "val/miou": raw, "val_ema/miou": ema}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint.write_local(folder, {"weight": torch.full((2,), float(step))}, {"progress": {"step": step}},
                               [metrics], ema_state={"weight": torch.full((2,), -float(step))})
        meta = checkpoint.build_meta(folder, job=job, step=step, epoch=step, metrics=metrics, reason="epoch")
        checkpoint.commit(storage, run_path, folder, meta)


# step -> (val/miou of the trained weights, val_ema/miou of their average): each ranks another one best
SCORES = {1: (0.5, 0.1), 2: (0.2, 0.6), 3: (0.3, 0.2)}


def write_run(uri: str, name: str = "run") -> Storage:
    storage = open_storage(uri)
    for step, (raw, ema) in SCORES.items():
        commit(storage, storage.path(name), ema_job(name, uri), step, raw, ema)
    return storage


def test_retention_keeps_the_best_average(tmp_path):
    storage = write_run(str(tmp_path))
    job = JobConfig.model_validate({**ema_job("run", str(tmp_path)), "storage": {"uri": str(tmp_path), "keep_best": 1}})
    committer = Committer(job, LocalSession("cpu"), storage, storage.path("run"))
    committer._apply_retention(3)
    committer.close()
    assert [info.step for info in checkpoint.list_committed(storage, storage.path("run"))] == [2, 3], \
        "best by val_ema/miou (step 2, not step 1's val/miou) and the newest"


def test_pull_ranks_by_the_average_unless_raw_weights(tmp_path, capsys):
    write_run(str(tmp_path / "runs"))
    assert pull([str(tmp_path / "runs" / "run"), "--list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "val_ema/miou" in table[0] and [line.split()[2] for line in table[1:]] == [
        "step-000000002", "step-000000003", "step-000000001"]
    assert pull([str(tmp_path / "runs" / "run"), "--list", "--raw-weights"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "val/miou" in table[0] and [line.split()[2] for line in table[1:]] == [
        "step-000000001", "step-000000003", "step-000000002"]


def test_a_run_folder_gives_the_best_average_unless_raw_weights(tmp_path):
    storage = write_run(str(tmp_path))
    assert f"/{checkpoint.checkpoint_name(2)}/" in choose_checkpoint(storage, storage.path("run"))
    assert f"/{checkpoint.checkpoint_name(1)}/" in choose_checkpoint(storage, storage.path("run"), raw_weights=True)


def test_evaluate_and_predict_load_the_average_unless_raw_weights(reference):
    uri, _, _ = reference
    storage = open_storage(uri)
    committed = checkpoint.list_committed(storage, storage.path("tiny"))
    [best] = checkpoint.select_best(committed, "val_ema/miou", "max")
    loaded = checkpoint.load(storage, best)
    trained = load_trained(str(Path(uri) / "tiny"), device="cpu")
    assert trained.weights == "ema" and trained.meta["step"] == best.step
    assert_same_state(loaded.ema_state, trained.model.state_dict())
    raw = load_trained(best.path, device="cpu", raw_weights=True)
    assert raw.weights == "trained"
    assert_same_state(loaded.model_state, raw.model.state_dict())


def test_a_sweep_ranks_the_average_and_refuses_a_space_that_turns_it_off(tmp_path):
    path = tmp_path / "sweep.yaml"
    sweep = {"data": {"name": "synthetic", "num_classes": 2, "image_size": 32},
             "model": {"name": "unet", "base_channels": 4, "depth": 2},
             "train": {"ema": {"decay": 0.99}}, "storage": {"uri": str(tmp_path / "runs")},
             "tune": {"space": {"optim.lr": {"loguniform": [0.001, 0.1]}}}}
    path.write_text(yaml.safe_dump(sweep))
    loaded = load_sweep(path)
    assert loaded.metric == "val_ema/miou"
    assert loaded.trial_job("t1", {"optim.lr": 0.01}).metric.name == "val/miou"
    with pytest.raises(UserError, match="turns train.ema off while the sweep ranks val_ema/miou"):
        load_sweep(path, ["tune.space.train.ema.decay={choice: [0.0, 0.99]}"])


# --- under DDP: two ranks, gloo on 127.0.0.1, no Ray ----------------------------------------


class RankSession(LocalSession):
    """One rank of a torch.distributed group (what RaySession is on Ray Train), reports kept."""

    def __init__(self, rank: int, world_size: int):
        super().__init__("cpu")
        self.rank, self.world_size = rank, world_size


def train_rank(rank: int, port: int, uri: str, out: str) -> None:
    """One rank: an epoch with EMA; then its trained and averaged state, as this rank holds them."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        job = tiny_job(uri, epochs=1, ema=EMA, checkpoint_every_steps=0)
        job = job.model_copy(update={"scaling": job.scaling.model_copy(update={"num_workers": 2})})
        worker = loop.setup(job, RankSession(rank, 2))
        try:
            metrics = loop.train_one_epoch(worker, 0)
        finally:
            worker.committer.close()
            worker.watcher.stop()
        assert "val_ema/miou" in metrics
        torch.save({"trained": worker.model.state_dict(), "ema": worker.ema.model.state_dict()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_rank_holds_and_scores_the_same_average(tmp_path):
    """DDP keeps the parameters equal, so their averages are equal with no collective; BatchNorm statistics are
    each rank's own, and the broadcast before evaluation makes the averaged ones rank 0's on every rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:  # a free port on the loopback for the group's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(train_rank, args=(port, str(tmp_path / "runs"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert_same_state(ranks[0]["ema"], ranks[1]["ema"])
    statistics = [name for name in ranks[0]["trained"] if "running_" in name]
    assert any(not torch.equal(ranks[0]["trained"][name], ranks[1]["trained"][name]) for name in statistics), \
        "each rank's own BatchNorm statistics differ: the broadcast is what makes the averaged ones equal"
    parameters = [name for name in ranks[0]["trained"] if "running_" not in name and "num_batches" not in name]
    assert_same_state(*({name: rank["trained"][name] for name in parameters} for rank in ranks))
    storage = open_storage(str(tmp_path / "runs"))
    saved = checkpoint.load(storage, checkpoint.latest(storage, storage.path("tiny")))
    assert_same_state(ranks[0]["ema"], saved.ema_state)


def test_report_draws_the_average_beside_the_trained_weights(reference, tmp_path, monkeypatch):
    from segjob import report
    from segjob.results import figures

    drawn = {}
    real_line_plot = figures.line_plot

    def line_plot(curves, title, ylabel, **options):
        drawn[ylabel] = [curve.label for curve in curves]
        return real_line_plot(curves, title, ylabel, **options)

    monkeypatch.setattr(figures, "line_plot", line_plot)
    report.learning_curves(latest(reference[0]).history, tmp_path, "tiny")
    assert {"val/loss", "val_ema/loss"} <= set(drawn["loss"]) and {"val/miou", "val_ema/miou"} <= set(drawn["IoU"])
