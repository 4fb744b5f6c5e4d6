"""SegNet (Badrinarayanan et al. 2017): a VGG16-BN encoder whose max-pools keep their indices,
and a mirrored decoder that un-pools with them.

    model = SegNet(in_channels=3, num_classes=12)                        # the paper: 13 convs each way
    model = SegNet(3, 3, stages=4, input_batchnorm=True)                 # the Pets article's, 15.28 M parameters
    logits = model(images)   # [N, 3, H, W] -> [N, classes, H, W], H, W >= 2**stages

Encoder block k: 2 or 3 (3x3 conv -> BN -> ReLU), then a 2x2 max-pool that records where
each maximum was. Decoder block k, deepest first: max-unpool with block k's indices (each
value goes back where its maximum came from, zeros elsewhere; the recorded pre-pool size
restores odd sizes), then as many conv-BN-ReLU as the encoder block had, the last one
narrowing to the next block's width; the shallowest ends in a 3x3 conv to class logits.
No fully connected layers, and only pool indices cross from encoder to decoder.

The encoder keeps torchvision's vgg16_bn layout (`encoder.features.0` is the first conv), so
torchvision's weights load into it. The Pets article's encoder convs have no bias (BatchNorm
follows each); torchvision's have one, 2,688 of the 15,277,577 parameters here.
"""

from __future__ import annotations

import torch
from torch import nn

from segjob.models.backbone import Backbone
from segjob.models.blocks import ConvBNReLU
from segjob.models.input_channels import rebuild_first_conv
from segjob.models.vgg import VGG16_CONVS_PER_BLOCK, vgg_bn_features


def block_widths(stages: int, width: int) -> list[int]:
    """VGG16's widths scaled to `width`: doubled per block up to 8x (64, 128, 256, 512, 512)."""
    return [width * min(2**block, 8) for block in range(stages)]


class SegNetEncoder(Backbone):
    first_conv = "features.0"

    def __init__(self, in_channels: int = 3, stages: int = 5, width: int = 64):
        super().__init__()
        if not 1 <= stages <= len(VGG16_CONVS_PER_BLOCK):
            raise ValueError(f"SegNet has 1 to {len(VGG16_CONVS_PER_BLOCK)} stages, got {stages}")
        self.name = "vgg16_bn"
        self.features = vgg_bn_features(block_widths(stages, width), VGG16_CONVS_PER_BLOCK[:stages])
        if in_channels != 3:
            rebuild_first_conv(self, self.first_conv, in_channels)
        self.stage_modules = [[]]
        for layer in self.features:
            self.stage_modules[-1].append(layer)
            if isinstance(layer, nn.MaxPool2d):
                layer.return_indices = True
                self.stage_modules.append([])
        self.stage_modules.pop()  # the empty list opened after the last pool

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Size]]]:
        """The deepest pooled features, and for each block (shallowest first) its pool indices
        and its size before pooling."""
        pooled = []
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                size = x.shape[-2:]
                x, indices = layer(x)
                pooled.append((indices, size))
            else:
                x = layer(x)
        return x, pooled


class SegNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, stages: int = 5, width: int = 64,
                 input_batchnorm: bool = False):
        super().__init__()
        self.min_size = 2**stages
        self.input_norm = nn.BatchNorm2d(in_channels) if input_batchnorm else nn.Identity()
        self.encoder = SegNetEncoder(in_channels, stages, width)
        self.unpool = nn.MaxUnpool2d(kernel_size=2, stride=2)
        widths = block_widths(stages, width)
        blocks = []
        for block in reversed(range(stages)):
            channels, convs = widths[block], VGG16_CONVS_PER_BLOCK[block]
            layers: list[nn.Module] = [ConvBNReLU(channels, channels) for _ in range(convs - 1)]
            layers.append(ConvBNReLU(channels, widths[block - 1]) if block
                          else nn.Conv2d(channels, num_classes, 3, padding=1))
            blocks.append(nn.Sequential(*layers))
        self.decoder = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"SegNet with {len(self.decoder)} stages needs inputs of at least {self.min_size}x{self.min_size} "
                f"pixels (got {x.shape[-2]}x{x.shape[-1]}); use larger images or fewer model.stages"
            )
        x, pooled = self.encoder(self.input_norm(x))
        for block, (indices, size) in zip(self.decoder, reversed(pooled)):
            x = block(self.unpool(x, indices, output_size=size))
        return x
