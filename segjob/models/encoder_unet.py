"""U-Net on a torchvision encoder (the seed's ResNet50 RGB-D U-Net, the Pets MobileNet U-Net).

    model = EncoderUNet(Encoder("resnet50", in_channels=4), num_classes=13, se_reduction=16)
    logits = model(images)   # [N, 4, H, W] -> [N, 13, H, W], any H, W

The encoder's deepest stage feeds the decoder; every shallower stage is a skip. Each
decoder step doubles the resolution with a 2x2 transposed conv, aligns it to the skip at
that stride (crop or pad, so odd sizes like CamVid's 360x480 work), concatenates
[skip, up] and runs a double conv, then an optional Squeeze-and-Excitation gate. For
ResNet50 the skips are conv1/bn1/relu (stride 2), layer1 (4), layer2 (8) and layer3 (16);
the last step (2 -> 1) has no skip. A 1x1 conv maps the last step to class logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from segjob.models.blocks import DoubleConv, match_size, squeeze_excitation
from segjob.models.encoders import Encoder


class UpBlock(nn.Module):
    """x2 transposed conv -> aligned to the skip -> concat [skip, up] -> double conv -> SE gate."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, se_reduction: int | None = None):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(skip_channels + out_channels, out_channels)
        self.gate = squeeze_excitation(out_channels, se_reduction) if se_reduction else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([skip, match_size(x, skip.shape[-2:])], dim=1)
        return self.gate(self.conv(x))


class EncoderUNet(nn.Module):
    def __init__(
        self,
        encoder: Encoder,
        num_classes: int,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        se_reduction: int | None = None,
    ):
        super().__init__()
        strides = encoder.strides
        steps = round(math.log2(strides[-1]))
        if list(strides) != sorted(set(strides)) or 2**steps != strides[-1]:
            raise ValueError("EncoderUNet needs an undilated encoder (strides doubling up to a power of 2), "
                             f"got {strides}")
        if len(decoder_channels) != steps:
            raise ValueError(
                f"the {encoder.name} encoder reaches stride {strides[-1]}: {steps} decoder widths needed, "
                f"got {len(decoder_channels)}"
            )
        stage_at_stride = {stride: index for index, stride in enumerate(strides[:-1])}
        self.encoder = encoder
        self.skip_stages: list[int | None] = []  # the encoder stage each decoder step joins, if any
        blocks = []
        in_channels, stride = encoder.channels[-1], strides[-1]
        for width in decoder_channels:
            stride //= 2
            skip = stage_at_stride.get(stride)
            skip_channels = encoder.channels[skip] if skip is not None else 0
            blocks.append(UpBlock(in_channels, skip_channels, width, se_reduction))
            self.skip_stages.append(skip)
            in_channels = width
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        features = self.encoder(x)
        x = features[-1]
        for block, skip in zip(self.decoder, self.skip_stages):
            x = block(x, features[skip] if skip is not None else None)
        return self.head(match_size(x, size))
