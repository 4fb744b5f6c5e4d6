"""DeepLabV3+, torchvision's own segmentation models and the modern encoders (ConvNeXt,
EfficientNetV2, RegNet): shapes at odd sizes, one training step that moves every weight,
what each needs of the job, weights from a file, and the documented weight conversions.

The shared model checks (test_models.BaseModelTester) run on one small member of each family;
the rest get the shape and training-step checks, which are what differ between them.
"""

from __future__ import annotations

import math
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tv
import torchvision.models.segmentation as tvseg
from model_needs import ONE_VALUE, assert_smallest_inputs
from test_models import BaseModelTester
from torch import nn
from torchvision.ops import StochasticDepth

from segjob.engine import loop
from segjob.engine.session import LocalSession
from segjob.job.load import validate_job
from segjob.job.schema import DeepLabV3PlusConfig, JobConfig, LRASPPMobileNetV3Config, UNetConfig
from segjob.models import DeepLabV3Plus, Encoder, EncoderUNet, TorchvisionSegmentation, create_model
from segjob.models.torchvision_segmentation import TORCHVISION_MODELS
from segjob.store import checkpoint
from segjob.store.storage import open_storage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"
SMALL_DECODER = {"decoder_channels": [16, 16, 8, 8, 8]}
SMALL_DEEPLAB = {"decoder_channels": 16, "low_level_channels": 8}

# One of each new family and encoder; tiny decoders, the encoders as torchvision builds them.
MODERN = {
    "unet-convnext_tiny": {"name": "unet", "encoder": "convnext_tiny", **SMALL_DECODER},
    "unet-convnext_small": {"name": "unet", "encoder": "convnext_small", **SMALL_DECODER},
    "unet-efficientnet_v2_s": {"name": "unet", "encoder": "efficientnet_v2_s", **SMALL_DECODER},
    "unet-regnet_y_800mf": {"name": "unet", "encoder": "regnet_y_800mf", **SMALL_DECODER},
    "unet-regnet_x_1_6gf": {"name": "unet", "encoder": "regnet_x_1_6gf", **SMALL_DECODER},
    "deeplabv3plus-resnet18-os16": {"name": "deeplabv3plus", "encoder": "resnet18", **SMALL_DEEPLAB},
    "deeplabv3plus-resnet18-os8": {"name": "deeplabv3plus", "encoder": "resnet18", "output_stride": 8,
                                   **SMALL_DEEPLAB},
    "deeplabv3plus-mobilenet_v3_large": {"name": "deeplabv3plus", "encoder": "mobilenet_v3_large", **SMALL_DEEPLAB},
    "deeplabv3plus-convnext_tiny-os8": {"name": "deeplabv3plus", "encoder": "convnext_tiny", "output_stride": 8,
                                        **SMALL_DEEPLAB},
    "deeplabv3plus-efficientnet_v2_s": {"name": "deeplabv3plus", "encoder": "efficientnet_v2_s", **SMALL_DEEPLAB},
    "deeplabv3plus-regnet_x_1_6gf": {"name": "deeplabv3plus", "encoder": "regnet_x_1_6gf", **SMALL_DEEPLAB},
    "fcn_resnet50-aux": {"name": "fcn_resnet50", "aux_weight": 0.5},
    "fcn_resnet101": {"name": "fcn_resnet101"},
    "deeplabv3_resnet50": {"name": "deeplabv3_resnet50"},
    "deeplabv3_resnet101-aux": {"name": "deeplabv3_resnet101", "aux_weight": 0.5},
    "deeplabv3_mobilenet_v3_large-aux": {"name": "deeplabv3_mobilenet_v3_large", "aux_weight": 0.5},
    "lraspp_mobilenet_v3_large": {"name": "lraspp_mobilenet_v3_large"},
}


def model_section(section: dict):
    return validate_job({"name": "modern", "model": section}).model


