"""Encoders: torchvision backbones without their classifier, returning one feature map per stage.

    encoder = Encoder("resnet50", in_channels=4)              # random init, 4-channel conv1
    features = encoder(images)                                # 5 maps, strides 2, 4, 8, 16, 32
    encoder.channels, encoder.strides                         # (64, 256, 512, 1024, 2048), (2, ..., 32)
    Encoder("resnet50", output_stride=8).strides              # (2, 4, 8, 8, 8): layer3/4 dilated
    Encoder("convnext_tiny").strides                          # (4, 8, 16, 32): no stride-2 stage

Each entry of ENCODERS names the torchvision constructor (always called with weights=None),
the modules each stage runs and what it outputs. The encoder keeps torchvision's module
names, so its state dict is torchvision's minus the classifier and torchvision's weight
files load as they are (weights.py).

Output stride 8 or 16 (PSPNet) replaces the stride-2 step of each later stage by dilation:
every conv of a stage whose nominal stride exceeds the target gets stride 1 and dilation
nominal / target, as in the PSPNet authors' ResNet (all 3x3 convs of layer3 dilated 2, of
layer4 dilated 4). VGG's max-pools can't be dilated away; its output stride stays 32.
ConvNeXt's 2x2 stride-2 down-sampling convs dilate too: at rate 2 or 4 their two taps
sit `rate` apart, centred with padding rate / 2.

A map at stride s has ceil(H / s) rows, as padded strided convs give (ResNet, MobileNet,
EfficientNet, RegNet). ConvNeXt's convs have no padding and would floor instead, dropping
up to 31 bottom rows: its input is zero-padded bottom/right to a multiple of its output
stride and each map is cut back to ceil(H / s) rows, so every pixel is seen, any size works
and decoders align its maps exactly as a ResNet's. ConvNeXt starts at stride 4 (its stem is
a 4x4 stride-4 conv), so a U-Net on it has no skip for its top two up-sampling steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.models as tv
from torch import nn

from segjob.job.registry import Registry
from segjob.models.backbone import Backbone
from segjob.models.input_channels import rebuild_first_conv
from segjob.models.vgg import VGG16BNTrunk


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    classifier: Callable[..., nn.Module]  # torchvision constructor (or stand-in), called with weights=None
    stages: tuple[tuple[str, ...], ...]  # paths of the modules each stage runs, in order
    channels: tuple[int, ...]  # channels each stage outputs
    strides: tuple[int, ...]  # input size / each stage's output size (undilated)
    first_conv: str  # path of the conv that sees the image
    min_size: int = 1  # smallest input side that survives every down-sampling
    dilatable: bool = True
    pads_input: bool = False  # unpadded strided convs (ConvNeXt): pad the input, cut the maps to ceil(H / s)
    batchnorm_at_deepest: bool = True  # BatchNorm runs on the deepest map (not ConvNeXt's LayerNorm)

    def __post_init__(self) -> None:
        if not len(self.stages) == len(self.channels) == len(self.strides):
            raise ValueError(f"encoder '{self.name}': stages, channels and strides must have one entry per stage")


def _resnet(name: str, classifier: Callable[..., nn.Module], channels: tuple[int, ...]) -> EncoderSpec:
    stages = (("conv1", "bn1", "relu"), ("maxpool", "layer1"), ("layer2",), ("layer3",), ("layer4",))
    return EncoderSpec(name, classifier, stages, channels, (2, 4, 8, 16, 32), first_conv="conv1")


def _feature_slices(*ends: int) -> tuple[tuple[str, ...], ...]:
    """Stages of a `features` Sequential: stage k runs features[ends[k-1]:ends[k]]."""
    starts = (0, *ends[:-1])
    return tuple(tuple(f"features.{i}" for i in range(start, end)) for start, end in zip(starts, ends))


def _convnext(name: str, classifier: Callable[..., nn.Module]) -> EncoderSpec:
    # features: stem (4x4 stride-4 conv), stage 1, then (down-sampling, stage) three times
    return EncoderSpec(name, classifier, _feature_slices(2, 4, 6, 8), (96, 192, 384, 768), (4, 8, 16, 32),
                       first_conv="features.0.0", pads_input=True, batchnorm_at_deepest=False)


def _regnet(name: str, classifier: Callable[..., nn.Module], widths: tuple[int, ...]) -> EncoderSpec:
    stages = (("stem",), *((f"trunk_output.block{i}",) for i in range(1, 5)))
    return EncoderSpec(name, classifier, stages, (32, *widths), (2, 4, 8, 16, 32), first_conv="stem.0")


ENCODERS: Registry[EncoderSpec] = Registry(
    "encoder",
    (
        _resnet("resnet18", tv.resnet18, (64, 64, 128, 256, 512)),
        _resnet("resnet34", tv.resnet34, (64, 64, 128, 256, 512)),
        _resnet("resnet50", tv.resnet50, (64, 256, 512, 1024, 2048)),
        _resnet("resnet101", tv.resnet101, (64, 256, 512, 1024, 2048)),
        # Each VGG block's output before its max-pool (strides 1..16), then the last pool alone (32).
        EncoderSpec(
            "vgg16_bn", VGG16BNTrunk, _feature_slices(6, 13, 23, 33, 43, 44), (64, 128, 256, 512, 512, 512),
            (1, 2, 4, 8, 16, 32), first_conv="features.0", min_size=32, dilatable=False,
        ),
        # Each stage ends with the last block at its stride (the one before the next stride-2 block).
        EncoderSpec(
            "mobilenet_v2", tv.mobilenet_v2, _feature_slices(2, 4, 7, 14, 19), (16, 24, 32, 96, 1280),
            (2, 4, 8, 16, 32), first_conv="features.0.0",
        ),
        EncoderSpec(
            "mobilenet_v3_large", tv.mobilenet_v3_large, _feature_slices(2, 4, 7, 13, 17), (16, 24, 40, 112, 960),
            (2, 4, 8, 16, 32), first_conv="features.0.0",
        ),
        # Stage 16 ends at features.5 (the stride-1 MBConv stage after the stride-2 one); 1280: the 1x1 head conv.
        EncoderSpec(
            "efficientnet_v2_s", tv.efficientnet_v2_s, _feature_slices(2, 3, 4, 6, 8), (24, 48, 64, 160, 1280),
            (2, 4, 8, 16, 32), first_conv="features.0.0",
        ),
        _regnet("regnet_y_800mf", tv.regnet_y_800mf, (64, 144, 320, 784)),
        _regnet("regnet_x_1_6gf", tv.regnet_x_1_6gf, (72, 168, 408, 912)),
        _convnext("convnext_tiny", tv.convnext_tiny),
        _convnext("convnext_small", tv.convnext_small),
    ),
    sort_valid=False,  # smallest to largest within a kind, as registered
    error=ValueError,  # a caller's bug: the schema has checked a job file's model.encoder already
)


def encoder_spec(name: str) -> EncoderSpec:
    return ENCODERS.lookup(name)


class Encoder(Backbone):
    def __init__(self, name: str, in_channels: int = 3, output_stride: int = 32):
        super().__init__()
        spec = encoder_spec(name)
        if output_stride not in (8, 16, 32) or (output_stride != 32 and not spec.dilatable):
            valid = "8, 16 or 32" if spec.dilatable else "32"
            raise ValueError(f"encoder '{name}': output_stride must be {valid}, got {output_stride}")
        self.name = name
        self.first_conv = spec.first_conv
        self.min_size = min(spec.min_size, output_stride)  # a dilated stage no longer floors
        self.channels = spec.channels
        classifier = spec.classifier(weights=None)
        used = {path.split(".")[0] for stage in spec.stages for path in stage}
        for child_name, child in classifier.named_children():
            if child_name in used:  # avgpool, fc and classifier stay behind
                self.add_module(child_name, child)
        if in_channels != 3:
            rebuild_first_conv(self, spec.first_conv, in_channels)
        # plain lists, not ModuleLists: the modules are registered once, under torchvision's names
        self.stage_modules = [[self.get_submodule(path) for path in stage] for stage in spec.stages]
        self.strides = tuple(min(stride, output_stride) for stride in spec.strides)
        self.pad_multiple = self.strides[-1] if spec.pads_input else 1
        for stage, stride in zip(self.stage_modules, spec.strides):
            if stride > output_stride:
                _dilate(stage, rate=stride // output_stride)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"the {self.name} encoder needs inputs of at least {self.min_size}x{self.min_size} pixels "
                f"(got {x.shape[-2]}x{x.shape[-1]})"
            )
        height, width = x.shape[-2:]
        if self.pad_multiple > 1:
            x = F.pad(x, (0, -width % self.pad_multiple, 0, -height % self.pad_multiple))
        features = []
        for stage, stride in zip(self.stage_modules, self.strides):
            for module in stage:
                x = module(x)
            # the next stage reads the whole padded map; decoders get the rows and columns that hold the image
            features.append(x[..., : -(-height // stride), : -(-width // stride)] if self.pad_multiple > 1 else x)
        return features


def _dilate(stage: list[nn.Module], rate: int) -> None:
    """Stride 1 and dilation `rate` for every conv of a stage; padding keeps 'same' sizes
    ((k - 1) x rate / 2 a side: exact for odd kernels, and for ConvNeXt's 2x2 at even rates)."""
    for module in stage:
        for conv in module.modules():
            if isinstance(conv, nn.Conv2d):
                if any((k - 1) * rate % 2 for k in conv.kernel_size):
                    raise ValueError(f"a {conv.kernel_size} conv cannot keep its size at dilation {rate}")
                conv.stride = (1, 1)
                conv.dilation = (rate, rate)
                conv.padding = tuple((k - 1) * rate // 2 for k in conv.kernel_size)
