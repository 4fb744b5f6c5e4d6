"""Sweeps without a cluster: the `tune:` section, its checks against the job schema, the trial
jobs, what reaches Tune, ASHA's state across a restore, and the results a sweep writes.

The sweeps that really run (ASHA, a killed driver, pull and evaluate) are in test_job_api.py,
through Ray's job API.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml

from segjob import tune
from segjob.cluster import tuner
from segjob.errors import UserError
from segjob.job.sweep import TRIALS_DIR, Dimension, load_sweep, parse_dimension
from segjob.results import sweep_report
from segjob.store import checkpoint
from segjob.store.ranking import rank
from segjob.store.storage import open_storage

SWEEP = {
    "name": "tiny_sweep",
    "data": {"name": "synthetic", "train_samples": 16, "val_samples": 8, "image_size": 32},
    "model": {"name": "unet", "base_channels": 8, "depth": 2},
    "train": {"epochs": 3, "batch_size": 8},
    "scaling": {"num_workers": 1},
    "tune": {
        "num_samples": 4,
        "space": {
            "optim.lr": {"loguniform": [1.0e-4, 1.0e-2]},
            "model.base_channels": {"choice": [8, 16]},
            "optim.name": {"choice": ["adam", "sgd"]},
        },
        "points_to_evaluate": [{"optim.lr": 0.003, "model.base_channels": 16, "optim.name": "adam"}],
        "asha": {"grace_period": 1, "reduction_factor": 2},
    },
}


@pytest.fixture
def sweep_file(tmp_path) -> Path:
    path = tmp_path / "tiny_sweep.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "storage": {"uri": str(tmp_path / "runs")}}, sort_keys=False))
    return path


def error_of(path: Path, *overrides: str) -> str:
    with pytest.raises(UserError) as caught:
        load_sweep(path, list(overrides))
    message = str(caught.value)
    assert "\n" not in message, "a user error is one line"
    return message


# --- the tune: section ------------------------------------------------------------------


def test_a_sweep_is_a_job_plus_its_search(sweep_file, tmp_path):
    sweep = load_sweep(sweep_file,
                       ["train.epochs=2", "tune.num_samples=6", "tune.space.optim.lr={uniform: [0.001, 0.01]}"])
    assert (sweep.name, sweep.job.train.epochs, sweep.tune.num_samples) == ("tiny_sweep", 2, 6)
    assert sweep.tune.space["optim.lr"] == Dimension("float", 0.001, 0.01)
    assert (sweep.metric, sweep.mode, sweep.max_epochs) == ("val/miou", "max", 2)
    assert sweep.trials_uri() == f"{tmp_path / 'runs'}/tiny_sweep/{TRIALS_DIR}"

    job = sweep.trial_job("a1b2c3d4", {"optim.lr": 0.005, "model.base_channels": 16, "optim.name": "sgd"})
    assert (job.name, job.optim.lr, job.model.base_channels, job.optim.name) == ("a1b2c3d4", 0.005, 16, "sgd")
    assert job.storage.uri == sweep.trials_uri() and job.train.epochs == 2 and job.model.depth == 2
    by_loss = load_sweep(sweep_file, ["tune.metric=val/loss", "tune.mode=min"])
    assert by_loss.trial_job("t", {}).metric.name == "val/loss"


@pytest.mark.parametrize("override, message", [
    ("tune.space.optim.lrr={loguniform: [1.0e-4, 1.0e-2]}",
     "tune.space.optim.lrr=0.0001 does not make a valid job: optim.lrr: unknown key (did you mean 'lr'?)"),
    ("tune.space.optim.name={choice: [adam, adamx]}",
     "tune.space.optim.name='adamx' does not make a valid job: "
     "optim.name: 'adamx' is not allowed (did you mean 'adam'?)"),
    ("tune.space.model.base_channels={choice: [2, 8]}", "tune.space.model.base_channels=2 does not make a valid job"),
    ("tune.space.model.depth={integer: [1, 9]}", "tune.space.model.depth=9 does not make a valid job"),
    ("tune.space.optim.lr={loguniform: [1e-4, 1e-2]}", "write exponents with a dot, 1.0e-4 (YAML reads 1e-4 as text)"),
    ("tune.space.optim.lr={loguniform: [0, 1]}", "tune.space.optim.lr: loguniform: low must be above 0"),
    ("tune.space.optim.lr={uniform: [0.1, 0.01]}", "tune.space.optim.lr: uniform: low (0.1) must be below high (0.01)"),
    ("tune.space.optim.lr=0.1", "tune.space.optim.lr: expected one of {loguniform: [low, high]}"),
    ("tune.space.train.epochs={choice: [2, 3]}", "tune.space.train.epochs: train.epochs cannot be searched"),
    ("tune.space.storage.uri={choice: [a, b]}", "storage.uri cannot be searched"),
    ("tune.space.model.base_channels={choice: [[8], 16]}", "choice values must be numbers, strings, booleans or null"),
    ("tune.num_sample=3", "tune.num_sample: unknown key; valid keys here: asha, max_concurrent_trials"),
    ("tune.asha.grace_period=0", "tune.asha.grace_period: Input should be greater than or equal to 1"),
    ("tune.asha.max_t=5", "tune.asha.max_t (5) is more than the train.epochs a trial has (3)"),
    ("tune.metric=val/lost", "tune.metric: must be one of"),
    ("tune.points_to_evaluate=[{optim.lr: 0.5, model.base_channels: 8, optim.name: adam}]",
     "tune.points_to_evaluate[1]: optim.lr=0.5 is outside its space (log-uniform floats in [0.0001, 0.01])"),
    ("tune.points_to_evaluate=[{optim.lr: 0.001}]",
     "tune.points_to_evaluate[1]: no value for model.base_channels, optim.name"),
    ("train.epochz=2", "(--set train.epochz=2): train.epochz: unknown key (did you mean 'epochs'?)"),
])
def test_a_bad_search_is_one_line_before_anything_starts(sweep_file, override, message):
    assert message in error_of(sweep_file, override)


def test_a_file_without_a_tune_section_is_not_a_sweep(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in SWEEP.items() if k != "tune"}))
    assert "no 'tune:' section; a sweep needs one" in error_of(path)


def test_dimensions():
    log_int = parse_dimension({"integer": [8, 64], "log": True})
    assert log_int == Dimension("int", 8, 64, log=True) and log_int.to_optuna().log
    stepped = parse_dimension({"integer": [8, 30], "step": 8})
    assert stepped.values_to_check() == [8, 24] and stepped.contains(16) and not stepped.contains(12)
    choice = parse_dimension({"choice": [True, 1]})
    assert choice.contains(True) and choice.contains(1) and not choice.contains(1.0)
    assert parse_dimension({"loguniform": [1.0e-4, 1.0e-2]}).describe() == "log-uniform floats in [0.0001, 0.01]"
    with pytest.raises(ValueError, match="unknown option 'stp' for integer"):
        parse_dimension({"integer": [1, 3], "stp": 2})


def test_the_shipped_sweeps_validate():
    for path in sorted(Path(__file__).resolve().parents[1].glob("jobs/tune_*.yaml")):
        sweep = load_sweep(path)
        assert sweep.tune.space and sweep.tune.num_samples >= len(sweep.tune.points_to_evaluate), path


# --- what reaches Tune, and ASHA across a restore -----------------------------------------


class FakeQueue:
    def __init__(self):
        self.items = []

    def put(self, item):
        self.items.append(item)


def test_only_evaluations_reach_tune():
    callback = tuner.EvaluationsToTune.__new__(tuner.EvaluationsToTune)  # its __init__ needs a live Tune session
    callback._training_actor_item_queue = FakeQueue()
    step = {"epoch": 0, "step": 4, "train/loss": 1.2}
    evaluation = {"epoch": 1, "step": 8, "train/loss": 1.1, "val/loss": 1.0, "val/miou": 0.3}

    class Committed:
        path = "bucket/runs/s/trials/t/checkpoints/step-000000008"

    callback.after_report(None, [step], Committed())
    callback.after_report(None, [evaluation, evaluation], Committed())
    callback.after_report(None, [dict(evaluation, epoch=2)], None)  # a checkpoint that failed to commit
    assert callback._training_actor_item_queue.items == [
        {**evaluation, "checkpoint_path": Committed.path}, dict(evaluation, epoch=2)]


def test_a_submitted_jobs_own_runtime_env_is_not_named_again(monkeypatch):
    ray_worker = pytest.importorskip("segjob.cluster.driver")
    env = {"env_vars": {"AWS_DEFAULT_REGION": "us-east-1", "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9023"},
           "worker_process_setup_hook": "segjob.cluster.process_setup.setup_worker_process"}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert ray_worker.without_job_settings(env) == env, "not a submitted job: everything"
    # `ray job submit --runtime-env-json '{"env_vars": {"AWS_DEFAULT_REGION": ...}}'`: Ray refuses the same key twice
    job_env = {"working_dir": "gcs://_ray_pkg_0.zip", "env_vars": {"AWS_DEFAULT_REGION": "us-east-1"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env}))
    assert ray_worker.without_job_settings(env) == {
        "env_vars": {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9023"},
        "worker_process_setup_hook": "segjob.cluster.process_setup.setup_worker_process"}


def test_asha_rungs_survive_a_restore():
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class Trial:
        def __init__(self, trial_id):
            self.trial_id = trial_id

    def fresh():
        scheduler = ASHAScheduler(time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2, brackets=1)
        scheduler.set_search_properties("val/miou", "max")
        return scheduler

    before = fresh()
    for trial_id, miou in (("fine", 0.5), ("good", 0.6)):
        before.on_trial_add(None, Trial(trial_id))
        assert before.on_trial_result(None, Trial(trial_id), {"epoch": 1, "val/miou": miou}) == TrialScheduler.CONTINUE
    state = tuner.SchedulerState(before).get_state()

    restored = fresh()  # what Tuner.restore brings back from tuner.pkl: ASHA as it was built
    tuner.SchedulerState(restored).set_state(state)
    restored.on_trial_add(None, Trial("poor"))
    assert restored.on_trial_result(None, Trial("poor"), {"epoch": 1, "val/miou": 0.2}) == TrialScheduler.STOP
    empty = fresh()
    empty.on_trial_add(None, Trial("poor"))
    assert empty.on_trial_result(None, Trial("poor"), {"epoch": 1, "val/miou": 0.2}) == TrialScheduler.CONTINUE, \
        "without the saved rungs the poor trial would have gone on"


def test_progress_lines_count_every_trial_once():

    class Trial:
        def __init__(self, trial_id, status, epoch=None, best=None):
            self.trial_id, self.status = trial_id, status
            self.last_result = {"epoch": epoch} if epoch else {}
            self.metric_analysis = {"val/miou": {"max": best}} if best is not None else {}

    trials = [Trial("a", "TERMINATED", 3, 0.5), Trial("b", "TERMINATED", 1, 0.2), Trial("c", "RUNNING", 2, 0.4),
              Trial("d", "ERROR"), Trial("e", "PENDING")]
    progress = tuner.SweepProgress("val/miou", "max", max_epochs=3, num_samples=6)
    assert progress.summary(trials) == \
        "1 running, 1 pending, 1 finished, 1 stopped early, 1 failed, 1 not started | best val/miou 0.5000 (trial a)"
    # Tune calls the hooks before it updates the trial: the event being reported is counted as it will be
    assert progress.summary(trials, {"c": "TERMINATED"}, latest=(0.7, "c")) == \
        "1 pending, 1 finished, 2 stopped early, 1 failed, 1 not started | best val/miou 0.7000 (trial c)"


def test_a_resubmitted_sweep_must_search_the_same_way(sweep_file, tmp_path):
    storage = open_storage(str(tmp_path / "runs"))
    sweep_path = storage.path("tiny_sweep")
    tune.check_same_sweep(storage, sweep_path, load_sweep(sweep_file))
    # what moves or scales the trials may change; what they compute or how they are searched may not
    tune.check_same_sweep(storage, sweep_path,
                          load_sweep(sweep_file, ["scaling.num_workers=2", "failure.max_failures=5"]))
    for override, shown in (("tune.num_samples=8", "tune.num_samples (4 -> 8)"),
                            ("optim.weight_decay=0.1", "optim.weight_decay (0.0 -> 0.1)"),
                            ("train.epochs=5", "train.epochs (3 -> 5)")):
        pattern = r"already exists .* with a different " + shown.replace("(", r"\(").replace(")", r"\)")
        with pytest.raises(UserError, match=pattern):
            tune.check_same_sweep(storage, sweep_path, load_sweep(sweep_file, [override]))


def test_dry_run_checks_everything_and_starts_nothing(sweep_file, tmp_path, capsys):
    assert tune.main([str(sweep_file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sweep 'tiny_sweep'" in out and "optim.lr: log-uniform floats in [0.0001, 0.01]" in out
    assert "first trial 1: optim.lr=0.003 model.base_channels=16 optim.name=adam" in out
    assert not (tmp_path / "runs" / "tiny_sweep").exists()
    assert tune.main([str(sweep_file), "--dry-run", "--set", "tune.asha.grace_period=4"]) == 2
    assert "tune.asha.grace_period (4) is more than the 3 epochs a trial gets" in capsys.readouterr().err


# --- the results ------------------------------------------------------------------------


def write_trial(storage, sweep, trial_id, params, values):
    """A trial's committed checkpoints, one per (epoch, val/miou), as the engine commits them."""
    import tempfile

    import torch

    job = sweep.trial_job(trial_id, params).model_dump(mode="json")
    for epoch, miou in enumerate(values, start=1):
        metrics = {"epoch": epoch, "step": epoch * 2, "val/loss": 1 - miou, "val/miou": miou}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.write_local(Path(tmp), {"w": torch.zeros(1)}, {}, [metrics])
            meta = checkpoint.build_meta(Path(tmp), job=job, step=epoch * 2, epoch=epoch, metrics=metrics,
                                         reason="epoch")
            checkpoint.commit(storage, storage.path(TRIALS_DIR, trial_id), Path(tmp), meta)


