"""VGG-BN conv layers in torchvision's layout, at any width and depth (SegNet, the vgg16_bn encoder).

    features = vgg_bn_features()                       # torchvision's vgg16_bn().features, 14.7 M parameters
    features = vgg_bn_features(widths=(32, 64, 128, 256), convs_per_block=(2, 2, 3, 3))

The Sequential holds conv, BN, ReLU per conv and a 2x2 max-pool after each block, at the
same indices as torchvision's (`features.0` is the first conv), so torchvision's vgg16_bn
weight files load into it. Building torchvision's whole vgg16_bn instead would also build
its 120 M-parameter classifier only to throw it away (about 2 s each time).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models.vgg import make_layers

VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_CONVS_PER_BLOCK = (2, 2, 3, 3, 3)


def vgg_bn_features(
    widths: Sequence[int] = VGG16_WIDTHS, convs_per_block: Sequence[int] = VGG16_CONVS_PER_BLOCK
) -> nn.Sequential:
    if len(widths) != len(convs_per_block):
        raise ValueError(f"one width per block: {len(widths)} widths for {len(convs_per_block)} blocks")
    layout: list[int | str] = []
    for width, convs in zip(widths, convs_per_block):
        layout += [width] * convs + ["M"]
    features = make_layers(layout, batch_norm=True)
    for module in features.modules():  # torchvision's VGG initialisation
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return features


class VGG16BNTrunk(nn.Module):
    """Stands in for torchvision's vgg16_bn in the encoder registry: the same `features`, no classifier."""

    def __init__(self, weights: None = None):
        super().__init__()
        if weights is not None:
            raise ValueError("weights come from model.encoder_weights, never from a hub")
        self.features = vgg_bn_features()