def build(section: dict, in_channels: int = 3, out_channels: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(model_section(section), in_channels, out_channels)


def images(batch: int, height: int, width: int, in_channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, in_channels, height, width, generator=torch.Generator().manual_seed(1))


# --- shapes and one training step, every model ----------------------------------------------


@pytest.mark.parametrize("which", list(MODERN))
def test_logits_have_the_input_size(which):
    model = build(MODERN[which], in_channels=4, out_channels=5).eval()
    with torch.no_grad():
        for size in ((64, 64), (37, 53)):  # square, odd
            assert model(images(2, *size, in_channels=4)).shape == (2, 5, *size), size


# A bigger sibling of a family member trains the same way; its shapes are checked above.
TRAINED = [which for which in MODERN if which not in ("unet-convnext_small", "fcn_resnet101")]


@pytest.mark.parametrize("which", TRAINED)
def test_one_training_step_moves_every_weight(which):
    """The engine's own loss (auxiliary term included where there is one), one AdamW step on 2 x 64 x 64."""
    section = MODERN[which]
    model = build(section).train()
    for module in model.modules():
        if isinstance(module, StochasticDepth):  # ConvNeXt, EfficientNet: a block skipped for the whole
            module.p = 0.0  # batch of 2 would rightly not move, and this test could not tell it from a bug
    job = SimpleNamespace(model=model_section(section))
    worker = SimpleNamespace(job=job, loss_fn=lambda logits, targets: F.cross_entropy(logits, targets))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    targets = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(2))

    outputs = model(images(2, 64, 64))
    assert isinstance(outputs, dict) == ("aux" in which), "an auxiliary output exactly when aux_weight > 0"
    loss = loop.training_loss(worker, outputs, targets)
    assert math.isfinite(loss.item())
    loss.backward()
    optimizer.step()

    unmoved = [name for name, p in model.named_parameters() if torch.equal(p.detach(), before[name])]
    assert not unmoved, f"{len(unmoved)} parameters did not move, the first {unmoved[:3]}"
    with torch.no_grad():
        assert isinstance(model.eval()(images(1, 64, 64)), torch.Tensor), "eval mode returns plain logits"


# --- the shared checks on one small member of each family -------------------------------------


class TestDeepLabV3Plus(BaseModelTester):
    config = DeepLabV3PlusConfig(encoder="resnet18", **SMALL_DEEPLAB)
    min_size = 1
    sizes = [(64, 64), (37, 53)]


class TestUNetOnConvNeXt(BaseModelTester):
    config = UNetConfig(encoder="convnext_tiny", **SMALL_DECODER)
    min_size = 1
    sizes = [(64, 64), (37, 53)]


class TestLRASPP(BaseModelTester):
    config = LRASPPMobileNetV3Config()
    min_size = 1
    sizes = [(64, 64), (37, 53)]


# --- DeepLabV3+ -----------------------------------------------------------------------------


def test_deeplabv3plus_is_the_papers_structure():
    model = build({"name": "deeplabv3plus", "encoder": "resnet50"}, out_channels=21)
    assert isinstance(model, DeepLabV3Plus)
    assert model.encoder.strides == (2, 4, 8, 16, 16)  # layer4 dilated: output stride 16
    assert model.low_level_stage == 1  # layer1, stride 4, 256 channels
    atrous = [m for m in model.aspp.convs.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert [c.dilation for c in atrous] == [(6, 6), (12, 12), (18, 18)]
    assert model.aspp.project[0].in_channels == 5 * 256 and model.aspp.project[0].out_channels == 256
    assert model.reduce[0].in_channels == 256 and model.reduce[0].out_channels == 48
    assert model.decoder[0][0].in_channels == 256 + 48 and model.decoder[1][0].out_channels == 256
    assert model.head.out_channels == 21

    finer = build({"name": "deeplabv3plus", "encoder": "resnet50", "output_stride": 8}, out_channels=21)
    assert finer.encoder.strides == (2, 4, 8, 8, 8)
    atrous = [m for m in finer.aspp.convs.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert [c.dilation for c in atrous] == [(12, 12), (24, 24), (36, 36)]
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in finer.parameters()), "the output stride changes no weights"


def test_deeplabv3plus_refuses_vgg():
    with pytest.raises(Exception, match="model.encoder: 'vgg16_bn' is not allowed"):
        model_section({"name": "deeplabv3plus", "encoder": "vgg16_bn"})


# --- torchvision's models -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"])
def test_torchvision_models_are_torchvisions_and_compute_the_same(name):
    """The same state dict as torchvision's model, and with its weights the same logits."""
    aux = TORCHVISION_MODELS[name].aux_head
    torch.manual_seed(0)
    options = {"aux_loss": True} if aux else {}
    reference = getattr(tvseg, name)(weights=None, weights_backbone=None, num_classes=4, **options).eval()
    section = {"name": name, "aux_weight": 0.5} if aux else {"name": name}
    ours = build(section, out_channels=4).eval()
    assert isinstance(ours, TorchvisionSegmentation)
    ours.load_state_dict(reference.state_dict())  # strict: same names, same shapes
    batch = images(2, 37, 53)
    with torch.no_grad():
        torch.testing.assert_close(ours(batch), reference(batch)["out"])


def test_torchvision_aux_head_only_when_its_weight_is_positive():
    assert build({"name": "fcn_resnet50"}).aux_classifier is None
    assert build({"name": "fcn_resnet50", "aux_weight": 0.5}).aux_classifier is not None
    with pytest.raises(Exception, match="model.aux_weight: unknown key"):  # LR-ASPP has none
        model_section({"name": "lraspp_mobilenet_v3_large", "aux_weight": 0.5})


def test_torchvision_models_freeze_their_backbone_stages():
    model = build({"name": "deeplabv3_mobilenet_v3_large", "freeze_encoder": 2}).train()
    frozen = [model.backbone[str(i)] for i in range(4)]  # features 0-3: strides 2 and 4
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in model.backbone["4"].parameters())
    assert not frozen[0][1].training and model.backbone["4"].training  # frozen BatchNorm stays in eval mode
    assert all(p.requires_grad for p in model.classifier.parameters())


