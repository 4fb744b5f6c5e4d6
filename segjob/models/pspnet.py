"""PSPNet (Zhao et al. 2017): a dilated encoder, pyramid pooling, and an auxiliary head in training.

    model = PSPNet(Encoder("resnet50", output_stride=8), num_classes=21)
    model.train(); out = model(images)   # {"out": [N, 21, H, W], "aux": [N, 21, H, W]}
    model.eval();  logits = model(images)  # [N, 21, H, W]

With ResNet50: layer4's 2048 channels at stride 8 -> pyramid pooling (bins 1/2/3/6, 512
channels each) -> 3x3 conv to 512 -> BN -> ReLU -> dropout 0.1 -> 1x1 conv to classes ->
bilinear up-sampling to the input size. The auxiliary head does the same from layer3
(1024 -> 256 channels); its loss, weighted by the job's model.aux_weight, only steers
training, so eval mode skips it. Other encoders keep the ratios: each head's hidden width
is a quarter of the encoder stage it reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segjob.models.blocks import ConvBNReLU
from segjob.models.encoders import Encoder
from segjob.models.pyramid_pooling import PyramidPooling


def classifier_head(in_channels: int, mid_channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """3x3 conv -> BN -> ReLU -> dropout -> 1x1 conv to class logits."""
    return nn.Sequential(
        ConvBNReLU(in_channels, mid_channels), nn.Dropout2d(dropout),
        nn.Conv2d(mid_channels, num_classes, kernel_size=1),
    )


class PSPNet(nn.Module):
    def __init__(
        self,
        encoder: Encoder,
        num_classes: int,
        bins: Sequence[int] = (1, 2, 3, 6),
        aux_head: bool = True,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.encoder = encoder
        self.pyramid = PyramidPooling(encoder.channels[-1], bins)
        last, second_last = encoder.channels[-1], encoder.channels[-2]
        self.head = classifier_head(self.pyramid.out_channels, last // 4, num_classes, dropout)
        self.aux_head = classifier_head(second_last, second_last // 4, num_classes, dropout) if aux_head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        size = x.shape[-2:]
        features = self.encoder(x)
        logits = _resize(self.head(self.pyramid(features[-1])), size)
        if self.training and self.aux_head is not None:
            return {"out": logits, "aux": _resize(self.aux_head(features[-2]), size)}
        return logits


def _resize(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
