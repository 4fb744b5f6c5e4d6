"""What a model asks of the job around it, answered from its downsampling depth and checked on the
driver, so that a job no worker could train is one line instead of `max_failures` failed attempts.

    needs = segnet_needs(job.model)             # SegNet, 5 stages: smallest input 32
    check_needs(job, needs)                     # ValueError: "data.image_size 16 is too small ..."

Every sample reaches the model as data.image_size x data.image_size. A model that halves its
input k times with max-pools (which floor odd sizes) needs 2**k pixels to keep one at its
deepest level; strided convolutions with padding (ResNet, MobileNet) round up and take any
size. No model needs a size divisible by anything: odd sizes are padded back (U-Net),
un-pooled to their recorded size (SegNet) or cropped (encoder U-Net, PSPNet).

In training, BatchNorm needs more than one value per channel. A one-sample batch (batch_size 1
on a rank whose BatchNorm is not synchronised with others) has one value wherever a map is 1x1:
at the deepest level of a model at its smallest input, and always in PSPNet's 1x1 pyramid bin.
"""

from __future__ import annotations

from dataclasses import dataclass

from segjob.job.schema import EncoderModelBase, JobConfig, PSPNetConfig, SegNetConfig, UNetConfig
from segjob.models.encoders import encoder_spec


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
    if spec.min_size > 1:  # VGG: max-pools floor; its last stage is that pool alone, BatchNorm runs before it
        smallest, alone = spec.min_size, 2 * spec.strides[-2]
    else:  # padded strided convolutions round up: the deepest map is 1x1 up to `output_stride` pixels
        smallest, alone = spec.min_size, output_stride + 1
    if cfg.freeze_encoder is True or cfg.freeze_encoder >= stages:  # frozen BatchNorm keeps its statistics
        alone = smallest
    return ModelNeeds(smallest, alone, f"model.encoder {cfg.encoder}", "another model.encoder",
                      encoder_stages=stages)


def unet_needs(cfg: UNetConfig) -> ModelNeeds:
    if cfg.encoder != "none":  # the decoder's first level is already twice the encoder's deepest
        return _encoder_needs(cfg)
    # `depth` max-pools; the bottom double conv (with BatchNorm) runs at the deepest level
    return ModelNeeds(2**cfg.depth, 2 ** (cfg.depth + 1), f"model.depth {cfg.depth}", "a smaller model.depth")


def pspnet_needs(cfg: PSPNetConfig) -> ModelNeeds:
    encoder = _encoder_needs(cfg, cfg.output_stride)
    # the heads run at the encoder's deepest map, whatever is frozen
    alone = None if 1 in cfg.bins else cfg.output_stride + 1
    return ModelNeeds(encoder.smallest, alone, encoder.set_by, encoder.fix,
                      alone_fix="raise train.batch_size to 2 (the 1x1 pyramid bin of model.bins has one value "
                      "per sample)" if alone is None else "raise train.batch_size to 2",
                      encoder_stages=encoder.encoder_stages)


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
