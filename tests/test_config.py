"""The job file: every error a user can make gives one line naming the file, key and fix."""

from pathlib import Path

import pytest
import yaml

from segjob.errors import UserError, exits_cleanly_on_user_error
from segjob.job.load import load_job, resolve_local_paths
from segjob.job.schema import JobConfig


def write_job(tmp_path: Path, body: dict | str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    return path


def error_of(path: Path, overrides=()) -> str:
    with pytest.raises(UserError) as caught:
        load_job(path, list(overrides))
    message = str(caught.value)
    assert "\n" not in message, "a user error must be one line"
    return message


def test_defaults_and_name_from_file(tmp_path):
    job = load_job(write_job(tmp_path, {"train": {"epochs": 2}}, name="my-run.yaml"))
    assert job.name == "my-run"
    assert job.train.epochs == 2
    assert job.data.name == "synthetic" and job.model.name == "unet"
    assert job.metric.name == "val/miou" and job.metric.mode == "max"


def test_overrides_set_nested_values_with_yaml_types(tmp_path):
    path = write_job(tmp_path, {"name": "x"})
    job = load_job(path, ["train.epochs=3", "optim.lr=1e-2", "scaling.use_gpu=false", "optim.betas=[0.5, 0.9]"])
    assert job.train.epochs == 3 and job.optim.lr == 0.01
    assert job.scaling.use_gpu is False and job.optim.betas == (0.5, 0.9)


def test_unknown_key_names_file_path_and_suggests(tmp_path):
    path = write_job(tmp_path, {"name": "x", "train": {"epochz": 3}})
    message = error_of(path)
    assert message.startswith(f"{path}: train.epochz: unknown key")
    assert "did you mean 'epochs'" in message


def test_unknown_key_inside_a_dataset_is_checked_against_that_dataset(tmp_path):
    path = write_job(tmp_path, {"name": "x", "data": {"name": "pets", "root": "/d", "val_fractoin": 0.2}})
    message = error_of(path)
    assert "data.val_fractoin: unknown key" in message and "did you mean 'val_fraction'" in message


def test_unknown_key_from_an_override_names_the_override(tmp_path):
    path = write_job(tmp_path, {"name": "x"})
    message = error_of(path, ["train.epochz=4"])
    assert "--set train.epochz=4" in message and "did you mean 'epochs'" in message


@pytest.mark.parametrize("key", ["scaling.use_gpu", "train.sync_batchnorm"])
def test_a_value_fitting_no_form_of_a_key_is_one_line_with_every_form(tmp_path, key):
    path = write_job(tmp_path, {"name": "x"})
    message = error_of(path, [f"{key}=maybe"])
    assert f"{key}: 'maybe' is not allowed; expected 'auto' or true or false" in message
    assert "literal[" not in message and "more)" not in message


def test_wrong_type_names_the_key_and_value(tmp_path):
    message = error_of(write_job(tmp_path, {"name": "x", "train": {"epochs": "many"}}))
    assert "train.epochs" in message and "integer" in message and "'many'" in message


def test_bad_choice_lists_allowed_values(tmp_path):
    message = error_of(write_job(tmp_path, {"name": "x", "optim": {"name": "adamm"}}))
    assert "optim.name" in message and "did you mean 'adam'" in message and "'sgd'" in message


def test_unknown_dataset_lists_valid_names(tmp_path):
    message = error_of(write_job(tmp_path, {"name": "x", "data": {"name": "petz"}}))
    assert "data.name: unknown name 'petz'" in message and "did you mean 'pets'" in message
    assert "synthetic" in message


def test_missing_required_key(tmp_path):
    message = error_of(write_job(tmp_path, {"name": "x", "data": {"name": "pets"}}))
    assert "data.root: required key is missing" in message


def test_bad_metric_name_and_storage_scheme(tmp_path):
    assert "metric.name" in error_of(write_job(tmp_path, {"name": "x", "metric": {"name": "val/mIoU"}}))
    assert "storage.uri" in error_of(write_job(tmp_path, {"name": "x", "storage": {"uri": "ftp://host/x"}}))


def test_run_name_must_be_a_safe_folder_name(tmp_path):
    assert "name" in error_of(write_job(tmp_path, {"name": "../escape"}))


def test_file_problems(tmp_path):
    assert "job file not found" in error_of(tmp_path / "nope.yaml")
    assert "not valid YAML" in error_of(write_job(tmp_path, "train: [1, 2\n"))
    assert "top level must be a mapping" in error_of(write_job(tmp_path, "- a\n- b\n"))
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_job(write_job(tmp_path, {"name": "x"}), ["train.epochs"])
    with pytest.raises(UserError, match="is a value, not a section"):
        load_job(write_job(tmp_path, {"name": "x"}), ["name.x=1"])


def test_local_paths_become_absolute(tmp_path):
    job = JobConfig.model_validate({"name": "x", "data": {"name": "pets", "root": "data/pets"},
                                    "storage": {"uri": "./runs"}})
    resolved = resolve_local_paths(job, base=tmp_path)
    assert resolved.data.root == str(tmp_path / "data/pets")
    assert resolved.storage.uri == str(tmp_path / "runs")
    remote = JobConfig.model_validate({"name": "x", "storage": {"uri": "s3://bucket/prefix"}})
    assert resolve_local_paths(remote).storage.uri == "s3://bucket/prefix"


def test_user_error_exits_with_one_line_and_code_2(capsys):
    @exits_cleanly_on_user_error
    def main():
        raise UserError("jobs/x.yaml: train.epochz: unknown key")

    assert main() == 2
    err = capsys.readouterr().err
    assert err == "error: jobs/x.yaml: train.epochz: unknown key\n"
