"""Models: one shared tester, a tiny subclass per architecture.

A new architecture gets a `TestX(BaseModelTester)` naming a config small enough to run
in a second or two; the shared checks then cover shapes at odd sizes, input channels,
gradients, memory format, autocast, train/eval behaviour and state-dict round trips.
"""

from __future__ import annotations

import io
import types

import pytest
import torch
from torch import nn

from segjob.config import UNetConfig
from segjob.errors import UserError
from segjob.models import MODELS, UNet, create_model
from segjob.models.blocks import DoubleConv, center_crop_to, match_size, pad_to

SIZES = [(64, 64), (37, 53), (360, 480)]  # square, odd, CamVid


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy machine thread
    # contention made these tests 10x slower; restore the setting for other modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class BaseModelTester:
    """Shared checks; subclasses set `config` (tiny) and `min_size` (smallest valid side)."""

    config = None
    min_size = 16

    def build(self, in_channels: int = 3, num_classes: int = 3, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return create_model(self.config, in_channels=in_channels, num_classes=num_classes)

    @staticmethod
    def images(size, in_channels: int = 3, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, in_channels, *size, generator=torch.Generator().manual_seed(1))

    @pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
    def test_logits_have_the_input_size(self, size):
        model = self.build(num_classes=5).eval()
        with torch.no_grad():
            logits = model(self.images(size, batch=1))
        assert logits.shape == (1, 5, *size)

    @pytest.mark.parametrize("in_channels", [1, 3, 4])
    def test_input_channels(self, in_channels):
        model = self.build(in_channels=in_channels, num_classes=2)
        logits = model(self.images((37, 53), in_channels=in_channels))
        assert logits.shape == (2, 2, 37, 53)
        with pytest.raises(RuntimeError):  # a wrong channel count is an error, not silently accepted
            model(self.images((37, 53), in_channels=in_channels + 1))

    def test_one_output_channel(self):
        # A single logit map (a probability map through a sigmoid) is a valid head.
        model = self.build(num_classes=1)
        assert model(self.images((self.min_size, self.min_size))).shape == (2, 1, self.min_size, self.min_size)

    def test_smallest_input(self):
        model = self.build().eval()
        size = (self.min_size, self.min_size + 1)
        with torch.no_grad():
            assert model(self.images(size)).shape == (2, 3, *size)

    def test_gradients_reach_every_parameter(self):
        model = self.build(num_classes=4).train()
        logits = model(self.images((37, 53)))
        # A random projection, not logits.mean(): a mean has zero gradient through the last BN shift.
        (logits * torch.randn_like(logits)).sum().backward()
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
            assert parameter.grad.abs().sum() > 0, f"{name} has an all-zero gradient"

    def test_channels_last_matches_contiguous(self):
        model = self.build().eval()
        images = self.images((37, 53))
        with torch.no_grad():
            expected = model(images)
            model = model.to(memory_format=torch.channels_last)
            actual = model(images.contiguous(memory_format=torch.channels_last))
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)

    def test_bf16_autocast_forward_and_backward_on_cpu(self):
        model = self.build().train().to(memory_format=torch.channels_last)
        images = self.images((37, 53)).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(images)
        assert logits.shape == (2, 3, 37, 53)
        assert logits.dtype == torch.bfloat16
        assert torch.isfinite(logits.float()).all()
        logits.float().square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    def test_eval_mode_uses_running_statistics(self):
        model = self.build().eval()
        images = self.images((37, 53), batch=3)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            batch_logits = model(images)
            single_logits = model(images[:1])
        # In eval mode a sample's logits don't depend on the rest of its batch ...
        torch.testing.assert_close(single_logits, batch_logits[:1], rtol=1e-4, atol=1e-4)
        # ... and BatchNorm's running statistics stay put.
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key

    def test_train_mode_updates_running_statistics(self):
        model = self.build().train()
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms, "expected BatchNorm layers"
        before = [m.running_mean.clone() for m in norms]
        with torch.no_grad():
            model(self.images((37, 53)))
        assert all(not torch.equal(m.running_mean, b) for m, b in zip(norms, before))

    def test_state_dict_round_trip(self):
        source = self.build(in_channels=4, num_classes=3, seed=0).eval()
        with torch.no_grad():  # move BN statistics away from their defaults so they matter
            for m in source.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        buffer = io.BytesIO()
        torch.save(source.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)

        target = self.build(in_channels=4, num_classes=3, seed=1).eval()
        target.load_state_dict(state)  # strict: same keys, same shapes
        images = self.images((37, 53), in_channels=4)
        with torch.no_grad():
            torch.testing.assert_close(target(images), source(images))

    def test_state_dict_saves_as_safetensors(self):
        safetensors_torch = pytest.importorskip("safetensors.torch")
        model = self.build()
        # safetensors refuses shared or non-contiguous tensors; checkpoints store weights this way.
        blob = safetensors_torch.save(model.state_dict())
        loaded = safetensors_torch.load(blob)
        assert loaded.keys() == model.state_dict().keys()


class TestUNet(BaseModelTester):
    config = UNetConfig(base_channels=4, depth=4)
    min_size = 16  # 2**depth

    def test_is_the_plain_unet(self):
        model = self.build()
        assert isinstance(model, UNet)
        assert len(model.encoder) == 5 and len(model.decoder) == 4
        assert all(isinstance(block, DoubleConv) for block in (*model.encoder, *model.decoder))
        assert [block[0].out_channels for block in model.encoder] == [4, 8, 16, 32, 64]
        assert all(isinstance(up, nn.ConvTranspose2d) and up.stride == (2, 2) for up in model.upsample)

    def test_too_small_input_names_the_minimum(self):
        model = self.build().eval()
        with pytest.raises(ValueError, match="at least 16x16"):
            model(self.images((15, 64)))

    def test_depth_one(self):
        model = create_model(UNetConfig(base_channels=4, depth=1), in_channels=3, num_classes=2)
        assert model(self.images((5, 7))).shape == (2, 2, 5, 7)


def test_registry_names_match_their_config_tags():
    for name, entry in MODELS.items():
        assert entry.name == name == entry.config_class.model_fields["name"].default


def test_unknown_model_lists_the_valid_names():
    unknown = types.SimpleNamespace(name="unett")
    with pytest.raises(UserError, match=r"model\.name: unknown model 'unett' \(did you mean 'unet'\?\); valid: unet"):
        create_model(unknown, in_channels=3, num_classes=2)


def test_pad_to_and_center_crop_to():
    x = torch.arange(5 * 7, dtype=torch.float32).view(1, 1, 5, 7)
    padded = pad_to(x, (8, 8))
    assert padded.shape[-2:] == (8, 8)
    torch.testing.assert_close(padded[..., 1:6, 0:7], x)  # 3 extra rows: 1 top, 2 bottom; 1 column: right
    assert padded.sum() == x.sum()
    assert pad_to(x, (5, 7)) is x
    cropped = center_crop_to(x, (3, 4))
    torch.testing.assert_close(cropped, x[..., 1:4, 1:5])
    torch.testing.assert_close(center_crop_to(padded, (5, 7)), x)  # crop undoes pad: both put the odd pixel last
    with pytest.raises(ValueError):
        pad_to(x, (4, 8))
    with pytest.raises(ValueError):
        center_crop_to(x, (6, 7))
    mixed = match_size(x, (3, 9))  # crop rows, pad columns
    assert mixed.shape[-2:] == (3, 9)
    torch.testing.assert_close(mixed[..., 1:8], x[..., 1:4, :])
