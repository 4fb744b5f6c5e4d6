"""A sweep whose saved Tune state names segjob's old module paths: one line that says to start it again.

Tune pickles its callbacks, searcher and scheduler by module path into the sweep's tuner.pkl; the
flat layout's `segjob.tune.SweepProgress` lives in `segjob.cluster.tuner` now. No Ray instance is
needed to read the state; the command's test runs on the suite's shared one.
"""

from __future__ import annotations

import pickle

import pytest
import yaml

from segjob import tune
from segjob.cluster import tuner
from segjob.errors import UserError
from segjob.job.sweep import load_sweep
from segjob.store.storage import open_storage

SWEEP = {
    "name": "old_sweep",
    "data": {"name": "synthetic", "num_classes": 2, "image_size": 32, "train_samples": 4, "val_samples": 2},
    "model": {"name": "unet", "base_channels": 8, "depth": 2},
    "train": {"epochs": 2, "batch_size": 2},
    "tune": {"num_samples": 2, "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}},
}


def old_layout_state() -> bytes:
    """What the flat layout's Tune state holds where it names a callback class: a global by module path."""
    return b"\x80\x02csegjob.tune\nSweepProgress\n."  # protocol 2: GLOBAL 'segjob.tune SweepProgress'


def test_old_module_paths_in_tunes_state_give_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "old_sweep.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "storage": {"uri": str(tmp_path / "runs")}}))
    sweep = load_sweep(path)
    storage = open_storage(sweep.job.storage.uri)
    folder = tmp_path / "runs" / "old_sweep"
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(old_layout_state())
    with pytest.raises(AttributeError, match="SweepProgress"):
        pickle.loads((folder / "tuner.pkl").read_bytes())  # the failure Tune would meet

    with pytest.raises(UserError) as caught:
        tuner.build_tuner(sweep, storage, use_gpu=False)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{folder}: the sweep's saved Tune state")
    assert "--restart" in message and "SweepProgress" in message


@pytest.mark.ray
def test_the_command_says_it_in_one_line_and_exits_2(ray_cluster, tmp_path, monkeypatch, capsys):
    """Through `python -m segjob.tune` on the shared Ray: the same line, exit 2, the old sweep's files kept."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "old_sweep.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "storage": {"uri": str(tmp_path / "runs")}}))
    folder = tmp_path / "runs" / "old_sweep"
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(old_layout_state())
    assert tune.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "start the sweep again with --restart" in err.splitlines()[-1]
    assert (folder / "tuner.pkl").read_bytes() == old_layout_state()
