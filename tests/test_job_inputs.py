"""A job or sweep file that is wrong is one line, exit 2, before any Ray or training starts, and the
run already in storage is left exactly as it was.

Each case runs a command's main() in-process (tests/bad_inputs.py) against the storage of a real
tiny run (tests/trained_runs.py), with the job aimed at that very run, so that anything the command
did before refusing (a lease, a job.json, a resume) would show as a changed file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from bad_inputs import one_line_error
from model_needs import assert_smallest_inputs
from trained_runs import synthetic_run

from segjob import check, train, tune
from segjob.job import yaml_file
from segjob.job.load import load_job
from segjob.job.schema import JobConfig
from segjob.job.sweep import Dimension, corners, load_sweep
from segjob.models import check_model_fits


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return synthetic_run(tmp_path_factory)


def ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def refused(main, argv: list[str], capsys, run) -> str:
    """The command's one error line; it kept the run as it was and started no Ray."""
    ray_before = ray_running()
    message = one_line_error(main, argv, capsys, keep=[run.storage_root])
    assert ray_before or not ray_running(), "Ray was started before the error"
    return message


def job_file(tmp_path: Path, run, name: str = "job.yaml", **changes) -> Path:
    """The run's own job (same name, same storage) with `changes` merged into its sections."""
    raw = run.job.model_dump(mode="json")
    for section, values in changes.items():
        raw[section] = {**raw[section], **values} if isinstance(values, dict) and "name" not in values else values
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def sweep_file(tmp_path: Path, run, space: dict, **changes) -> Path:
    path = job_file(tmp_path, run, "sweep.yaml", **changes)
    raw = yaml.safe_load(path.read_text())
    raw["tune"] = {"num_samples": 2, "space": space}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --- the file itself ---------------------------------------------------------------------

BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 10)}]\n" for previous, name in zip("abcdefgh", "bcdefghi")
) + "seed: *i\n"  # 10**9 values once expanded


@pytest.mark.parametrize("content, expected", [
    (bytes(range(256)) * 8, "not a text file (byte 0x80 at offset 128 is not UTF-8)"),
    (b"name: a\x00b\n", "not a text file (character #x0000 at offset 7)"),
    (("seed: " + "[" * 20_000 + "]" * 20_000 + "\n").encode(), "line 1: nested more than 32 levels deep"),
    ("".join("  " * depth + f"k{depth}:\n" for depth in range(40)).encode(), "nested more than 32 levels deep"),
    (BOMB.encode(), "line 4: its aliases (*name) expand to more than 10000 values"),
    (b"seed: &a [*a]\n", "line 1: an alias (*name) refers to the value that holds it"),
    (b"name: x\ntrain:\n  epochs: 2\n  batch_size: 4\n  epochs: 3\n",
     "line 5: key 'epochs' is written twice in one mapping (first on line 3); keep one"),
    (b"# " + b"x" * (300 << 10) + b"\n", "over 256 KiB"),
    (("seed: [" + "1, " * 12_000 + "1]\n").encode(), "holds more than 10000 values"),
], ids=["binary", "nul", "deep-flow", "deep-block", "anchor-bomb", "alias-cycle", "duplicate-key", "huge",
        "too-many-values"])
def test_an_unreadable_job_file_is_one_line(tmp_path, capsys, run, content, expected):
    path = tmp_path / "job.yaml"
    path.write_bytes(content)
    message = refused(train.main, [str(path)], capsys, run)
    assert message.startswith(f"{path}: ") and expected in message
    if len(content) < 50_000:  # the same reader for every command; the large cases take a second each
        assert refused(check.main, [str(path)], capsys, run) == message
        sweep = tmp_path / "sweep.yaml"
        sweep.write_bytes(content)
        assert expected in refused(tune.main, [str(sweep)], capsys, run)


def test_a_message_quotes_a_value_short_however_large(tmp_path, capsys, run):
    # 960 values through aliases: within the limits, and 100 kB once printed in full
    bomb = "a: &a [" + ", ".join(["x" * 100] * 30) + "]\nb: &b [" + ", ".join(["*a"] * 30) + "]\n"
    path = tmp_path / "job.yaml"
    path.write_text(bomb.replace("a: &a", "x0: &a").replace("b: &b", "x1: &b") + "seed: *b\nname: tiny-synthetic\n")
    message = refused(train.main, [str(path)], capsys, run)
    assert message.startswith(f"{path}: ") and len(message) < 400
    path.write_text("name: tiny-synthetic\nseed: &b [" + ", ".join(["y" * 5000] * 40) + "]\n")
    message = refused(train.main, [str(path)], capsys, run)
    assert message.startswith(f"{path}: seed: Input should be a valid integer") and len(message) < 300


def test_merge_keys_may_be_overridden_but_a_key_not_written_twice():
    assert yaml_file.parse("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n") == {"a": {"x": 1, "y": 2},
                                                                               "b": {"x": 3, "y": 2}}