# --- ConvNeXt's padding ---------------------------------------------------------------------


def test_convnext_sees_the_last_rows_and_columns():
    """Unpadded stride-4 convs would drop the bottom 3 rows of 63 and the right 3 columns of 35."""
    encoder = Encoder("convnext_tiny").eval()
    image = images(1, 63, 35)
    changed = image.clone()
    changed[..., -1, -1] += 10.0
    with torch.no_grad():
        before, after = encoder(image), encoder(changed)
    assert [tuple(f.shape[-2:]) for f in before] == [(16, 9), (8, 5), (4, 3), (2, 2)]  # ceil(H / stride)
    assert all(not torch.equal(b, a) for b, a in zip(before, after)), "the last pixel reaches every stage"


def test_convnext_is_unchanged_where_no_padding_is_needed():
    encoder = Encoder("convnext_tiny").eval()
    image = images(1, 64, 96)
    with torch.no_grad():
        features = encoder(image)
        x = image
        for stage, feature in zip(encoder.stage_modules, features):
            for module in stage:
                x = module(x)
            torch.testing.assert_close(feature, x)


def test_unet_on_convnext_has_no_skip_above_stride_4():
    model = build(MODERN["unet-convnext_tiny"])
    assert isinstance(model, EncoderUNet)
    # decoder steps to strides 16, 8, 4 join stages 2, 1, 0; the steps to 2 and 1 have nothing to join
    assert model.skip_stages == [2, 1, 0, None, None]


# --- what each model needs of the job --------------------------------------------------------

# (model section, smallest input, smallest input for a one-sample training batch; None: never)
NEEDS = {
    "deeplabv3plus": ({"name": "deeplabv3plus", "encoder": "resnet18", **SMALL_DEEPLAB}, 1, None),
    "deeplabv3plus-convnext": ({"name": "deeplabv3plus", "encoder": "convnext_tiny", **SMALL_DEEPLAB}, 1, None),
    "fcn": ({"name": "fcn_resnet50"}, 1, 9),
    "deeplabv3": ({"name": "deeplabv3_mobilenet_v3_large"}, 1, None),
    "lraspp": ({"name": "lraspp_mobilenet_v3_large"}, 1, 17),
    "unet-convnext": ({"name": "unet", "encoder": "convnext_tiny", **SMALL_DECODER}, 1, 17),
    "unet-efficientnet": ({"name": "unet", "encoder": "efficientnet_v2_s", **SMALL_DECODER}, 1, 33),
    "unet-regnet": ({"name": "unet", "encoder": "regnet_y_800mf", **SMALL_DECODER}, 1, 33),
    # the whole encoder frozen: its BatchNorm keeps its statistics, the decoder's at stride 16 still counts
    "unet-regnet-frozen": ({"name": "unet", "encoder": "regnet_y_800mf", "freeze_encoder": True,
                            **SMALL_DECODER}, 1, 17),
}


@pytest.mark.parametrize("which", list(NEEDS))
def test_each_model_trains_at_its_smallest_input_and_not_one_below(which):
    assert_smallest_inputs(*NEEDS[which], below=ONE_VALUE)


# --- the engine: one short epoch, checkpoints that load back ---------------------------------


@pytest.mark.parametrize("which", ["deeplabv3plus-mobilenet_v3_large", "deeplabv3_mobilenet_v3_large-aux"])
def test_one_epoch_through_the_engine(which, tmp_path):
    job = JobConfig.model_validate({
        "name": "modern", "seed": 5,
        "data": {"name": "synthetic", "num_classes": 3, "train_samples": 8, "val_samples": 4, "image_size": 32},
        "model": MODERN[which],
        "optim": {"name": "sgd", "lr": 0.01, "schedule": {"name": "poly"}},
        "train": {"epochs": 1, "batch_size": 4, "log_every_steps": 1},
        "scaling": {"num_workers": 1, "torch_threads": 1},
        "storage": {"uri": str(tmp_path), "keep_best": 1},
        "preemption": {"aws_metadata_url": None, "gcp_metadata_url": None},  # tests talk to 127.0.0.1 only
    })
    metrics = loop.run(job, LocalSession("cpu"))
    assert metrics["step"] == 2 and math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    storage = open_storage(str(tmp_path))
    saved = checkpoint.load(storage, checkpoint.latest(storage, storage.path("modern")), expected_run="modern")
    rebuilt = create_model(JobConfig.model_validate(saved.meta["job"]).model, 3, 3)
    rebuilt.load_state_dict(saved.model_state)  # strict: the checkpoint fits the model its job describes


