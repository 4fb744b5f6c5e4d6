"""Checkpoint folders: save -> commit -> list -> load, refusal of damage, retention."""

import json
import pickle
from pathlib import Path

import pytest
import torch

from segjob.errors import UserError
from segjob.store import checkpoint
from segjob.store.storage import open_storage


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


def make_checkpoint(storage, run_path, tmp_path: Path, step: int, miou: float | None,
                    run: str = "run") -> checkpoint.CheckpointInfo:
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 3, 8, 8)).sum().backward()
    optimizer.step()
    folder = tmp_path / f"local-{step}"
    train_state = {"optimizer": optimizer.state_dict(), "progress": {"epoch": 1, "step": step, "position": 0},
                   "rng": {"python": (3, tuple(range(5)), None), "torch": torch.get_rng_state()}}
    history = [{"step": s, "train/loss": 1.0 / s} for s in range(1, step + 1)]
    checkpoint.write_local(folder, model.state_dict(), train_state, history)
    metrics = {"epoch": 1, "step": step} | ({"val/miou": miou} if miou is not None else {})
    meta = checkpoint.build_meta(folder, job={"name": run}, step=step, epoch=1, metrics=metrics, reason="test")
    return checkpoint.commit(storage, run_path, folder, meta)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "runs"))
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/runs", endpoint_url=endpoint)


def test_round_trip_restores_weights_state_and_history(storage, tmp_path):
    run_path = storage.path("run")
    info = make_checkpoint(storage, run_path, tmp_path, step=3, miou=0.5)
    [listed] = checkpoint.list_committed(storage, run_path)
    assert (listed.name, listed.step, listed.metrics["val/miou"]) == (info.name, 3, 0.5)

    loaded = checkpoint.load(storage, listed, expected_run="run")
    reference = tiny_model()
    reference.load_state_dict(loaded.model_state)  # strict: every key, every shape
    assert loaded.train_state["progress"]["step"] == 3
    assert loaded.train_state["rng"]["python"] == (3, tuple(range(5)), None)
    assert [r["step"] for r in loaded.history] == [1, 2, 3]
    assert set(loaded.meta["files"]) == set(checkpoint.PAYLOAD_FILES)


def test_folder_without_meta_is_not_listed_and_is_cleaned(storage, tmp_path):
    run_path = storage.path("run")
    make_checkpoint(storage, run_path, tmp_path, step=1, miou=0.1)
    partial = f"{checkpoint.checkpoints_path(run_path)}/{checkpoint.checkpoint_name(2)}"
    storage.write_bytes(f"{partial}/{checkpoint.MODEL_FILE}", b"half an upload")
    assert [i.step for i in checkpoint.list_committed(storage, run_path)] == [1]
    assert checkpoint.latest(storage, run_path).step == 1
    # grace_s=0: no upload can be running here (by default cleanup spares what was written within the hour)
    assert checkpoint.remove_uncommitted(storage, run_path, grace_s=0) == [checkpoint.checkpoint_name(2)]
    assert not storage.exists(partial)
    assert [i.step for i in checkpoint.list_committed(storage, run_path)] == [1]


def test_retention_keeps_best_k_and_newest(storage, tmp_path):
    run_path = storage.path("run")
    for step, miou in [(1, 0.2), (2, 0.9), (3, 0.5), (4, 0.7), (5, None)]:
        make_checkpoint(storage, run_path, tmp_path, step=step, miou=miou)
    removed = checkpoint.apply_retention(storage, run_path, keep_best=2, metric="val/miou", mode="max")
    assert sorted(removed) == [checkpoint.checkpoint_name(1), checkpoint.checkpoint_name(3)]
    assert [i.step for i in checkpoint.list_committed(storage, run_path)] == [2, 4, 5]
    best = checkpoint.select_best(checkpoint.list_committed(storage, run_path), "val/miou", "max")
    assert best[0].step == 2
    assert checkpoint.select_best(checkpoint.list_committed(storage, run_path), "val/miou", "min")[0].step == 4


def local_checkpoint(tmp_path) -> Path:
    storage = open_storage(str(tmp_path / "runs"))
    info = make_checkpoint(storage, storage.path("run"), tmp_path, step=2, miou=0.3)
    return Path(info.path)


def test_tampered_weights_are_refused(tmp_path):
    folder = local_checkpoint(tmp_path)
    data = bytearray((folder / checkpoint.MODEL_FILE).read_bytes())
    data[-1] ^= 0xFF
    (folder / checkpoint.MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"model\.safetensors: sha256 does not match"):
        checkpoint.load_folder(folder)


def test_truncated_and_missing_files_are_refused(tmp_path):
    folder = local_checkpoint(tmp_path)
    (folder / checkpoint.HISTORY_FILE).write_bytes((folder / checkpoint.HISTORY_FILE).read_bytes()[:10])
    with pytest.raises(UserError, match="history.jsonl: sha256"):
        checkpoint.load_folder(folder)
    (folder / checkpoint.HISTORY_FILE).unlink()
    with pytest.raises(UserError, match="history.jsonl: missing"):
        checkpoint.load_folder(folder)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_payload_in_state_is_refused_even_with_matching_hash(tmp_path):
    folder = local_checkpoint(tmp_path)
    (folder / checkpoint.STATE_FILE).write_bytes(pickle.dumps({"optimizer": Payload()}))
    meta = json.loads((folder / checkpoint.META_FILE).read_text())
    meta["files"][checkpoint.STATE_FILE]["sha256"] = checkpoint._sha256(folder / checkpoint.STATE_FILE)
    meta["files"][checkpoint.STATE_FILE]["bytes"] = (folder / checkpoint.STATE_FILE).stat().st_size  # consistent
    (folder / checkpoint.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"state\.pt: refused by the safe loader"):
        checkpoint.load_folder(folder)


def test_meta_from_another_run_or_malformed_is_refused(tmp_path):
    folder = local_checkpoint(tmp_path)
    with pytest.raises(UserError, match="belongs to run 'run', not 'other'"):
        checkpoint.load_folder(folder, expected_run="other")
    meta = json.loads((folder / checkpoint.META_FILE).read_text())
    meta["files"]["../../etc/passwd"] = {"sha256": "0"}
    (folder / checkpoint.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="must list exactly"):
        checkpoint.load_folder(folder)
    (folder / checkpoint.META_FILE).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        checkpoint.load_folder(folder)
