"""The schema walker (segjob/job/walk.py) and what rests on it: error keys without pydantic's tags,
the section behind a key, path keys on every section, and the one YAML reader of jobs and sweeps."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from segjob.errors import UserError
from segjob.job.load import load_job, validate_job
from segjob.job.schema import (
    AugmentConfig,
    JobConfig,
    PetsData,
    PolySchedule,
    ScalingSection,
    ScheduleConfig,
    Section,
    SyntheticData,
    UNetConfig,
)
from segjob.job.sweep import TuneSection, load_sweep
from segjob.job.walk import members_by_tag, section_type, tag_of, walk_location


def error_of(raw: dict) -> str:
    with pytest.raises(UserError) as caught:
        validate_job({"name": "walk", **raw})
    return str(caught.value)


def test_a_family_is_its_members_by_name_and_a_plain_field_holds_no_section():
    data = section_type(JobConfig.model_fields["data"].annotation)
    assert data["pets"] is PetsData and data["synthetic"] is SyntheticData
    assert section_type(JobConfig.model_fields["scaling"].annotation) is ScalingSection
    assert section_type(JobConfig.model_fields["seed"].annotation) is None
    assert section_type(ScalingSection.model_fields["use_gpu"].annotation) is None
    assert members_by_tag(ScheduleConfig)["poly"] is PolySchedule
    assert members_by_tag(ScalingSection.model_fields["use_gpu"].annotation) is None
    assert tag_of(UNetConfig) == "unet" and tag_of(ScalingSection) is None


def test_a_location_loses_the_tags_pydantic_inserts():
    assert walk_location(JobConfig, ("data", "pets", "augment")) == (["data", "augment"], AugmentConfig)
    assert walk_location(JobConfig, ("scaling", "use_gpu", "bool")) == (["scaling", "use_gpu"], None)
    decoder_channel = ("model", "unet", "decoder_channels", 0)
    assert walk_location(JobConfig, decoder_channel) == (["model", "decoder_channels", 0], None)
    assert walk_location(TuneSection, ("asha",))[1].__name__ == "AshaSection"


def test_an_unknown_key_inside_a_family_member_section_lists_that_section_s_keys():
    message = error_of({"data": {"name": "pets", "root": "x", "augment": {"strenght": 0.5}}})
    assert "data.augment.strenght: unknown key (did you mean 'strength'?); valid keys here: blur," in message
    assert "data.root: unknown key; valid keys here: " in error_of({"data": {"name": "synthetic", "root": "x"}})


def test_every_section_answers_path_keys():
    assert Section().path_keys() == () and ScalingSection().path_keys() == ()
    assert PetsData(root="x").path_keys() == ("root",)
    assert UNetConfig().path_keys() == ("encoder_weights",)


def test_job_and_sweep_files_share_one_reader(tmp_path: Path):
    for kind, load in (("job", load_job), ("sweep", load_sweep)):
        with pytest.raises(UserError, match=f"nope.yaml: {kind} file not found"):
            load(tmp_path / "nope.yaml")
        bad = tmp_path / f"bad_{kind}.yaml"
        bad.write_text("train: [1, 2\n")
        with pytest.raises(UserError, match=r"bad_\w+.yaml: line \d+: not valid YAML"):
            load(bad)
    listed = tmp_path / "listed.yaml"
    listed.write_text("- a\n")
    with pytest.raises(UserError, match=r"mapping of sections \(name, data, model, \.\.\., tune\)"):
        load_sweep(listed)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_job(empty).name == "empty"  # an empty job file means every default
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_sweep(empty)


def test_a_sweep_s_trials_get_every_local_path_made_absolute(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep_file = tmp_path / "paths.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "data": {"name": "pets", "root": "data/pets"},
        "model": {"name": "unet", "encoder": "resnet18", "encoder_weights": "weights/r18.pth"},
        "storage": {"uri": "runs"},
        "tune": {"num_samples": 1, "space": {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}}},
    }))
    sweep = load_sweep(sweep_file)
    trial = sweep.trial_job("t1", {"optim.lr": 0.001})
    assert trial.data.root == str(tmp_path / "data" / "pets")
    assert trial.model.encoder_weights == str(tmp_path / "weights" / "r18.pth")