# --- weights from a file, and the documented conversions ------------------------------------


def saved(tmp_path: Path, name: str, state: dict[str, torch.Tensor]) -> str:
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("encoder", ["convnext_tiny", "efficientnet_v2_s", "regnet_y_800mf"])
def test_modern_encoders_load_torchvisions_classifier_files(tmp_path, encoder):
    torch.manual_seed(3)
    state = getattr(tv, encoder)(weights=None).state_dict()
    path = saved(tmp_path, f"{encoder}.pth", state)
    model = build({"name": "deeplabv3plus", "encoder": encoder, "encoder_weights": path, **SMALL_DEEPLAB})
    for key, tensor in model.encoder.state_dict().items():
        assert torch.equal(tensor, state[key]), key


@pytest.mark.parametrize("name, classifier", [("fcn_resnet50", "resnet50"),
                                              ("lraspp_mobilenet_v3_large", "mobilenet_v3_large")])
def test_torchvision_models_load_their_backbones_classifier_file(tmp_path, name, classifier):
    torch.manual_seed(3)
    state = getattr(tv, classifier)(weights=None).state_dict()
    path = saved(tmp_path, f"{classifier}.pth", state)
    model = build({"name": name, "encoder_weights": path}, in_channels=4)
    prefix = "features." if classifier.startswith("mobilenet") else ""
    first_conv = "conv1.weight" if not prefix else "features.0.0.weight"
    for key, tensor in model.backbone.state_dict().items():
        expected = state[prefix + key]
        if prefix + key == first_conv:  # widened to 4 channels: RGB kept, depth starts at zero
            assert torch.equal(tensor[:, :3], expected) and not tensor[:, 3].any()
        else:
            assert torch.equal(tensor, expected), key


def documented_commands() -> list[list[str]]:
    """The `python -c` one-liners of docs/models.md, split as a shell would."""
    commands = [shlex.split(line) for line in re.findall(r"^python -c .*$", DOCS.read_text(), flags=re.MULTILINE)]
    assert len(commands) == 2, "docs/models.md: expected the safetensors and the backbone one-liners"
    return commands


def run_documented(command: list[str], *paths: str) -> None:
    """The documented command with its example paths replaced by ours (and any extra arguments)."""
    program = command[:3]  # python -c '<code>'
    subprocess.run([sys.executable, *program[1:], *paths], check=True, timeout=60)


def test_documented_safetensors_one_liner_makes_a_file_segjob_loads(tmp_path):
    to_safetensors, _ = documented_commands()
    torch.manual_seed(4)
    state = tv.regnet_y_800mf(weights=None).state_dict()
    cached = saved(tmp_path, "regnet_y_800mf-58fc7688.pth", state)  # as torchvision's cache holds it
    converted = tmp_path / "regnet_y_800mf.safetensors"
    run_documented(to_safetensors, cached, str(converted))
    model = build({"name": "unet", "encoder": "regnet_y_800mf", "encoder_weights": str(converted), **SMALL_DECODER})
    for key, tensor in model.encoder.state_dict().items():
        assert torch.equal(tensor, state[key]), key


@pytest.mark.parametrize("source, section, prefix", [
    ("deeplabv3_resnet50", {"name": "deeplabv3plus", "encoder": "resnet50", **SMALL_DEEPLAB}, None),
    ("lraspp_mobilenet_v3_large", {"name": "deeplabv3_mobilenet_v3_large"}, "features."),
])
def test_documented_backbone_one_liner_turns_a_segmentation_file_into_encoder_weights(tmp_path, source, section,
                                                                                       prefix):
    _, backbone_only = documented_commands()
    torch.manual_seed(5)
    state = getattr(tvseg, source)(weights=None, weights_backbone=None, num_classes=21).state_dict()
    cached = saved(tmp_path, f"{source}_coco.pth", state)  # a torchvision segmentation file's layout
    converted = tmp_path / "backbone.pth"
    run_documented(backbone_only, cached, str(converted), *([prefix] if prefix else []))
    model = build(section | {"encoder_weights": str(converted)})
    own = model.encoder.state_dict() if isinstance(model, DeepLabV3Plus) else model.backbone.state_dict()
    for key, tensor in own.items():
        # the encoder keeps the classifier's names (features.N); torchvision's backbone drops `features.`
        backbone_key = "backbone." + (key.removeprefix("features.") if prefix else key)
        assert torch.equal(tensor, state[backbone_key]), key
