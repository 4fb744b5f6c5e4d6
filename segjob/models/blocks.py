"""Building blocks shared by the decoders: conv-BN-ReLU, the double conv, the SE gate, and
skip/up-sample alignment.

    block = DoubleConv(128, 64)                 # (3x3 conv -> BN -> ReLU) x 2
    gate = squeeze_excitation(64, reduction=16)  # x * sigmoid(fc(relu(fc(avgpool(x)))))
    up = match_size(up, skip.shape[-2:])         # crop or pad to the skip's H, W

An up-sampled tensor and the skip it joins differ by a pixel whenever a level had an odd
size (37 -> max-pool -> 18 -> up -> 36; or 37 -> stride-2 conv -> 19 -> up -> 38). Decoders
make them agree before concatenating by cropping or padding the up-sampled tensor to the
skip's size, so every skip pixel is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import SqueezeExcitation


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BatchNorm -> ReLU) twice; the size is kept (padding 1)."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        mid_channels = mid_channels or out_channels
        super().__init__(
            # BN's shift makes a bias redundant
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


class ConvBNReLU(nn.Sequential):
    """3x3 conv (size kept) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            # BN's shift makes a bias redundant
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out", nonlinearity="relu")


def squeeze_excitation(channels: int, reduction: int = 16) -> SqueezeExcitation:
    """The Squeeze-and-Excitation gate (Hu et al. 2018): per-channel scales in (0, 1) from the
    channel means through a bottleneck of channels / reduction units."""
    # at least 8 units (or all channels): a gate of one or two ReLU units can die in a narrow decoder
    hidden = max(channels // reduction, min(channels, 8))
    return SqueezeExcitation(channels, hidden)


def pad_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Zero-pad the last two dims of `x` to `size` (H, W); an odd extra pixel goes bottom/right."""
    extra_h, extra_w = int(size[0]) - x.shape[-2], int(size[1]) - x.shape[-1]
    if extra_h < 0 or extra_w < 0:
        raise ValueError(f"pad_to: {tuple(x.shape[-2:])} is larger than the target {tuple(size)}")
    if extra_h == 0 and extra_w == 0:
        return x
    return F.pad(x, (extra_w // 2, extra_w - extra_w // 2, extra_h // 2, extra_h - extra_h // 2))


def center_crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The central `size` (H, W) window of `x`'s last two dims (an odd extra pixel is cut bottom/right)."""
    height, width = int(size[0]), int(size[1])
    extra_h, extra_w = x.shape[-2] - height, x.shape[-1] - width
    if extra_h < 0 or extra_w < 0:
        raise ValueError(f"center_crop_to: {tuple(x.shape[-2:])} is smaller than the target {tuple(size)}")
    top, left = extra_h // 2, extra_w // 2
    return x[..., top : top + height, left : left + width]


def match_size(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """`x` cropped (centered) where it is larger than `size` and zero-padded where smaller, per dim."""
    height = min(x.shape[-2], int(size[0]))
    width = min(x.shape[-1], int(size[1]))
    return pad_to(center_crop_to(x, (height, width)), size)
