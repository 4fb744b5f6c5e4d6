"""What a model asks of the job around it, answered from its downsampling depth and checked on the
driver, so that a job no worker could train is one line instead of `max_failures` failed attempts.

    needs = segnet_needs(job.model)             # SegNet, 5 stages: smallest input 32
    check_needs(job, needs)                     # ValueError: "data.image_size 16 is too small ..."

Every sample reaches the model as data.image_size x data.image_size. A model that halves its
input k times with max-pools (which floor odd sizes) needs 2**k pixels to keep one at its
deepest level; strided convolutions with padding (ResNet, MobileNet, EfficientNet, RegNet)
round up and take any size, and so does ConvNeXt, whose input the encoder pads (encoders.py).
No model needs a size divisible by anything: odd sizes are padded back (U-Net), un-pooled to
their recorded size (SegNet), cropped (encoder U-Net) or resized (PSPNet, DeepLabV3+, torchvision's).

In training, BatchNorm needs more than one value per channel. A one-sample batch (batch_size 1
on a rank whose BatchNorm is not synchronised with others) has one value wherever a map is 1x1:
at the deepest level of a model at its smallest input, and always in PSPNet's 1x1 pyramid bin
and in ASPP's image pooling (DeepLabV3+, torchvision's DeepLabV3).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from segjob.job.schema import (
    DeepLabV3PlusConfig,
    EncoderModelBase,
    JobConfig,
    PSPNetConfig,
    SegNetConfig,
    TorchvisionModelBase,
    UNetConfig,
)
from segjob.models.encoders import encoder_spec
from segjob.models.torchvision_segmentation import TORCHVISION_MODELS


@dataclass(frozen=True)
class ModelNeeds:
    smallest: int  # the smallest image side the forward pass takes
    smallest_alone: int | None  # the same for a one-sample batch in training; None: no size is enough
    set_by: str  # the key (and value) that decides both, e.g. "model.stages 5"
    fix: str  # what lowers them, e.g. "fewer model.stages"
    alone_fix: str = "raise train.batch_size to 2"
    encoder_stages: int = 0  # how many stages model.freeze_encoder can count


def _encoder_needs(cfg: EncoderModelBase, output_stride: int = 32) -> ModelNeeds:
    spec = encoder_spec(cfg.encoder)
    stages = len(spec.stages)
    smallest = min(spec.min_size, output_stride)  # dilated stages no longer floor
    if spec.min_size > 1:  # VGG: max-pools floor; its last stage is that pool alone, BatchNorm runs before it
        alone = 2 * spec.strides[-2]
    elif spec.batchnorm_at_deepest:  # padded strided convolutions round up: the deepest map is 1x1 up to
        alone = output_stride + 1  # `output_stride` pixels
    else:  # ConvNeXt: LayerNorm normalises each pixel over its channels, whatever the batch
        alone = smallest
    if cfg.freeze_encoder is True or cfg.freeze_encoder >= stages:  # frozen BatchNorm keeps its statistics
        alone = smallest
    return ModelNeeds(smallest, alone, f"model.encoder {cfg.encoder}", "another model.encoder",
                      encoder_stages=stages)


def _one_value_per_sample(needs: ModelNeeds, what: str) -> ModelNeeds:
    """`needs` for a head that runs BatchNorm on a 1x1 map whatever the input size: no one-sample batches."""
    return replace(needs, smallest_alone=None, alone_fix=f"raise train.batch_size to 2 ({what} has one value per "
                   "sample)")


def unet_needs(cfg: UNetConfig) -> ModelNeeds:
    if cfg.encoder != "none":
        needs = _encoder_needs(cfg)
        # the decoder's first double conv (BatchNorm) runs at the stride-16 skip's size, frozen encoder or not
        spec = encoder_spec(cfg.encoder)
        decoder_alone = spec.strides[-2] + 1 if spec.min_size == 1 else 2 * spec.strides[-2]
        return replace(needs, smallest_alone=max(needs.smallest_alone, decoder_alone))
    # `depth` max-pools; the bottom double conv (with BatchNorm) runs at the deepest level
    return ModelNeeds(2**cfg.depth, 2 ** (cfg.depth + 1), f"model.depth {cfg.depth}", "a smaller model.depth")


def pspnet_needs(cfg: PSPNetConfig) -> ModelNeeds:
    encoder = _encoder_needs(cfg, cfg.output_stride)
    if 1 in cfg.bins:
        return _one_value_per_sample(encoder, "the 1x1 pyramid bin of model.bins")
    # the heads run BatchNorm at the encoder's deepest map, whatever is frozen
    return replace(encoder, smallest_alone=cfg.output_stride + 1)


def deeplabv3plus_needs(cfg: DeepLabV3PlusConfig) -> ModelNeeds:
    return _one_value_per_sample(_encoder_needs(cfg, cfg.output_stride), "ASPP's image-pooling branch")


def torchvision_needs(cfg: TorchvisionModelBase) -> ModelNeeds:
    spec = TORCHVISION_MODELS.lookup(cfg.name)
    encoder = _encoder_needs(cfg, spec.output_stride)
    if spec.image_pooling:
        return _one_value_per_sample(encoder, "ASPP's image-pooling branch")
    # FCN's and LR-ASPP's heads run BatchNorm at the backbone's deepest map, whatever is frozen
    return replace(encoder, smallest_alone=spec.output_stride + 1)


def segnet_needs(cfg: SegNetConfig) -> ModelNeeds:
    # `stages` max-pools; BatchNorm runs before each pool and after each un-pool, never at the deepest 1x1
    smallest = 2**cfg.stages
    return ModelNeeds(smallest, smallest, f"model.stages {cfg.stages}", "fewer model.stages",
                      encoder_stages=cfg.stages)


def one_sample_batches(job: JobConfig) -> bool:
    """Whether a rank's BatchNorm can see a batch of one sample on its own: batch_size 1, and no
    SyncBatchNorm across two or more ranks (it needs GPUs and is on by default there)."""
    synced = (job.train.sync_batchnorm is not False and job.scaling.use_gpu is not False
              and job.scaling.fewest_workers >= 2)
    return job.train.batch_size == 1 and not synced


def check_needs(job: JobConfig, needs: ModelNeeds) -> None:
    """ValueError, naming the keys and the fix, when no worker could train job.model on job.data."""
    size, model = job.data.image_size, f"model {job.model.name} with {needs.set_by}"
    if size < needs.smallest:
        raise ValueError(f"data.image_size {size} is too small for {model}: it needs at least {needs.smallest} "
                         f"pixels; raise data.image_size to {needs.smallest} or use {needs.fix}")
    if one_sample_batches(job) and (needs.smallest_alone is None or size < needs.smallest_alone):
        bigger = f" or data.image_size to {needs.smallest_alone}" if needs.smallest_alone else ""
        raise ValueError(f"train.batch_size 1 with {model} at data.image_size {size}: training BatchNorm would see "
                         f"one value per channel; {needs.alone_fix}{bigger}")
    freeze = job.model.freeze_encoder if isinstance(job.model, EncoderModelBase) else False
    if freeze is not True and freeze > needs.encoder_stages:
        raise ValueError(f"model.freeze_encoder {freeze}: the encoder of {model} has {needs.encoder_stages} stages; "
                         f"give at most {needs.encoder_stages} (or true for all of them)")
