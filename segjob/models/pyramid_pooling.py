"""PSPNet's pyramid pooling module (Zhao et al. 2017): context from grids of 1, 2, 3 and 6 cells.

    pyramid = PyramidPooling(2048, bins=(1, 2, 3, 6))   # out_channels = 2048 + 4 * 512
    context = pyramid(features)                         # [N, 2048, h, w] -> [N, 4096, h, w]

Each branch: adaptive average pool to a bins x bins grid -> 1x1 conv to C / len(bins)
channels -> BatchNorm -> ReLU -> bilinear up-sampling back (align_corners=True, as the
paper's code). The features and all branches are concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class PyramidPooling(nn.Module):
    def __init__(self, in_channels: int, bins: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        branch_channels = in_channels // len(bins)
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(bin_size),
                nn.Conv2d(in_channels, branch_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(branch_channels),
                nn.ReLU(inplace=True),
            )
            for bin_size in bins
        )
        self.out_channels = in_channels + branch_channels * len(bins)
        for branch in self.branches:
            nn.init.kaiming_normal_(branch[1].weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(branch(x), size=size, mode="bilinear", align_corners=True) for branch in self.branches]
        return torch.cat([x, *pooled], dim=1)
