"""Models: one shared tester, a tiny subclass per architecture.

A new architecture gets a `TestX(BaseModelTester)` naming a config small enough to run
in a second or two; the shared checks then cover shapes at odd sizes, input channels,
gradients, memory format, autocast, train/eval behaviour, state-dict and checkpoint
round trips. Architecture-specific checks (SE gates, max-unpooling, the auxiliary head,
published structures) follow each subclass. Encoders, weights and jobs have their own
files (test_model_encoders.py, test_model_weights.py, test_model_config.py).
"""

from __future__ import annotations

import io
import json
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import SqueezeExcitation

from segjob.errors import UserError
from segjob.job.schema import PSPNetConfig, SegNetConfig, UNetConfig
from segjob.models import MODELS, EncoderUNet, SegNet, UNet, create_model
from segjob.models.blocks import DoubleConv, center_crop_to, match_size, pad_to, squeeze_excitation
from segjob.store import checkpoint

SIZES = [(64, 64), (37, 53), (360, 480)]  # square, odd, CamVid


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def main_logits(output: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    return output["out"] if isinstance(output, dict) else output


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class BaseModelTester:
    """Shared checks; subclasses set `config` (tiny), `min_size` (smallest valid side) and
    may narrow `sizes` where the CamVid size would take seconds."""

    config = None
    min_size = 16
    sizes = SIZES

    def build(self, in_channels: int = 3, out_channels: int = 3, seed: int = 0, config=None) -> nn.Module:
        torch.manual_seed(seed)
        return create_model(config or self.config, in_channels=in_channels, out_channels=out_channels)

    @staticmethod
    def images(size, in_channels: int = 3, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, in_channels, *size, generator=torch.Generator().manual_seed(1))

    def test_logits_have_the_input_size(self):
        model = self.build(out_channels=5).eval()
        for size in self.sizes:
            with torch.no_grad():
                logits = model(self.images(size, batch=1))
            assert logits.shape == (1, 5, *size), size

    @pytest.mark.parametrize("in_channels", [1, 3, 4])
    def test_input_channels(self, in_channels):
        model = self.build(in_channels=in_channels, out_channels=2).eval()
        with torch.no_grad():
            assert model(self.images((37, 53), in_channels=in_channels)).shape == (2, 2, 37, 53)
            with pytest.raises(RuntimeError):  # a wrong channel count is an error, not silently accepted
                model(self.images((37, 53), in_channels=in_channels + 1))

    def test_one_output_channel(self):
        # A single logit map (a probability map through a sigmoid) is a valid head.
        model = self.build(out_channels=1).eval()
        with torch.no_grad():
            assert model(self.images((self.min_size, self.min_size))).shape == (2, 1, self.min_size, self.min_size)

    def test_smallest_input(self):
        model = self.build().eval()
        size = (self.min_size, self.min_size + 1)
        with torch.no_grad():
            assert model(self.images(size)).shape == (2, 3, *size)

    def test_gradients_reach_every_parameter(self):
        model = self.build(out_channels=4).train()
        output = model(self.images((37, 53)))
        outputs = output.values() if isinstance(output, dict) else [output]
        # A random projection, not logits.mean(): a mean has zero gradient through the last BN shift.
        sum((logits * torch.randn_like(logits)).sum() for logits in outputs).backward()
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

    def test_channels_last_flag(self):
        config = self.config.model_copy(update={"channels_last": True})
        model = self.build(config=config).eval()
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
        assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
        with torch.no_grad():  # plain NCHW input: the convs' weights carry the layout
            torch.testing.assert_close(model(self.images((37, 53))), self.build().eval()(self.images((37, 53))),
                                       rtol=1e-4, atol=1e-4)

    def test_bf16_autocast_forward_and_backward_on_cpu(self):
        model = self.build().train().to(memory_format=torch.channels_last)
        images = self.images((37, 53)).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = main_logits(model(images))
        assert logits.shape == (2, 3, 37, 53)
        assert logits.dtype == torch.bfloat16
        assert torch.isfinite(logits.float()).all()
        logits.float().square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    def test_eval_mode_uses_running_statistics(self):
        model = self.build().eval()
        images = self.images((37, 53), batch=3)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            batch_logits = model(images)
            single_logits = model(images[:1])
        assert isinstance(batch_logits, torch.Tensor), "eval mode returns plain logits"
        # In eval mode a sample's logits don't depend on the rest of its batch ...
        torch.testing.assert_close(single_logits, batch_logits[:1], rtol=1e-4, atol=1e-4)
        # ... and BatchNorm's running statistics stay put.
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key

    def test_train_mode_updates_running_statistics(self):
        model = self.build().train()
        norms = bn_layers(model)
        assert norms, "expected BatchNorm layers"
        before = [m.running_mean.clone() for m in norms]
        with torch.no_grad():
            model(self.images((37, 53)))
        assert all(not torch.equal(m.running_mean, b) for m, b in zip(norms, before))

    def test_state_dict_round_trip(self):
        source = self.randomised_statistics(self.build(in_channels=4, out_channels=3, seed=0).eval())
        buffer = io.BytesIO()
        torch.save(source.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)
        self.assert_same_model(source, state)

    def test_checkpoint_round_trip(self, tmp_path):
        """Through segjob's checkpoint format: model.safetensors, hashed in meta.json, loaded verified."""
        source = self.randomised_statistics(self.build(in_channels=4, out_channels=3, seed=0).eval())
        folder = tmp_path / "step-000000001"
        checkpoint.write_local(folder, source.state_dict(), {"progress": {}}, [])
        meta = checkpoint.build_meta(folder, job={"name": "models"}, step=1, epoch=0, metrics={}, reason="test")
        (folder / checkpoint.META_FILE).write_text(json.dumps(meta))
        self.assert_same_model(source, checkpoint.load_folder(folder, expected_run="models").model_state)

    def assert_same_model(self, source: nn.Module, state: dict[str, torch.Tensor]) -> None:
        target = self.build(in_channels=4, out_channels=3, seed=1).eval()
        target.load_state_dict(state)  # strict: same keys, same shapes
        images = self.images((37, 53), in_channels=4)
        with torch.no_grad():
            torch.testing.assert_close(target(images), source(images))

    @staticmethod
    def randomised_statistics(model: nn.Module) -> nn.Module:
        with torch.no_grad():  # move BN statistics away from their defaults so they matter
            for m in bn_layers(model):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        return model


# --- U-Net ------------------------------------------------------------------------------


class TestUNet(BaseModelTester):
    config = UNetConfig(base_channels=4, depth=4)
    min_size = 16  # 2**depth

    def test_is_the_plain_unet(self):
        model = self.build()
        assert isinstance(model, UNet) and model.gates is None
        assert len(model.encoder) == 5 and len(model.decoder) == 4
        assert all(isinstance(block, DoubleConv) for block in (*model.encoder, *model.decoder))
        assert [block[0].out_channels for block in model.encoder] == [4, 8, 16, 32, 64]
        assert all(isinstance(up, nn.ConvTranspose2d) and up.stride == (2, 2) for up in model.upsample)

    def test_too_small_input_names_the_minimum(self):
        model = self.build().eval()
        with pytest.raises(ValueError, match="at least 16x16"):
            model(self.images((15, 64)))

    def test_depth_one(self):
        model = create_model(UNetConfig(base_channels=4, depth=1), in_channels=3, out_channels=2)
        assert model(self.images((5, 7))).shape == (2, 2, 5, 7)


class TestUNetWithSE(BaseModelTester):
    config = UNetConfig(base_channels=8, depth=3, se=True, se_reduction=4)
    min_size = 8
    sizes = SIZES[:2]

    def test_a_gate_follows_every_decoder_double_conv(self):
        model = self.build()
        assert len(model.gates) == len(model.decoder) == 3
        assert [gate.fc1.in_channels for gate in model.gates] == [32, 16, 8]


class TestUNetOnResNet(BaseModelTester):
    config = UNetConfig(encoder="resnet18", decoder_channels=[16, 16, 8, 8, 8], se=True, se_reduction=4)
    min_size = 1  # padded convs all the way down: a single pixel still comes out as one

    def test_decoder_joins_the_resnet_stages(self):
        model = self.build(in_channels=4)
        assert isinstance(model, EncoderUNet)
        # conv1/bn1/relu (2), layer1 (4), layer2 (8), layer3 (16) are skips; layer4 (32) feeds the decoder
        assert model.skip_stages == [3, 2, 1, 0, None]
        assert [block.up.in_channels for block in model.decoder] == [512, 16, 16, 8, 8]
        assert [block.conv[0].in_channels for block in model.decoder] == [256 + 16, 128 + 16, 64 + 8, 64 + 8, 8]
        assert all(isinstance(block.up, nn.ConvTranspose2d) and block.up.stride == (2, 2) for block in model.decoder)
        assert all(isinstance(block.gate, SqueezeExcitation) for block in model.decoder)


class TestUNetOnMobileNetV2(BaseModelTester):
    config = UNetConfig(encoder="mobilenet_v2", decoder_channels=[16, 16, 8, 8, 8])
    min_size = 1


class TestUNetOnMobileNetV3(BaseModelTester):
    config = UNetConfig(encoder="mobilenet_v3_large", decoder_channels=[16, 16, 8, 8, 8])
    min_size = 1


class TestUNetOnVGG(BaseModelTester):
    config = UNetConfig(encoder="vgg16_bn", decoder_channels=[16, 16, 8, 8, 8])
    min_size = 32  # five max-pools that floor
    sizes = SIZES[:2]  # VGG16 at 360x480 costs seconds per pass on one core

    def test_skips_include_the_full_resolution_block(self):
        assert self.build().skip_stages == [4, 3, 2, 1, 0]


def test_unet_r50_rgbd_se_is_the_seed_structure():
    """The NYUv2 recipe: ResNet50 stages as skips, 4 input channels, SE after each decoder block."""
    model = create_model(UNetConfig(encoder="resnet50", se=True), in_channels=4, out_channels=13)
    assert model.encoder.conv1.in_channels == 4
    assert model.encoder.channels == (64, 256, 512, 1024, 2048)
    assert model.skip_stages == [3, 2, 1, 0, None]
    assert [block.conv[0].in_channels for block in model.decoder] == [1024 + 256, 512 + 128, 256 + 64, 64 + 32, 16]
    assert sum(p.numel() for p in model.parameters()) == 30_484_013


def test_squeeze_excitation_scales_each_channel_by_a_gate_in_0_1():
    torch.manual_seed(0)
    gate = squeeze_excitation(16, reduction=4)
    with torch.no_grad():
        for layer in (gate.fc1, gate.fc2):  # spread the gates out; at init they sit near 0.5
            layer.weight.normal_(0.0, 1.0)
    x = torch.rand(2, 16, 5, 7) + 0.1
    scales = gate(x) / x
    per_channel = scales[..., :1, :1]
    torch.testing.assert_close(scales, per_channel.expand_as(scales))  # one scale per image and channel
    assert ((per_channel > 0) & (per_channel < 1)).all()
    assert per_channel.std() > 0.05, "channels get different scales"
    assert not torch.allclose(per_channel[0], per_channel[1]), "the scales depend on the image"


# --- PSPNet -----------------------------------------------------------------------------


class TestPSPNet(BaseModelTester):
    config = PSPNetConfig(encoder="resnet18")
    min_size = 8  # stride-8 features of 1x1; every pyramid bin still pools
    sizes = SIZES[:2]  # bilinear to any size; the dilated stages at 360x480 cost seconds

    def test_auxiliary_logits_only_in_training(self):
        model = self.build(out_channels=5).train()
        output = model(self.images((37, 53)))
        assert set(output) == {"out", "aux"}
        assert output["out"].shape == output["aux"].shape == (2, 5, 37, 53)
        with torch.no_grad():
            assert isinstance(model.eval()(self.images((37, 53))), torch.Tensor)

    def test_no_auxiliary_head_when_its_weight_is_zero(self):
        model = self.build(config=PSPNetConfig(encoder="resnet18", aux_weight=0.0)).train()
        assert model.aux_head is None
        assert isinstance(model(self.images((37, 53))), torch.Tensor)


class TestPSPNetOnMobileNet(BaseModelTester):
    config = PSPNetConfig(encoder="mobilenet_v3_large", output_stride=16)
    min_size = 16
    sizes = SIZES[:2]


def test_pspnet_r50_is_the_published_structure():
    model = create_model(PSPNetConfig(), in_channels=3, out_channels=21)
    assert model.encoder.strides == (2, 4, 8, 8, 8)
    # layer3's 3x3 convs dilated 2, layer4's 4, no stride left in either (the authors' ResNet)
    for layer, rate in ((model.encoder.layer3, 2), (model.encoder.layer4, 4)):
        for block in layer:
            assert block.conv2.dilation == (rate, rate) and block.conv2.padding == (rate, rate)
            assert block.conv2.stride == (1, 1)
    assert [branch[0].output_size for branch in model.pyramid.branches] == [1, 2, 3, 6]
    assert [branch[1].out_channels for branch in model.pyramid.branches] == [512] * 4
    assert model.head[0][0].in_channels == 4096 and model.head[0][0].out_channels == 512
    assert model.aux_head[0][0].in_channels == 1024 and model.aux_head[0][0].out_channels == 256
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout2d)] == [0.1, 0.1]
    assert sum(p.numel() for p in model.parameters()) == 48_957_802