# --- --set on a section the file leaves out ----------------------------------------------


def test_set_reaches_the_default_member_of_a_section_the_file_leaves_out(tmp_path, capsys, run):
    path = tmp_path / "job.yaml"
    path.write_text("name: tiny-synthetic\ntrain: {epochs: 1}\n")
    job = load_job(path, ["model.encoder=resnet18", "optim.schedule.warmup_steps=5", "loss.label_smoothing=0.1"])
    assert (job.model.name, job.model.encoder) == ("unet", "resnet18")
    assert (job.optim.schedule.name, job.optim.schedule.warmup_steps, job.loss.name) == ("constant", 5, "ce")
    assert load_job(path, ["model.stages=3", "model.name=segnet"]).model.stages == 3
    path.write_text(f"name: tiny-synthetic\nstorage: {{uri: {run.storage_root}}}\n")
    message = refused(train.main, [str(path), "--set", "model.stages=4"], capsys, run)
    assert message.startswith(f"{path} (--set model.stages=4; the file has no model: section, so model.name is the "
                              "default unet: --set model.name=... picks another): model.stages: unknown key")


def test_a_sweep_may_search_a_key_of_a_section_it_leaves_out(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: s\nstorage: {{uri: {tmp_path}}}\n"
                    "tune: {space: {model.encoder: {choice: [resnet18, mobilenet_v2]}}}\n")
    assert load_sweep(path).trial_job("t", {"model.encoder": "resnet18"}).model.encoder == "resnet18"


# --- a metric for a class the data does not have --------------------------------------------


def test_a_metric_for_a_class_the_data_lacks_is_refused_before_training(tmp_path, capsys, run):
    path = job_file(tmp_path, run, metric={"name": "val/iou/triangle", "mode": None})
    expected = (f"{path}: metric.name: val/iou/triangle names no class of data synthetic (its classes: background, "
                "disc, square); use val/iou/<one of those>, or val/miou")
    assert refused(train.main, [str(path)], capsys, run) == expected
    assert refused(check.main, [str(path)], capsys, run) == expected
    plateau = {"name": "plateau", "plateau_metric": "val/dice/ring"}
    path = job_file(tmp_path, run, optim={**run.job.optim.model_dump(mode="json"), "schedule": plateau})
    assert "optim.schedule.plateau_metric: val/dice/ring names no class" in refused(train.main, [str(path)], capsys,
                                                                                    run)


def test_a_sweep_metric_or_a_searched_dataset_without_the_class_is_refused(tmp_path, capsys, run):
    path = sweep_file(tmp_path, run, {"optim.lr": {"loguniform": [1.0e-3, 1.0e-2]}})
    message = refused(tune.main, [str(path), "--set", "tune.metric=val/iou/ring"], capsys, run)
    assert message.startswith(f"{path}: tune.metric: val/iou/ring names no class of data synthetic")
    path = sweep_file(tmp_path, run, {"data.num_classes": {"choice": [4, 3]}}, data={"num_classes": 4},
                      metric={"name": "val/iou/triangle"})
    assert refused(tune.main, [str(path)], capsys, run) == (
        f"{path}: tune.space: data.num_classes=3 makes a job that cannot train: metric.name: val/iou/triangle names "
        "no class of data synthetic (its classes: background, disc, square); use val/iou/<one of those>, or val/miou")


# --- what the model needs of the job -----------------------------------------------------

