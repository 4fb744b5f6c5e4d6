"""Encoder weights from a file or object store: RGB filters kept, extra channels per policy,
every other problem one line naming the file and the layer."""

from __future__ import annotations

import io

import pytest
import torch
import torchvision.models as tv
from safetensors.torch import save as save_safetensors

from segjob.errors import UserError
from segjob.job.schema import PSPNetConfig, SegNetConfig, UNetConfig
from segjob.models import create_model
from segjob.models.input_channels import widen_rgb_filters
from segjob.models.vgg import VGG16BNTrunk
from segjob.store.storage import open_storage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def resnet18_state():
    """What torchvision's resnet18 weight file holds (random values here: nothing is downloaded)."""
    torch.manual_seed(42)
    return tv.resnet18(weights=None).state_dict()


@pytest.fixture
def resnet18_file(tmp_path, resnet18_state):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18_state, path)
    return str(path)


def unet(weights: str, in_channels: int = 3, **options):
    config = UNetConfig(encoder="resnet18", decoder_channels=[8] * 5, encoder_weights=weights, **options)
    return create_model(config, in_channels=in_channels, out_channels=2)


def assert_encoder_holds(encoder, state, skip=()):
    for key, value in encoder.state_dict().items():
        if key not in skip:
            assert torch.equal(value, state[key]), key


def test_four_channels_keep_the_rgb_filters_and_start_depth_at_zero(resnet18_file, resnet18_state):
    model = unet(resnet18_file, in_channels=4)
    conv1 = model.encoder.conv1.weight.detach()
    assert conv1.shape == (64, 4, 7, 7)
    assert torch.equal(conv1[:, :3], resnet18_state["conv1.weight"])
    assert torch.equal(conv1[:, 3], torch.zeros_like(conv1[:, 3]))
    assert_encoder_holds(model.encoder, resnet18_state, skip={"conv1.weight"})


def test_a_zero_depth_filter_leaves_the_rgb_response_unchanged(resnet18_file):
    rgb_model, rgbd_model = unet(resnet18_file).encoder.eval(), unet(resnet18_file, in_channels=4).encoder.eval()
    rgb = torch.randn(1, 3, 32, 32)
    rgbd = torch.cat([rgb, torch.randn(1, 1, 32, 32)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(rgbd_model(rgbd)[-1], rgb_model(rgb)[-1])


def test_mean_policy_starts_depth_at_the_mean_rgb_filter(resnet18_file, resnet18_state):
    conv1 = unet(resnet18_file, in_channels=5, extra_channel_init="mean").encoder.conv1.weight.detach()
    rgb = resnet18_state["conv1.weight"]
    assert torch.equal(conv1[:, :3], rgb)
    torch.testing.assert_close(conv1[:, 3], rgb.mean(dim=1))
    torch.testing.assert_close(conv1[:, 4], rgb.mean(dim=1))


def test_one_channel_sums_the_rgb_filters():
    rgb = torch.randn(8, 3, 3, 3)
    torch.testing.assert_close(widen_rgb_filters(rgb, 1)[:, 0], rgb.sum(dim=1))
    grey = torch.randn(1, 1, 9, 9)  # a grey image through the summed filter = RGB copies through the RGB filters
    torch.testing.assert_close(
        torch.conv2d(grey, widen_rgb_filters(rgb, 1)), torch.conv2d(grey.expand(-1, 3, -1, -1), rgb),
        rtol=1e-5, atol=1e-5,
    )


def test_weights_saved_as_safetensors_load_too(tmp_path, resnet18_state):
    path = tmp_path / "resnet18.safetensors"
    path.write_bytes(save_safetensors({k: v.contiguous() for k, v in resnet18_state.items()}))
    assert_encoder_holds(unet(str(path)).encoder, resnet18_state)


def test_files_from_before_batchnorm_counted_batches_load(tmp_path, resnet18_state):
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in resnet18_state.items() if not k.endswith("num_batches_tracked")}, path)
    assert_encoder_holds(unet(str(path)).encoder, resnet18_state,
                         skip={k for k in resnet18_state if "num_batches" in k})