# --- SegNet -----------------------------------------------------------------------------


class TestSegNet(BaseModelTester):
    config = SegNetConfig(width=4)
    min_size = 32  # 2**stages

    def test_unpooling_puts_values_back_where_the_maxima_were(self):
        model = self.build().eval()
        before_pool = {}
        first_pool = next(m for m in model.encoder.features if isinstance(m, nn.MaxPool2d))
        first_pool.register_forward_hook(lambda module, args, output: before_pool.update(x=args[0]))
        with torch.no_grad():
            _, pooled = model.encoder(self.images((37, 53)))
        indices, size = pooled[0]
        features = before_pool["x"]
        maxima = F.max_pool2d(features, 2)
        assert size == (37, 53) and indices.shape == maxima.shape
        restored = model.unpool(maxima, indices, output_size=size)
        assert restored.shape == features.shape  # the odd row and column come back
        flat_restored, flat_features, flat_indices = restored.flatten(2), features.flatten(2), indices.flatten(2)
        # every maximum sits at its recorded position, which is where it was before pooling ...
        torch.testing.assert_close(flat_restored.gather(2, flat_indices), maxima.flatten(2))
        torch.testing.assert_close(flat_features.gather(2, flat_indices), maxima.flatten(2))
        # ... and everything else is zero
        elsewhere = torch.ones_like(flat_restored, dtype=torch.bool).scatter(2, flat_indices, False)
        assert (flat_restored[elsewhere] == 0).all()

    def test_too_small_input_names_the_minimum(self):
        with pytest.raises(ValueError, match="at least 32x32"):
            self.build().eval()(self.images((31, 64)))


