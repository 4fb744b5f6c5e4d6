"""Pretrained encoder weights from a file the user names: a local path, s3:// or gs://. Never a hub.

    load_encoder_weights(encoder, "s3://models/resnet50-11ad3fa6.pth", extra_channel_init="zero")

The file is a torchvision state dict of the whole classifier (`.pth`/`.pt`, read with
`weights_only=True`, or `.safetensors`), exactly what torchvision's own download holds;
the classifier head (fc, classifier) is ignored. torchvision's segmentation models take the
same classifier file for their backbone (Backbone.pretrained_keys maps the names); to take a
backbone out of one of torchvision's segmentation files, see docs/models.md. A 3-channel
first conv is widened to the encoder's input channels (see input_channels.py). Any other disagreement stops with one
line naming the file and the layer. Object-store credentials and endpoints come from the
usual places (AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST, the provider chains).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch

from segjob.errors import UserError
from segjob.models.backbone import Backbone
from segjob.models.input_channels import ExtraChannelInit, widen_rgb_filters
from segjob.store.storage import open_storage

log = logging.getLogger(__name__)

KEY = "model.encoder_weights"


def load_encoder_weights(encoder: Backbone, source: str, extra_channel_init: ExtraChannelInit = "zero") -> None:
    """Load a torchvision state dict into `encoder` (in place); every problem is a UserError naming `source`."""
    state = read_state_dict(source)
    own = encoder.state_dict()
    keys = encoder.pretrained_keys()  # own key -> torchvision's key (a torchvision segmentation model's differ)
    first_conv = f"{encoder.first_conv}.weight"
    own_first_conv = next(own_key for own_key, key in keys.items() if key == first_conv)
    given, wanted = state.get(first_conv), own[own_first_conv].shape[1]
    if given is not None and given.ndim == 4 and given.shape[1] == 3 and wanted != 3:
        state[first_conv] = widen_rgb_filters(given, wanted, extra_channel_init)

    # Weights saved before BatchNorm counted its batches (torchvision's 2017 files) lack the counters.
    missing = [key for key in keys.values() if key not in state and not key.endswith("num_batches_tracked")]
    if missing:
        raise UserError(
            f"{KEY}: {source} lacks {len(missing)} of the {encoder.name} encoder's tensors, the first "
            f"'{missing[0]}'; expected a torchvision {encoder.name} state dict"
        )
    for own_key, key in keys.items():
        if key in state and state[key].shape != own[own_key].shape:
            raise UserError(
                f"{KEY}: {source}: layer '{key}' has shape {tuple(state[key].shape)} but the {encoder.name} "
                f"encoder needs {tuple(own[own_key].shape)}; is the file for another architecture or width?"
            )
    unused = sorted(set(state) - set(keys.values()))
    if unused:
        log.info("%s: ignored %d tensors outside the encoder (%s, ...)", source, len(unused), unused[0])
    # strict=False: a whole model (torchvision's) keeps its heads as they are
    encoder.load_state_dict({own_key: state[key] for own_key, key in keys.items() if key in state}, strict=False)


def read_state_dict(source: str) -> dict[str, torch.Tensor]:
    data = _read_bytes(source)
    try:
        if source.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # the loaders raise many types; any of them means the same to the user
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{KEY}: {source}: not a readable state dict ({type(error).__name__}: {first_line})") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{KEY}: {source}: expected a state dict (layer name -> tensor), "
                        "as torchvision's weight files hold")
    return dict(state)


def _read_bytes(source: str) -> bytes:
    scheme = source.split("://", 1)[0] if "://" in source else ""
    if scheme in ("", "file"):
        path = Path(source.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise UserError(f"{KEY}: {source}: file not found")
        return path.read_bytes()
    if scheme not in ("s3", "gs", "gcs"):
        raise UserError(f"{KEY}: {source}: unsupported scheme '{scheme}://'; use a path, s3:// or gs://")
    folder, _, name = source.rpartition("/")
    if not name or folder.endswith(":/"):
        raise UserError(f"{KEY}: {source}: expected {scheme}://bucket/path/to/weights.pth")
    storage = open_storage(folder)
    try:
        return storage.read_bytes(storage.path(name))
    except FileNotFoundError:
        raise UserError(f"{KEY}: {source}: no such object") from None
