"""Encoders: torchvision's backbones exactly, their stages, dilation and freezing."""

from __future__ import annotations

import typing

import pytest
import torch
import torchvision.models as tv
from torch import nn

from segjob.errors import UserError
from segjob.job.schema import DilatableEncoderName, EncoderName, PSPNetConfig, UNetConfig
from segjob.models import ENCODERS, Encoder, create_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", list(ENCODERS))
def test_parameters_are_torchvisions_backbone_without_its_classifier(name):
    # torchvision's classifier, counted without allocating or initialising it; RegNet reads its block widths
    # out of tensors, so it is built for real (it is small)
    with torch.device("cpu" if name.startswith("regnet") else "meta"):
        classifier = getattr(tv, name)(weights=None)
    head = [child for child_name, child in classifier.named_children() if child_name in ("fc", "classifier")]
    encoder = Encoder(name)
    assert count(encoder) == count(classifier) - sum(count(h) for h in head)
    # the same tensors under the same names, so torchvision's weight files load as they are
    expected = {k: v.shape for k, v in classifier.state_dict().items() if not k.startswith(("fc.", "classifier."))}
    assert {k: v.shape for k, v in encoder.state_dict().items()} == expected


@pytest.mark.parametrize("name", list(ENCODERS))
def test_stages_report_their_channels_and_strides(name):
    encoder = Encoder(name).eval()
    with torch.no_grad():
        features = encoder(torch.randn(1, 3, 64, 96))
    assert tuple(f.shape[1] for f in features) == encoder.channels
    assert [(64 // s, 96 // s) for s in encoder.strides] == [tuple(f.shape[-2:]) for f in features]
    assert encoder.num_stages == len(features)


@pytest.mark.parametrize("name", [n for n, spec in ENCODERS.items() if spec.dilatable])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilation_keeps_the_resolution(name, output_stride):
    encoder = Encoder(name, output_stride=output_stride).eval()
    with torch.no_grad():
        features = encoder(torch.randn(1, 3, 64, 64))
    assert encoder.strides == tuple(min(s, output_stride) for s in ENCODERS[name].strides)
    assert [f.shape[-1] for f in features] == [64 // s for s in encoder.strides]
    assert count(encoder) == count(Encoder(name)), "dilation changes no weights"


def test_vgg_cannot_dilate():
    with pytest.raises(ValueError, match="output_stride must be 32"):
        Encoder("vgg16_bn", output_stride=8)


def test_resnet_first_stage_is_conv1_bn1_relu_and_the_rest_are_its_layers():
    encoder = Encoder("resnet50")
    names = {id(module): name for name, module in encoder.named_children()}
    assert [[names[id(m)] for m in stage] for stage in encoder.stage_modules] == [
        ["conv1", "bn1", "relu"], ["maxpool", "layer1"], ["layer2"], ["layer3"], ["layer4"]
    ]


def test_unknown_encoder_lists_the_valid_names():
    with pytest.raises(ValueError,
                       match=r"unknown encoder 'resnet51' \(did you mean 'resnet50'\?\); valid: resnet18, "):
        Encoder("resnet51")


def test_config_names_every_encoder_there_is():
    assert set(typing.get_args(EncoderName)) == set(ENCODERS)
    assert set(typing.get_args(DilatableEncoderName)) == {n for n, spec in ENCODERS.items() if spec.dilatable}


def test_in_channels_rebuild_only_the_first_conv():
    three, four = Encoder("mobilenet_v2"), Encoder("mobilenet_v2", in_channels=4)
    assert four.features[0][0].in_channels == 4
    differing = {k for k, v in four.state_dict().items() if v.shape != three.state_dict()[k].shape}
    assert differing == {"features.0.0.weight"}


# --- freezing ---------------------------------------------------------------------------


def frozen_model(freeze):
    torch.manual_seed(0)
    return create_model(UNetConfig(encoder="resnet18", decoder_channels=[8] * 5, freeze_encoder=freeze), 3, 2)


def test_freezing_stages_stops_their_gradients_and_statistics():
    model = frozen_model(2).train()
    encoder = model.encoder
    frozen = {id(p) for stage in encoder.stage_modules[:2] for m in stage for p in m.parameters()}
    assert frozen and all(not p.requires_grad for p in encoder.parameters() if id(p) in frozen)
    assert all(p.requires_grad for p in model.parameters() if id(p) not in frozen)
    assert not encoder.bn1.training and not encoder.layer1.training and encoder.layer2.training
    statistics = {k: v.clone() for k, v in encoder.state_dict().items() if k.startswith(("bn1.", "layer1."))}

    logits = model(torch.randn(2, 3, 37, 53))
    (logits * torch.randn_like(logits)).sum().backward()
    for name, parameter in model.named_parameters():
        if id(parameter) in frozen:
            assert parameter.grad is None, f"{name} is frozen but got a gradient"
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"{name} got no gradient"
    for key, value in statistics.items():
        assert torch.equal(encoder.state_dict()[key], value), f"{key} moved in a frozen stage"
    model.eval().train()  # switching modes keeps frozen stages in eval mode
    assert not encoder.layer1.training and encoder.layer2.training


def test_freezing_the_whole_encoder_leaves_the_decoder_trainable():
    model = frozen_model(True)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for name, p in model.named_parameters() if not name.startswith("encoder."))
    assert all(p.requires_grad for p in frozen_model(False).parameters())


def test_freezing_more_stages_than_there_are_is_a_user_error():
    with pytest.raises(UserError, match="model.freeze_encoder: the resnet18 encoder has 5 stages; got 6"):
        frozen_model(6)


def test_pspnet_freezes_its_dilated_encoder_too():
    model = create_model(PSPNetConfig(encoder="mobilenet_v2", output_stride=16, freeze_encoder=True), 3, 2)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