class TestSmallSegNet(BaseModelTester):
    config = SegNetConfig(stages=4, width=4, input_batchnorm=True)
    min_size = 16


def test_segnet_is_vgg16_bn_mirrored():
    model = create_model(SegNetConfig(), in_channels=3, out_channels=12)
    assert isinstance(model, SegNet)
    encoder_convs = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
    decoder_convs = [m for m in model.decoder.modules() if isinstance(m, nn.Conv2d)]
    assert len(encoder_convs) == len(decoder_convs) == 13
    assert [c.out_channels for c in encoder_convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert [c.in_channels for c in decoder_convs] == [c.out_channels for c in reversed(encoder_convs)]
    assert decoder_convs[-1].out_channels == 12
    assert all(m.return_indices for m in model.encoder.modules() if isinstance(m, nn.MaxPool2d))
    assert not any(isinstance(m, nn.Linear) for m in model.modules())


def test_pets_segnet_has_the_articles_size():
    model = create_model(SegNetConfig(stages=4, input_batchnorm=True), in_channels=3, out_channels=3)
    assert isinstance(model.input_norm, nn.BatchNorm2d)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # The article reports 15.27 M; its encoder convs have no bias (2,688 here, torchvision's layout).
    assert trainable == 15_277_577
    assert round((trainable - 2_688) / 1e6, 2) == 15.27


# --- the factory ------------------------------------------------------------------------


def test_registry_names_match_their_config_tags():
    for name, entry in MODELS.items():
        assert entry.name == name == entry.config_class.model_fields["name"].default


def test_unknown_model_lists_the_valid_names():
    unknown = types.SimpleNamespace(name="unett")
    with pytest.raises(UserError, match=r"model\.name: unknown model 'unett' \(did you mean 'unet'\?\); "
                                        r"valid: deeplabv3_mobilenet_v3_large, .*, pspnet, segnet, unet$"):
        create_model(unknown, in_channels=3, out_channels=2)


def test_compile_flag_compiles_in_place_and_keeps_state_dict_names():
    plain = create_model(UNetConfig(base_channels=4, depth=2), 3, 2)
    compiled = create_model(UNetConfig(base_channels=4, depth=2, compile=True), 3, 2)
    assert isinstance(compiled, UNet) and compiled._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(plain.state_dict())


def test_pspnet_and_plain_unet_under_bf16_autocast_train_in_one_step():
    """The whole training step under AMP, dict outputs included, with the loss in fp32."""
    model = create_model(PSPNetConfig(encoder="mobilenet_v2", output_stride=16), 3, 3).train()
    images = torch.randn(2, 3, 40, 48)
    target = torch.randint(0, 3, (2, 40, 48))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(images)
    loss = F.cross_entropy(output["out"].float(), target) + 0.4 * F.cross_entropy(output["aux"].float(), target)
    loss.backward()
    assert torch.isfinite(loss)


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
