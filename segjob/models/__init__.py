"""Segmentation models, built by name from the job's `model` section.

    model = create_model(job.model, in_channels=4, out_channels=13)
    logits = model(images)   # [N, 4, H, W] -> [N, 13, H, W]

Every model returns logits at its input's resolution, for any H and W (odd sizes too,
down to the architecture's minimum). PSPNet in training mode returns
{"out": logits, "aux": aux_logits} instead; the engine adds model.aux_weight x the aux loss.

    unet     encoder none: the plain seed U-Net (unet.py); else U-Net on a torchvision
             encoder (encoder_unet.py), optional SE gates
    pspnet   dilated encoder + pyramid pooling + auxiliary head (pspnet.py)
    segnet   VGG16-BN with max-pool indices, un-pooling decoder (segnet.py)
    deeplabv3plus  dilated encoder + ASPP + a decoder joining the stride-4 features (deeplabv3plus.py)
    fcn_resnet50, fcn_resnet101, deeplabv3_resnet50, deeplabv3_resnet101, deeplabv3_mobilenet_v3_large,
    lraspp_mobilenet_v3_large   torchvision's own models, built by its constructors
             (torchvision_segmentation.py); FCN and DeepLabV3 return {"out", "aux"} in training
             when model.aux_weight > 0

Encoders (encoders.py) are torchvision backbones built with weights=None; pretrained
weights come only from model.encoder_weights (weights.py). Adding an architecture is one
`ModelEntry` in `MODELS`: its name (the `name` tag of its config class in job/schema.py),
that class, a builder taking (config, in_channels, out_channels), and what it needs of the
job (requirements.py: its smallest input, from its downsampling depth), which
`check_model_fits(job)` checks on the driver before any worker builds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from segjob.job.registry import Entry, Registry
from segjob.job.schema import (
    DeepLabV3MobileNetV3Config,
    DeepLabV3PlusConfig,
    DeepLabV3ResNet50Config,
    DeepLabV3ResNet101Config,
    EncoderModelBase,
    FCNResNet50Config,
    FCNResNet101Config,
    JobConfig,
    LRASPPMobileNetV3Config,
    ModelConfig,
    PSPNetConfig,
    SegNetConfig,
    TorchvisionModelBase,
    UNetConfig,
)
from segjob.models.backbone import Backbone
from segjob.models.deeplabv3plus import DeepLabV3Plus
from segjob.models.encoder_unet import EncoderUNet
from segjob.models.encoders import ENCODERS, Encoder
from segjob.models.pspnet import PSPNet
from segjob.models.requirements import (
    ModelNeeds,
    check_needs,
    deeplabv3plus_needs,
    pspnet_needs,
    segnet_needs,
    torchvision_needs,
    unet_needs,
)
from segjob.models.segnet import SegNet
from segjob.models.torchvision_segmentation import TorchvisionSegmentation
from segjob.models.unet import UNet
from segjob.models.weights import load_encoder_weights

__all__ = ["ENCODERS", "MODELS", "DeepLabV3Plus", "Encoder", "EncoderUNet", "ModelEntry", "PSPNet", "SegNet",
           "TorchvisionSegmentation", "UNet", "check_model_fits", "create_model"]


@dataclass(frozen=True)
class ModelEntry(Entry):
    build: Callable[[Any, int, int], nn.Module]  # (config, in_channels, out_channels)
    needs: Callable[[Any], ModelNeeds]  # (config) -> its smallest input, from its downsampling depth


def _prepare_encoder(encoder: Backbone, cfg: EncoderModelBase) -> None:
    """Pretrained weights, then freezing: the encoder options every encoder model shares."""
    if cfg.encoder_weights:
        load_encoder_weights(encoder, cfg.encoder_weights, cfg.extra_channel_init)
    encoder.freeze(cfg.freeze_encoder)


def _build_unet(cfg: UNetConfig, in_channels: int, out_channels: int) -> nn.Module:
    se_reduction = cfg.se_reduction if cfg.se else None
    if cfg.encoder == "none":
        return UNet(
            in_channels, out_channels, base_channels=cfg.base_channels, depth=cfg.depth, se_reduction=se_reduction
        )
    encoder = Encoder(cfg.encoder, in_channels)
    _prepare_encoder(encoder, cfg)
    return EncoderUNet(encoder, out_channels, cfg.decoder_channels, se_reduction=se_reduction)


def _build_pspnet(cfg: PSPNetConfig, in_channels: int, out_channels: int) -> nn.Module:
    encoder = Encoder(cfg.encoder, in_channels, output_stride=cfg.output_stride)
    _prepare_encoder(encoder, cfg)
    return PSPNet(encoder, out_channels, bins=cfg.bins, aux_head=cfg.aux_weight > 0, dropout=cfg.dropout)


def _build_segnet(cfg: SegNetConfig, in_channels: int, out_channels: int) -> nn.Module:
    model = SegNet(in_channels, out_channels, stages=cfg.stages, width=cfg.width, input_batchnorm=cfg.input_batchnorm)
    _prepare_encoder(model.encoder, cfg)
    return model


def _build_deeplabv3plus(cfg: DeepLabV3PlusConfig, in_channels: int, out_channels: int) -> nn.Module:
    encoder = Encoder(cfg.encoder, in_channels, output_stride=cfg.output_stride)
    _prepare_encoder(encoder, cfg)
    return DeepLabV3Plus(encoder, out_channels, cfg.decoder_channels, cfg.low_level_channels)


def _build_torchvision(cfg: TorchvisionModelBase, in_channels: int, out_channels: int) -> nn.Module:
    model = TorchvisionSegmentation(cfg.name, in_channels, out_channels, aux_head=getattr(cfg, "aux_weight", 0) > 0)
    _prepare_encoder(model, cfg)  # the whole model is the Backbone: weights and freezing reach its backbone
    return model


def _torchvision(config_class: type[TorchvisionModelBase]) -> ModelEntry:
    return ModelEntry(config_class.model_fields["name"].default, config_class, _build_torchvision, torchvision_needs)


MODELS: Registry[ModelEntry] = Registry(
    "model",
    (
        ModelEntry("unet", UNetConfig, _build_unet, unet_needs),
        ModelEntry("pspnet", PSPNetConfig, _build_pspnet, pspnet_needs),
        ModelEntry("segnet", SegNetConfig, _build_segnet, segnet_needs),
        ModelEntry("deeplabv3plus", DeepLabV3PlusConfig, _build_deeplabv3plus, deeplabv3plus_needs),
        _torchvision(FCNResNet50Config),
        _torchvision(FCNResNet101Config),
        _torchvision(DeepLabV3ResNet50Config),
        _torchvision(DeepLabV3ResNet101Config),
        _torchvision(DeepLabV3MobileNetV3Config),
        _torchvision(LRASPPMobileNetV3Config),
    ),
    where="model.name",
)


def check_model_fits(job: JobConfig) -> None:
    """On the driver: a ValueError naming the keys and the fix when no worker could train job.model on
    job.data's images (too small for its depth, a one-sample BatchNorm, more frozen stages than it has)."""
    check_needs(job, MODELS.lookup(job.model.name).needs(job.model))


def create_model(cfg: ModelConfig, in_channels: int, out_channels: int) -> nn.Module:
    entry = MODELS.lookup(cfg.name)
    if not isinstance(cfg, entry.config_class):  # a programming error, not the user's
        raise TypeError(f"model '{cfg.name}' needs a {entry.config_class.__name__}, got {type(cfg).__name__}")
    model = entry.build(cfg, in_channels, out_channels)
    if cfg.channels_last:
        # NHWC weights are enough: convolutions follow their weights' layout, and so does every layer after
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.compile()  # in place: the state dict keeps its names (no "_orig_mod." prefix)
    return model
