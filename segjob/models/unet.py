"""The plain U-Net (Ronneberger et al. 2015, with BatchNorm): the seed baseline.

    model = UNet(in_channels=3, num_classes=4, base_channels=32, depth=4)
    logits = model(images)   # [N, 3, H, W] -> [N, 4, H, W], any H, W >= 2**depth

Level l (0..depth) has base_channels * 2**l channels. Going down: DoubleConv, then 2x2
max-pool. Going up: 2x2 transposed conv (stride 2), pad to the skip's size, concatenate
[skip, up], DoubleConv, and with `se_reduction` a Squeeze-and-Excitation gate. A 1x1 conv
maps the top level to class logits.
"""

from __future__ import annotations

import torch
from torch import nn

from segjob.models.blocks import DoubleConv, pad_to, squeeze_excitation


class UNet(nn.Module):
    def __init__(
        self, in_channels: int, num_classes: int, base_channels: int = 32, depth: int = 4,
        se_reduction: int | None = None,
    ):
        super().__init__()
        if in_channels < 1 or num_classes < 1 or base_channels < 1 or depth < 1:
            raise ValueError(
                f"UNet needs in_channels, num_classes, base_channels and depth >= 1 "
                f"(got {in_channels}, {num_classes}, {base_channels}, {depth})"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.depth = depth
        widths = [base_channels * 2**level for level in range(depth + 1)]

        self.encoder = nn.ModuleList(
            [DoubleConv(in_channels, widths[0])] + [DoubleConv(widths[i], widths[i + 1]) for i in range(depth)]
        )
        self.pool = nn.MaxPool2d(kernel_size=2)  # floors odd sizes; the decoder pads back
        # Decoder modules are listed bottom-up, in the order forward() uses them.
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], kernel_size=2, stride=2) for i in reversed(range(depth))
        )
        self.decoder = nn.ModuleList(DoubleConv(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        # None without SE, so a plain U-Net keeps the state-dict layout of earlier runs
        self.gates = (
            nn.ModuleList(squeeze_excitation(widths[i], se_reduction) for i in reversed(range(depth)))
            if se_reduction else None
        )
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        smallest = 2**self.depth
        if x.shape[-2] < smallest or x.shape[-1] < smallest:
            raise ValueError(
                f"UNet(depth={self.depth}) needs inputs of at least {smallest}x{smallest} pixels "
                f"(got {x.shape[-2]}x{x.shape[-1]}); use larger images or a smaller model.depth"
            )
        skips = []
        for level, block in enumerate(self.encoder):
            if level > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        x = skips.pop()  # the bottom level feeds the decoder; it is no skip
        for step, (upsample, block) in enumerate(zip(self.upsample, self.decoder)):
            skip = skips.pop()
            x = pad_to(upsample(x), skip.shape[-2:])
            x = block(torch.cat([skip, x], dim=1))
            if self.gates is not None:
                x = self.gates[step](x)
        return self.head(x)
