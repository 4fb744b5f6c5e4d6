"""Segmentation models, built by name from the job's `model` section.

    model = create_model(job.model, in_channels=3, num_classes=4)
    logits = model(images)   # [N, in_channels, H, W] -> [N, num_classes, H, W]

Every model returns logits at its input's resolution, for any H and W (odd sizes too,
down to the architecture's minimum). Adding an architecture is one `ModelEntry` in
`MODELS`: its name (the `name` tag of its config class in config.py), that class, and a
builder taking (config, in_channels, num_classes).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..config import ModelConfig, UNetConfig
from ..errors import UserError
from .unet import UNet

__all__ = ["MODELS", "ModelEntry", "UNet", "create_model"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config_class: type
    build: Callable[[Any, int, int], nn.Module]

    def __post_init__(self) -> None:
        tag = self.config_class.model_fields["name"].default
        if tag != self.name:  # the YAML's model.name must find this entry
            raise ValueError(f"ModelEntry '{self.name}' is registered with a config whose name is '{tag}'")


def _build_unet(cfg: UNetConfig, in_channels: int, num_classes: int) -> nn.Module:
    return UNet(in_channels, num_classes, base_channels=cfg.base_channels, depth=cfg.depth)


MODELS: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in (
        ModelEntry("unet", UNetConfig, _build_unet),
    )
}


def create_model(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    entry = MODELS.get(cfg.name)
    if entry is None:
        hint = difflib.get_close_matches(str(cfg.name), MODELS, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise UserError(f"model.name: unknown model '{cfg.name}'{suggestion}; valid: {', '.join(sorted(MODELS))}")
    if not isinstance(cfg, entry.config_class):  # a programming error, not the user's
        raise TypeError(f"model '{cfg.name}' needs a {entry.config_class.__name__}, got {type(cfg).__name__}")
    return entry.build(cfg, in_channels, num_classes)
