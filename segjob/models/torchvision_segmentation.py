"""torchvision's own segmentation models (FCN, DeepLabV3, LR-ASPP) as segjob models.

    model = TorchvisionSegmentation("deeplabv3_resnet50", in_channels=4, num_classes=13, aux_head=True)
    model.train(); out = model(images)   # {"out": [N, 13, H, W], "aux": [N, 13, H, W]}
    model.eval();  logits = model(images)  # [N, 13, H, W]

torchvision's constructor builds the model, always with weights=None and
weights_backbone=None (nothing is downloaded); its children keep torchvision's names
(backbone, classifier, aux_classifier), so the state dict is exactly torchvision's model's.
The forward pass is torchvision's (head on the deepest features, bilinear up-sampling to
the input size, align_corners=False) except that the auxiliary logits are only computed in
training, the only time their loss counts, and the main logits come back as a plain tensor
whenever there is nothing else to return.

The backbone is a torchvision classifier cut by IntermediateLayerGetter: a ResNet keeps its
names (conv1, layer1, ...), a MobileNetV3 loses the `features.` prefix (0, 1, ...).
`pretrained_keys` maps them back, so `model.encoder_weights` takes the same ImageNet
classifier file as the encoder models, and `freeze_encoder` counts the same five stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.models.segmentation as tvseg
from torch import nn

from segjob.job.registry import Registry
from segjob.models.backbone import Backbone
from segjob.models.encoders import encoder_spec
from segjob.models.input_channels import rebuild_first_conv


@dataclass(frozen=True)
class TorchvisionModelSpec:
    name: str
    constructor: Callable[..., nn.Module]  # torchvision.models.segmentation.<name>
    encoder: str  # the classifier its backbone is cut from (a name in ENCODERS)
    output_stride: int  # torchvision dilates its backbone to this
    image_pooling: bool  # an ASPP image-pooling branch: BatchNorm over one 1x1 value per sample
    aux_head: bool  # torchvision can add an auxiliary FCN head (aux_loss=True)


TORCHVISION_MODELS: Registry[TorchvisionModelSpec] = Registry(
    "torchvision model",
    (
        TorchvisionModelSpec("fcn_resnet50", tvseg.fcn_resnet50, "resnet50", 8, False, True),
        TorchvisionModelSpec("fcn_resnet101", tvseg.fcn_resnet101, "resnet101", 8, False, True),
        TorchvisionModelSpec("deeplabv3_resnet50", tvseg.deeplabv3_resnet50, "resnet50", 8, True, True),
        TorchvisionModelSpec("deeplabv3_resnet101", tvseg.deeplabv3_resnet101, "resnet101", 8, True, True),
        TorchvisionModelSpec("deeplabv3_mobilenet_v3_large", tvseg.deeplabv3_mobilenet_v3_large,
                             "mobilenet_v3_large", 16, True, True),
        TorchvisionModelSpec("lraspp_mobilenet_v3_large", tvseg.lraspp_mobilenet_v3_large,
                             "mobilenet_v3_large", 16, False, False),
    ),
    sort_valid=False,
    error=ValueError,  # a caller's bug: the schema has checked model.name already
)


class TorchvisionSegmentation(Backbone):
    """The whole model is the Backbone here: freezing and weights reach into its `backbone` child."""

    def __init__(self, name: str, in_channels: int, num_classes: int, aux_head: bool = False):
        super().__init__()
        spec = TORCHVISION_MODELS.lookup(name)
        if aux_head and not spec.aux_head:
            raise ValueError(f"torchvision's {name} has no auxiliary head")
        options = {"aux_loss": True} if aux_head else {}
        model = spec.constructor(weights=None, weights_backbone=None, num_classes=num_classes, **options)
        self.backbone = model.backbone
        self.classifier = model.classifier
        self.aux_classifier = model.aux_classifier if aux_head else None
        self.reads_all_features = name.startswith("lraspp")  # LR-ASPP's head joins two of the backbone's maps

        encoder = encoder_spec(spec.encoder)
        self.name = spec.encoder
        self.first_conv = encoder.first_conv
        # IntermediateLayerGetter drops a MobileNet's `features.` level; a ResNet's children keep their names
        self.classifier_prefix = "features." if encoder.first_conv.startswith("features.") else ""
        if in_channels != 3:
            rebuild_first_conv(self, self._own_path(encoder.first_conv), in_channels)
        self.stage_modules = [[self.get_submodule(self._own_path(path)) for path in stage] for stage in encoder.stages]

    def _own_path(self, classifier_path: str) -> str:
        return "backbone." + classifier_path.removeprefix(self.classifier_prefix)

    def pretrained_keys(self) -> dict[str, str]:
        return {f"backbone.{key}": self.classifier_prefix + key for key in self.backbone.state_dict()}

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        logits = self.classifier(features if self.reads_all_features else features["out"])
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        if self.training and self.aux_classifier is not None:
            aux = F.interpolate(self.aux_classifier(features["aux"]), size=size, mode="bilinear", align_corners=False)
            return {"out": logits, "aux": aux}
        return logits
