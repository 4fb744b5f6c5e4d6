"""Backbones for images with other than 3 channels (RGB-D, grey): the first conv, rebuilt.

    rebuild_first_conv(encoder, "conv1", in_channels=4)         # fresh 4-channel conv1
    weight = widen_rgb_filters(rgb_weight, 4, "zero")           # pretrained RGB filters + a zero depth slice

With pretrained weights, the RGB filters are kept as they are and the extra channels'
filters start at zero (the seed's RGB-D recipe: the network starts as the RGB network and
learns how much depth to use) or at the mean of the RGB filters (depth then contributes
from the first step, like a grey channel). Without weights the rebuilt conv gets the same
plain initialisation as the rest of the backbone.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

ExtraChannelInit = Literal["zero", "mean"]


def rebuild_first_conv(module: nn.Module, path: str, in_channels: int) -> nn.Conv2d:
    """Replace the conv at `path` inside `module` with one taking `in_channels`; returns the new conv."""
    old = module.get_submodule(path)
    if not isinstance(old, nn.Conv2d):
        raise TypeError(f"{path} is a {type(old).__name__}, not the Conv2d the image enters")
    new = nn.Conv2d(
        in_channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
        dilation=old.dilation, groups=old.groups, bias=old.bias is not None,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")  # as torchvision initialises its backbones
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    parent_path, _, name = path.rpartition(".")
    setattr(module.get_submodule(parent_path) if parent_path else module, name, new)
    return new


def widen_rgb_filters(rgb: torch.Tensor, in_channels: int,
                      extra_channel_init: ExtraChannelInit = "zero") -> torch.Tensor:
    """First-conv weights [out, 3, kh, kw] trained on RGB, turned into [out, in_channels, kh, kw].

    3 or more channels: the RGB filters unchanged in the first three, each extra channel zero
    or the RGB filters' mean. Fewer: the first channel gets the RGB filters' sum (a grey
    image has R = G = B, so the response is kept), any second one follows the policy.
    """
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"expected RGB conv weights [out, 3, kh, kw], got {tuple(rgb.shape)}")
    extra = torch.zeros_like(rgb[:, :1]) if extra_channel_init == "zero" else rgb.mean(dim=1, keepdim=True)
    if in_channels >= 3:
        return torch.cat([rgb, extra.expand(-1, in_channels - 3, -1, -1)], dim=1).contiguous()
    grey = rgb.sum(dim=1, keepdim=True)
    return torch.cat([grey, extra.expand(-1, in_channels - 1, -1, -1)], dim=1).contiguous()