def test_results_table_csv_best_and_plot(sweep_file, tmp_path):
    sweep = load_sweep(sweep_file)
    storage = open_storage(str(tmp_path / "runs" / "tiny_sweep"))
    trials = {
        "aaaa1111": ({"optim.lr": 0.003, "model.base_channels": 16, "optim.name": "adam"}, [0.30, 0.45, 0.52],
                     "finished"),
        "bbbb2222": ({"optim.lr": 0.0002, "model.base_channels": 8, "optim.name": "sgd"}, [0.12], "stopped early"),
        "cccc3333": ({"optim.lr": 0.008, "model.base_channels": 8, "optim.name": "adam"}, [0.33, 0.41],
                     "stopped early"),
    }
    for trial_id, (params, values, _) in trials.items():
        write_trial(storage, sweep, trial_id, params, values)
    outcomes = [sweep_report.TrialOutcome(trial_id, params, status, len(values), values[-1], 10.0 * len(values))
                for trial_id, (params, values, status) in trials.items()]
    outcomes.append(sweep_report.TrialOutcome("dddd4444", trials["aaaa1111"][0], sweep_report.FAILED, 0, None, 3.0,
                                              "UserError: data: no samples"))
    ranking = rank(storage, storage.root, sweep.metric, sweep.mode)
    rows = sweep_report.trial_rows(outcomes, ranking, sweep, storage)
    assert [row.outcome.trial for row in rows] == ["aaaa1111", "cccc3333", "bbbb2222", "dddd4444"]

    table = sweep_report.format_rows(rows, sweep).splitlines()
    assert table[1].split()[1:6] == ["aaaa1111", "finished", "3/3", "0.5200", "(epoch"]
    assert "stopped early" in table[3] and table[4].split()[2] == "failed"
    parsed = list(csv.DictReader(io.StringIO(sweep_report.rows_csv(rows, sweep).decode())))
    assert parsed[0]["best val/miou"] == "0.52" and parsed[0]["optim.lr"] == "0.003"
    assert "trials/aaaa1111/checkpoints/step-000000006/attempt-" in parsed[0]["checkpoint"]  # its committed attempt
    assert parsed[3]["error"] == "UserError: data: no samples" and parsed[3]["best val/miou"] == ""

    best = sweep_report.best_record(ranking, sweep, storage, "s3://b/runs/tiny_sweep")
    assert best["trial"] == "aaaa1111" and best["value"] == 0.52 and best["epoch"] == 3
    assert best["params"] == {"optim.lr": 0.003, "model.base_channels": 16, "optim.name": "adam"}
    assert best["pull"] == "python -m segjob.pull s3://b/runs/tiny_sweep --to ./best"
    json.dumps(best)

    scored = [r for r in rows if r.best_value is not None]
    assert set(sweep_report.param_importances(scored, sweep)) == set(sweep.tune.space)
    png = sweep_report.search_plot(rows, sweep)
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert sweep_report.search_plot(rows[3:], sweep).startswith(b"\x89PNG"), "nothing scored yet: still a picture"
