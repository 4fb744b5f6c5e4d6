"""The model section of a job: keys a user writes, the errors they get, and the seed recipes' jobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from segjob.errors import UserError
from segjob.job.load import load_job, resolve_local_paths, validate_job
from segjob.models import EncoderUNet, PSPNet, SegNet, create_model

JOBS = Path(__file__).resolve().parent.parent / "jobs"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model_section(**model):
    return validate_job({"name": "job", "model": model}).model


@pytest.mark.parametrize(
    "model, message",
    [
        ({"name": "unet", "encoder": "resnet50", "depth": 3},
         "model.depth: only for the plain U-Net (encoder: none); "
         "an encoder U-Net is shaped by its encoder and decoder_channels (got 3)"),
        ({"name": "unet", "encoder_weights": "r50.pth"},
         "model.encoder_weights: only for a U-Net on an encoder: "
         "set model.encoder (e.g. resnet50) or drop this key (got 'r50.pth')"),
        ({"name": "unet", "encoder": "resnet5"},
         "model.encoder: 'resnet5' is not allowed (did you mean 'resnet50'?); expected 'none', 'resnet18'"),
        ({"name": "pspnet", "encoder": "vgg16_bn"}, "model.encoder: 'vgg16_bn' is not allowed; expected 'resnet18'"),
        ({"name": "pspnet", "freeze_encoder": -1},
         "model.freeze_encoder: expected true, false or a number of stages N >= 0 (got -1)"),
        ({"name": "pspnet", "output_stride": 32}, "model.output_stride: '32' is not allowed; expected 8 or 16"),
        ({"name": "segnet", "stages": 6}, "model.stages: Input should be less than or equal to 5 (got 6)"),
        ({"name": "segnet", "extra_channels": "zero"},
         "model.extra_channels: unknown key (did you mean 'extra_channel_init'?)"),
        ({"name": "pspnett"},
         "model.name: unknown name 'pspnett' (did you mean 'pspnet'?); valid: deeplabv3_mobilenet_v3_large, "
         "deeplabv3_resnet101, deeplabv3_resnet50, deeplabv3plus, fcn_resnet101, fcn_resnet50, "
         "lraspp_mobilenet_v3_large, pspnet, segnet, unet"),
    ],
    ids=lambda value: value.get("name", "") + "-" + "-".join(sorted(value)) if isinstance(value, dict) else "",
)
def test_mistakes_are_one_line_naming_the_key(model, message):
    with pytest.raises(UserError) as error:
        validate_job({"name": "job", "model": model})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_defaults_are_the_recipes():
    assert model_section(name="unet").encoder == "none"  # the plain seed U-Net
    pspnet = model_section(name="pspnet")
    assert (pspnet.encoder, pspnet.output_stride, pspnet.bins, pspnet.aux_weight) == ("resnet50", 8, [1, 2, 3, 6], 0.4)
    segnet = model_section(name="segnet")
    assert (segnet.encoder, segnet.stages, segnet.width) == ("vgg16_bn", 5, 64)
    assert model_section(name="unet", encoder="resnet50").decoder_channels == [256, 128, 64, 32, 16]


def test_default_values_of_encoder_keys_are_accepted_on_the_plain_unet():
    assert model_section(name="unet", freeze_encoder=False, extra_channel_init="zero").encoder == "none"


def test_freeze_encoder_takes_true_false_or_a_stage_count():
    assert model_section(name="pspnet", freeze_encoder=True).freeze_encoder is True
    assert model_section(name="pspnet", freeze_encoder=3).freeze_encoder == 3


def test_the_engine_reads_aux_weight_from_the_model_section():
    assert getattr(model_section(name="pspnet", aux_weight=0.25), "aux_weight", 0.0) == 0.25
    assert getattr(model_section(name="unet"), "aux_weight", 0.0) == 0.0


def test_local_weight_paths_become_absolute_for_workers(tmp_path):
    job = validate_job({"name": "job",
                        "model": {"name": "unet", "encoder": "resnet18", "encoder_weights": "weights/r18.pth"}})
    assert resolve_local_paths(job, base=tmp_path).model.encoder_weights == str(tmp_path / "weights/r18.pth")
    remote = validate_job({"name": "job", "model": {"name": "pspnet", "encoder_weights": "s3://bucket/r50.pth"}})
    assert resolve_local_paths(remote, base=tmp_path).model.encoder_weights == "s3://bucket/r50.pth"


# --- the seed recipes' jobs -------------------------------------------------------------

# job file -> (model class, input channels, classes, parameters without encoder weights)
RECIPES = {
    "nyuv2_unet_r50_rgbd_se": (EncoderUNet, 4, 13, 30_484_013),
    "voc_pspnet_r50": (PSPNet, 3, 21, 48_957_802),
    "pets_segnet": (SegNet, 3, 3, 15_277_577),
    "pets_unet_mobilenet": (EncoderUNet, 3, 3, 5_559_011),
    "camvid_segnet": (SegNet, 3, 11, 29_445_643),  # the SegNet paper: 29.5 M
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_jobs_validate_and_build_their_model(name):
    job = load_job(JOBS / f"{name}.yaml")
    assert job.name == name
    model_class, in_channels, classes, parameters = RECIPES[name]
    # the weight files are the user's to fetch; the architecture is the same without them
    model = create_model(job.model.model_copy(update={"encoder_weights": None}), in_channels, classes)
    assert isinstance(model, model_class)
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_recipe_jobs_carry_the_recipes_numbers():
    nyuv2 = load_job(JOBS / "nyuv2_unet_r50_rgbd_se.yaml")
    assert (nyuv2.data.name, nyuv2.model.encoder, nyuv2.model.se, nyuv2.optim.name, nyuv2.optim.schedule.name) == (
        "nyuv2", "resnet50", True, "adamw", "plateau")
    voc = load_job(JOBS / "voc_pspnet_r50.yaml")
    assert (voc.optim.name, voc.optim.lr, voc.optim.weight_decay, voc.optim.schedule.name,
            voc.optim.schedule.power) == ("sgd", 0.01, 0.0001, "poly", 0.9)
    assert voc.model.aux_weight == 0.4
    pets = load_job(JOBS / "pets_segnet.yaml")
    assert (pets.optim.name, pets.optim.lr, pets.optim.schedule.step_epochs, pets.optim.schedule.gamma) == (
        "adam", 0.001, 7, 0.7)
    assert (pets.data.image_size, pets.train.epochs, pets.model.stages, pets.model.input_batchnorm) == (
        128, 20, 4, True)
    assert load_job(JOBS / "pets_unet_mobilenet.yaml").model.encoder == "mobilenet_v2"
    assert load_job(JOBS / "camvid_segnet.yaml").data.name == "camvid"


def test_a_recipe_job_takes_overrides_of_its_model():
    job = load_job(JOBS / "voc_pspnet_r50.yaml", overrides=["model.encoder=mobilenet_v2", "model.output_stride=16"])
    assert (job.model.encoder, job.model.output_stride) == ("mobilenet_v2", 16)
    with pytest.raises(UserError, match=r"voc_pspnet_r50.yaml \(--set model.bins=\[0\]\): model.bins.0"):
        load_job(JOBS / "voc_pspnet_r50.yaml", overrides=["model.bins=[0]"])