def test_a_shape_mismatch_names_the_layer_and_the_file(tmp_path, resnet18_state):
    state = dict(resnet18_state)
    state["layer2.0.conv1.weight"] = torch.zeros(128, 32, 3, 3)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(UserError) as error:
        unet(str(path))
    assert str(error.value).startswith(
        f"model.encoder_weights: {path}: layer 'layer2.0.conv1.weight' has shape (128, 32, 3, 3) "
        "but the resnet18 encoder needs (128, 64, 3, 3)"
    )


def test_another_architectures_file_names_what_is_missing(tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save(tv.mobilenet_v2(weights=None).state_dict(), path)
    with pytest.raises(UserError,
                       match=r"lacks \d+ of the resnet18 encoder's tensors, the first 'conv1.weight'") as error:
        unet(str(path))
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "content, problem",
    [(b"not a checkpoint", "not a readable state dict"), (None, "expected a state dict")],
    ids=["garbage", "a list"],
)
def test_unreadable_files_are_user_errors(tmp_path, content, problem):
    path = tmp_path / "weights.pth"
    if content is None:
        torch.save([torch.zeros(1)], path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as error:
        unet(str(path))
    assert str(error.value).startswith(f"model.encoder_weights: {path}: {problem}")


def test_a_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="model.encoder_weights: .*nowhere.pth: file not found"):
        unet(str(tmp_path / "nowhere.pth"))


def test_weights_come_from_s3(s3_endpoint, s3_bucket, monkeypatch, resnet18_state):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    storage = open_storage(f"s3://{s3_bucket}")
    buffer = io.BytesIO()
    torch.save(resnet18_state, buffer)
    storage.write_bytes(storage.path("weights/resnet18.pth"), buffer.getvalue())
    assert_encoder_holds(unet(f"s3://{s3_bucket}/weights/resnet18.pth").encoder, resnet18_state)
    with pytest.raises(UserError, match=f"s3://{s3_bucket}/weights/resnet19.pth: no such object"):
        unet(f"s3://{s3_bucket}/weights/resnet19.pth")


def test_weights_come_from_gcs(gcs_bucket, resnet18_state):
    storage = open_storage(f"gs://{gcs_bucket}")
    buffer = io.BytesIO()
    torch.save(resnet18_state, buffer)
    storage.write_bytes(storage.path("resnet18.pth"), buffer.getvalue())
    assert_encoder_holds(unet(f"gs://{gcs_bucket}/resnet18.pth").encoder, resnet18_state)


def test_segnet_loads_torchvisions_vgg16_bn_weights(tmp_path):
    torch.manual_seed(3)
    state = VGG16BNTrunk().state_dict() | {"classifier.0.weight": torch.zeros(2, 2)}  # the head is ignored
    path = tmp_path / "vgg16_bn.pth"
    torch.save(state, path)
    model = create_model(SegNetConfig(encoder_weights=str(path), freeze_encoder=2), in_channels=4, out_channels=3)
    conv = model.encoder.features[0].weight.detach()
    assert torch.equal(conv[:, :3], state["features.0.weight"]) and not conv[:, 3].any()
    assert_encoder_holds(model.encoder, state, skip={"features.0.weight"})
    assert not model.encoder.features[0].weight.requires_grad and model.encoder.features[14].weight.requires_grad


def test_pspnet_loads_weights_into_its_dilated_encoder(tmp_path):
    torch.manual_seed(4)
    state = tv.mobilenet_v2(weights=None).state_dict()
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(state, path)
    model = create_model(PSPNetConfig(encoder="mobilenet_v2", output_stride=16, encoder_weights=str(path)), 3, 2)
    assert_encoder_holds(model.encoder, state)