# One of each family and encoder kind, as small as it comes: (model section, minimum, minimum for one sample)
FAMILIES = {
    "unet": ({"name": "unet", "depth": 5, "base_channels": 4}, 32, 64),
    "unet-resnet18": ({"name": "unet", "encoder": "resnet18", "decoder_channels": [8] * 5}, 1, 33),
    "unet-vgg16_bn": ({"name": "unet", "encoder": "vgg16_bn", "decoder_channels": [8] * 5}, 32, 32),
    "pspnet": ({"name": "pspnet", "encoder": "resnet18", "bins": [2, 3], "output_stride": 8}, 1, 9),
    "pspnet-bin1": ({"name": "pspnet", "encoder": "resnet18", "bins": [1, 2]}, 1, None),
    "segnet": ({"name": "segnet", "stages": 5, "width": 4}, 32, 32),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_model_runs_at_its_smallest_input_and_not_one_below(family, one_torch_thread):
    assert_smallest_inputs(*FAMILIES[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_driver_refuses_what_the_model_would_refuse(family):
    section, smallest, smallest_alone = FAMILIES[family]
    base = {"name": "x", "model": section, "scaling": {"num_workers": 1}}
    for batch, size in ((2, smallest), (1, smallest_alone)):
        for image_size in ((size, size - 1) if size else (64,)):
            if image_size < 16:  # the schema's own floor
                continue
            job = JobConfig.model_validate({**base, "train": {"batch_size": batch},
                                            "data": {"name": "synthetic", "image_size": image_size}})
            if size is not None and image_size == size:
                check_model_fits(job)
            else:
                with pytest.raises(ValueError, match="data.image_size|train.batch_size 1"):
                    check_model_fits(job)


def test_a_segnet_too_deep_for_its_images_is_one_line_before_ray(tmp_path, capsys, run):
    path = job_file(tmp_path, run, model={"name": "segnet"}, data={"image_size": 16})
    expected = (f"{path}: data.image_size 16 is too small for model segnet with model.stages 5: it needs at least 32 "
                "pixels; raise data.image_size to 32 or use fewer model.stages")
    assert refused(train.main, [str(path)], capsys, run) == expected
    assert refused(check.main, [str(path)], capsys, run) == expected


@pytest.mark.parametrize("changes, expected", [
    ({"model": {"name": "pspnet", "encoder": "resnet18"}, "train": {"batch_size": 1}},
     "train.batch_size 1 with model pspnet with model.encoder resnet18 at data.image_size 32: training BatchNorm "
     "would see one value per channel; raise train.batch_size to 2 (the 1x1 pyramid bin of model.bins"),
    ({"model": {"name": "unet", "depth": 5}, "train": {"batch_size": 1}},
     "raise train.batch_size to 2 or data.image_size to 64"),
    ({"model": {"name": "unet", "encoder": "resnet18", "freeze_encoder": 6}},
     "model.freeze_encoder 6: the encoder of model unet with model.encoder resnet18 has 5 stages; give at most 5"),
])
def test_a_job_no_worker_could_train_is_one_line_before_ray(tmp_path, capsys, run, changes, expected):
    changes = dict(changes)
    train_section = {**run.job.train.model_dump(mode="json"), **changes.pop("train", {})}
    path = job_file(tmp_path, run, train=train_section, **changes)
    assert expected in refused(train.main, [str(path)], capsys, run)


# --- a sweep whose values do not combine -----------------------------------------------------


def test_a_sweep_whose_values_do_not_combine_is_refused_at_load(tmp_path, capsys, run):
    space = {"model.encoder": {"choice": ["none", "resnet18"]}, "model.depth": {"choice": [2, 3]}}
    path = sweep_file(tmp_path, run, space, model={"name": "unet"})
    message = refused(tune.main, [str(path)], capsys, run)
    assert message.startswith(f"{path}: tune.space: the combination model.encoder='resnet18' model.depth=2 does not "
                              "make a valid job: model.depth: only for the plain U-Net (encoder: none)")
    assert message.endswith("narrow the space (or search these keys in separate sweeps)")
    space = {"data.mixing.mixup": {"uniform": [0.0, 0.8]}, "data.mixing.cutmix": {"uniform": [0.0, 0.5]}}
    message = refused(tune.main, [str(sweep_file(tmp_path, run, space))], capsys, run)
    assert "the combination data.mixing.mixup=0.8 data.mixing.cutmix=0.5 does not make a valid job" in message
    assert "mixup + cutmix is 1.3" in message


def test_a_sweep_reaching_below_the_models_smallest_input_is_refused(tmp_path, capsys, run):
    space = {"data.image_size": {"integer": [16, 64], "step": 16}, "model.stages": {"choice": [3, 5]}}
    path = sweep_file(tmp_path, run, space, model={"name": "segnet", "width": 4})
    assert refused(tune.main, [str(path)], capsys, run) == (
        f"{path}: tune.space: the combination data.image_size=16 model.stages=5 makes a job that cannot train: "
        "data.image_size 16 is too small for model segnet with model.stages 5: it needs at least 32 pixels; "
        "raise data.image_size to 32 or use fewer model.stages")


def test_corners_cross_every_choice_with_both_ends_and_fall_back_to_pairs():
    space = {"a": Dimension("choice", choices=("x", "y", "z")), "b": Dimension("float", 0.0, 1.0)}
    assert list(corners(space)) == [{"a": a, "b": b} for a in "xyz" for b in (0.0, 1.0)]
    wide = {f"k{i}": Dimension("int", 1, 9) for i in range(13)}  # 8192 corners: pairs instead
    pairs = list(corners(wide))
    assert len(pairs) == 78 * 4 and {"k0": 9, "k1": 9, **{f"k{i}": 1 for i in range(2, 13)}} in pairs


# --- check's own flags --------------------------------------------------------------------


@pytest.mark.parametrize("flag, value", [("--workers", "0"), ("--workers", "-3"), ("--limit", "0")])
def test_check_refuses_a_count_below_one(tmp_path, capsys, run, flag, value):
    message = refused(check.main, [str(job_file(tmp_path, run)), flag, value], capsys, run)
    assert message.startswith(f"{flag} {value}: give at least 1")
