"""The run folder's identity: recorded job, --restart names (the driver lease: tests/test_lease.py)."""

import json

import pytest

from segjob.errors import UserError
from segjob.job.schema import JobConfig
from segjob.store import run_folder
from segjob.store.storage import open_storage


def job(**sections) -> JobConfig:
    return JobConfig.model_validate({"name": "run", **sections})


@pytest.fixture
def storage(tmp_path):
    return open_storage(str(tmp_path))


def test_a_resubmission_may_change_epochs_scaling_and_data_location(storage):
    path = storage.path("run")
    run_folder.check_same_job(storage, path, job(train={"epochs": 5}), "job.yaml")
    run_folder.check_same_job(storage, path, job(train={"epochs": 9}, scaling={"num_workers": 4},
                                           storage={"endpoint_url": "http://minio:9000"}), "job.yaml")
    recorded = json.loads(storage.read_bytes(f"{path}/{run_folder.JOB_FILE}"))
    assert recorded["train"]["epochs"] == 9


def test_a_resubmission_that_changes_the_result_is_refused_naming_the_keys(storage):
    path = storage.path("run")
    run_folder.check_same_job(storage, path, job(), "jobs/run.yaml")
    with pytest.raises(UserError) as caught:
        run_folder.check_same_job(storage, path, job(optim={"lr": 0.5}, model={"name": "unet", "depth": 3}),
                                  "jobs/run.yaml")
    message = str(caught.value)
    assert message.startswith("jobs/run.yaml: run 'run' already exists")
    assert "model.depth (4 -> 3)" in message and "optim.lr (0.001 -> 0.5)" in message and "--restart" in message


def test_moved_data_and_options_added_since_are_not_changes(storage):
    path = storage.path("run")
    pets = {"name": "pets", "root": "/data/old/oxford-iiit-pet"}
    run_folder.check_same_job(storage, path, job(data=pets), "job.yaml")
    recorded = json.loads(storage.read_bytes(f"{path}/{run_folder.JOB_FILE}"))
    del recorded["train"]["amp"]  # as if recorded by a segjob from before the option existed
    storage.write_bytes(f"{path}/{run_folder.JOB_FILE}", json.dumps(recorded).encode())
    run_folder.check_same_job(storage, path, job(data={**pets, "root": "/mnt/pets"}), "job.yaml")


def test_restart_names_a_fresh_run_beside_the_old(storage):
    run_folder.check_same_job(storage, storage.path("run"), job(), "j")
    assert run_folder.fresh_run_name(storage, "run") == "run-r2"
    run_folder.check_same_job(storage, storage.path("run-r2"), job(name="run-r2"), "j")
    assert run_folder.fresh_run_name(storage, "run") == "run-r3"


def test_a_run_recorded_before_eval_existed_keeps_its_input_grid_count(storage):
    path = storage.path("run")
    old = job().model_dump(mode="json")
    del old["eval"], old["tracking"]  # a job.json written before these sections existed
    storage.write_bytes(f"{path}/{run_folder.JOB_FILE}", json.dumps(old).encode())
    with pytest.raises(UserError, match=r"eval.grid \('input' -> 'original'\)"):
        run_folder.check_same_job(storage, path, job(), "job.yaml")
    run_folder.check_same_job(storage, path, job(eval={"grid": "input"}), "job.yaml")  # its own count: resumes
