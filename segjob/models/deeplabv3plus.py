"""DeepLabV3+ (Chen et al. 2018): a dilated encoder, atrous spatial pyramid pooling, and a light decoder.

    model = DeepLabV3Plus(Encoder("resnet50", output_stride=16), num_classes=21)
    logits = model(images)   # [N, 3, H, W] -> [N, 21, H, W], any H, W

The encoder's deepest map (stride 16, or 8) goes through ASPP: a 1x1 conv, three 3x3 convs
dilated 6/12/18 (doubled at output stride 8), and image pooling, 256 channels each,
concatenated and projected to 256 with dropout 0.5 (torchvision's ASPP module). The result
is up-sampled bilinearly to the encoder's stride-4 map, which is reduced to 48 channels
(1x1 conv) so that it does not outweigh the 256 of ASPP; the two are concatenated, pass two
3x3 conv-BN-ReLU of 256, a 1x1 conv to class logits and a bilinear up-sampling to the input
size. The paper's Xception variant makes these convs depthwise-separable; its ResNet-101
variant, built here, keeps them plain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from segjob.models.blocks import ConvBNReLU
from segjob.models.encoders import Encoder

ATROUS_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}  # the paper's: the rates follow the resolution


class DeepLabV3Plus(nn.Module):
    def __init__(self, encoder: Encoder, num_classes: int, decoder_channels: int = 256, low_level_channels: int = 48):
        super().__init__()
        output_stride = encoder.strides[-1]
        if output_stride not in ATROUS_RATES or 4 not in encoder.strides:
            raise ValueError(f"DeepLabV3+ needs an encoder at output stride 8 or 16 with a stride-4 stage, "
                             f"got strides {encoder.strides}")
        self.encoder = encoder
        self.low_level_stage = encoder.strides.index(4)
        self.aspp = ASPP(encoder.channels[-1], ATROUS_RATES[output_stride], decoder_channels)
        low_level_in = encoder.channels[self.low_level_stage]
        self.reduce = nn.Sequential(  # BN's shift makes a bias redundant
            nn.Conv2d(low_level_in, low_level_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(low_level_channels),
            nn.ReLU(inplace=True),
        )
        self.decoder = nn.Sequential(
            ConvBNReLU(decoder_channels + low_level_channels, decoder_channels),
            ConvBNReLU(decoder_channels, decoder_channels),
        )
        self.head = nn.Conv2d(decoder_channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        features = self.encoder(x)
        low_level = self.reduce(features[self.low_level_stage])
        context = F.interpolate(self.aspp(features[-1]), size=low_level.shape[-2:], mode="bilinear",
                                align_corners=False)
        logits = self.head(self.decoder(torch.cat([context, low_level], dim=1)))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
