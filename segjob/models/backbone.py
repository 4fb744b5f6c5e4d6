"""What every encoder is: an image-to-features module cut into stages that can be frozen.

    encoder.freeze(2)     # its first two stages: no gradients, BatchNorm statistics fixed
    model.train()         # frozen stages stay in eval mode

A stage is the run of layers that ends at one resolution (ResNet50: conv1/bn1/relu at
stride 2; maxpool + layer1 at 4; layer2 at 8; layer3 at 16; layer4 at 32). Freezing a
stage also keeps its BatchNorm layers in eval mode whatever the model's mode: in train
mode their running statistics would drift towards the new data while the frozen layers
around them cannot follow.
"""

from __future__ import annotations

from torch import nn

from segjob.errors import UserError


class Backbone(nn.Module):
    """Subclasses set `name`, `first_conv` (the path of the conv that sees the image, in
    torchvision's classifier layout) and `stage_modules` (the modules each stage runs, in order)."""

    name: str
    first_conv: str
    stage_modules: list[list[nn.Module]]

    def __init__(self) -> None:
        super().__init__()
        self.frozen_stages = 0

    def pretrained_keys(self) -> dict[str, str]:
        """{own state-dict key: the same tensor's key in torchvision's classifier state dict}, for
        every tensor pretrained weights fill; an encoder keeps torchvision's names, so the same."""
        return {key: key for key in self.state_dict()}

    @property
    def num_stages(self) -> int:
        return len(self.stage_modules)

    def freeze(self, stages: bool | int) -> None:
        """Freeze the first `stages` stages (True: all of them, False or 0: none)."""
        count = self.num_stages if stages is True else int(stages)
        if not 0 <= count <= self.num_stages:
            raise UserError(
                f"model.freeze_encoder: the {self.name} encoder has {self.num_stages} stages; "
                f"got {count} (use true for all of them)"
            )
        for stage in self.stage_modules[:count]:
            for module in stage:
                module.requires_grad_(False)
        self.frozen_stages = count
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        for stage in self.stage_modules[: self.frozen_stages]:
            for module in stage:
                module.eval()
        return self
