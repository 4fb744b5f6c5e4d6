"""The job: one YAML file, validated once on the driver before Ray starts anything.

    job = load_job("jobs/quickstart.yaml", overrides=["train.epochs=3"])

Every section is a pydantic model with extra keys forbidden, so a typo is an error that
names the file, the key path and what would have been valid, never a silently ignored key.
Families with their own options (datasets, models) are unions told apart by `name`.
"""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserError

RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- data -------------------------------------------------------------------------------


class AugmentConfig(Section):
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip")


class DataBase(Section):
    image_size: int = Field(128, ge=16, le=4096, description="training and evaluation size (square)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    loader_workers: int = Field(0, ge=0, le=64, description="DataLoader processes per Ray worker")


class SyntheticData(DataBase):
    """Shapes on textured backgrounds, generated from the seed: no files, no download."""

    name: Literal["synthetic"] = "synthetic"
    num_classes: int = Field(4, ge=2, le=8, description="background + up to 7 shape kinds")
    train_samples: int = Field(512, ge=1)
    val_samples: int = Field(128, ge=1)
    image_size: int = Field(64, ge=16, le=1024)


class PetsData(DataBase):
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
    loader_workers: int = Field(2, ge=0, le=64)


DataConfig = Annotated[Union[SyntheticData, PetsData], Field(discriminator="name")]


# --- model ------------------------------------------------------------------------------


class UNetConfig(Section):
    """The plain U-Net: double conv (conv-BN-ReLU x2) per level, max-pool down, transposed conv up."""

    name: Literal["unet"] = "unet"
    base_channels: int = Field(32, ge=4, le=256, description="channels of the first level, doubled per level")
    depth: int = Field(4, ge=1, le=6, description="number of down-sampling steps")


ModelConfig = Annotated[Union[UNetConfig], Field(discriminator="name")]


# --- training ---------------------------------------------------------------------------


class LossConfig(Section):
    name: Literal["ce"] = "ce"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: list[float] | None = Field(None, description="one weight per class, or none")


class ScheduleConfig(Section):
    name: Literal["constant", "poly", "step", "cosine", "plateau"] = "constant"
    power: float = Field(0.9, gt=0.0, description="poly: lr * (1 - step/total_steps) ** power, per step")
    step_epochs: int = Field(7, ge=1, description="step: multiply lr by gamma every step_epochs epochs")
    gamma: float = Field(0.7, gt=0.0, le=1.0, description="step: the factor")
    min_lr: float = Field(0.0, ge=0.0, description="cosine: the final lr")
    plateau_metric: str = Field("val/loss", description="plateau: the validation metric watched")
    plateau_mode: Literal["min", "max"] = "min"
    plateau_factor: float = Field(0.1, gt=0.0, lt=1.0)
    plateau_patience: int = Field(3, ge=0, description="plateau: evaluations without improvement before lowering")


class OptimConfig(Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd only")
    nesterov: bool = False
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1, description="images per worker per step")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches summed before each optimizer step")
    checkpoint_every_steps: int = Field(0, ge=0, description="0: checkpoint at epoch ends only")
    eval_every_epochs: int = Field(1, ge=1)
    log_every_steps: int = Field(10, ge=1, description="how often train/loss enters the history")
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="fp16 needs a GPU; bf16 works on CPU too")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cut every epoch short (smoke runs)")


class ScalingSection(Section):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: Literal["auto"] | bool = Field("auto", description="auto: use GPUs when the cluster has them")
    cpus_per_worker: float = Field(1.0, gt=0.0)
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per worker (default: cpus_per_worker)")


class StorageConfig(Section):
    uri: str = Field("./runs", description="./runs, file:///abs/path, s3://bucket/prefix or gs://bucket/prefix")
    endpoint_url: str | None = Field(None, description="S3/GCS endpoint (MinIO, emulators); else AWS_ENDPOINT_URL / STORAGE_EMULATOR_HOST")
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
    collective_timeout_s: int = Field(300, ge=10, description="survivors of a lost peer fail after this long instead of hanging")


class PreemptionSection(Section):
    """Where preemption notices come from. Any of them triggers a checkpoint at once."""

    sigterm: bool = Field(True, description="treat SIGTERM to a worker process as a notice")
    aws_metadata_url: str | None = Field("http://169.254.169.254", description="EC2 IMDSv2 base URL; null to disable")
    gcp_metadata_url: str | None = Field("http://metadata.google.internal", description="GCE metadata base URL; null to disable")
    ray_drain: bool = Field(True, description="watch ray.train.get_preemption_info() (KubeRay drains nodes)")
    poll_interval_s: float = Field(5.0, gt=0.0, le=60.0)


METRIC_PATTERN = r"^(train/loss|val/loss|val/miou|val/pixel_acc|val/dice|val/iou/[\w.-]+)$"


class MetricConfig(Section):
    name: str = Field("val/miou", description="ranks checkpoints for retention, sweeps and pull")
    mode: Literal["max", "min"] = "max"

    @field_validator("name")
    @classmethod
    def _known_metric(cls, name: str) -> str:
        if not re.match(METRIC_PATTERN, name):
            raise ValueError("must be one of train/loss, val/loss, val/miou, val/pixel_acc, val/dice, val/iou/<class>")
        return name


class JobConfig(Section):
    name: str = Field(pattern=RUN_NAME_PATTERN, description="the run's folder under storage.uri; stable across resumes")
    seed: int = 0
    data: DataConfig = Field(default_factory=SyntheticData)
    model: ModelConfig = Field(default_factory=UNetConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    failure: FailureSection = Field(default_factory=FailureSection)
    preemption: PreemptionSection = Field(default_factory=PreemptionSection)
    metric: MetricConfig = Field(default_factory=MetricConfig)


# --- loading ----------------------------------------------------------------------------


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The job file and its --set overrides, the same for every command that takes a job."""
    parser.add_argument("job", help="job YAML file, e.g. jobs/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job key, e.g. --set train.epochs=3 (repeatable)")


def load_job(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Read, override and validate a job file; every problem becomes one UserError line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: job file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise UserError(f"{path}: {where}not valid YAML ({getattr(error, 'problem', error)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (name, data, model, ...)")
    raw.setdefault("name", path.stem)
    applied = {}
    for override in overrides:
        key, value = _parse_override(override)
        _set_path(raw, key, value, override)
        applied[key] = override
    return validate_job(raw, source=str(path), overrides=applied)


def validate_job(raw: dict[str, Any], source: str = "job", overrides: dict[str, str] | None = None) -> JobConfig:
    try:
        job = JobConfig.model_validate(raw)
    except ValidationError as error:
        problems = [_describe(e, raw) for e in error.errors()]
        first_key = _error_key(error.errors()[0])
        where = source
        for key, override in (overrides or {}).items():
            if first_key == key or first_key.startswith(key + "."):
                where = f"{source} (--set {override})"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{where}: {problems[0]}{more}") from None
    return job


def resolve_local_paths(job: JobConfig, base: Path | None = None) -> JobConfig:
    """Make local data and storage paths absolute, so Ray workers in other folders find them."""
    base = base or Path.cwd()
    update: dict[str, Any] = {}
    root = getattr(job.data, "root", None)
    if root and "://" not in root:
        update["data"] = job.data.model_copy(update={"root": str((base / root).resolve())})
    if "://" not in job.storage.uri:
        update["storage"] = job.storage.model_copy(update={"uri": str((base / job.storage.uri).resolve())})
    return job.model_copy(update=update)


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text}: expected KEY=VALUE, for example --set train.epochs=3")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        return key.strip(), value


def _set_path(raw: dict, key: str, value: Any, override: str) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {override}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


# --- error messages ---------------------------------------------------------------------


def _error_key(error: dict) -> str:
    return ".".join(str(part) for part in _user_loc(error["loc"]))


def _user_loc(loc: tuple) -> list:
    """Drop the union tags pydantic inserts (data.pets.root -> data.root)."""
    parts, model = [], JobConfig
    for part in loc:
        if model is None:
            parts.append(part)
            continue
        if isinstance(model, dict):  # a tagged union: this part is the tag
            model = model.get(part)
            continue
        parts.append(part)
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = _section_type(field.annotation) if field else None
    return parts


def _section_type(annotation: Any) -> Any:
    """The Section class (or {tag: class} for a tagged union) a field holds, else None."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) is Union:
        members = [m for m in get_args(annotation) if isinstance(m, type) and issubclass(m, Section)]
        if members and all("name" in m.model_fields for m in members):
            return {m.model_fields["name"].default: m for m in members}
        return members[0] if len(members) == 1 else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None


def _model_at(key_parts: list) -> Any:
    model: Any = JobConfig
    for part in key_parts:
        field = model.model_fields.get(part) if isinstance(model, type) else None
        model = _section_type(field.annotation) if field else None
        if model is None:
            return None
    return model


def _describe(error: dict, raw: dict) -> str:
    parts = _user_loc(error["loc"])
    key = ".".join(str(p) for p in parts)
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(parts[:-1])
        if isinstance(parent, dict):  # unknown key inside a union member: find which member
            parent = parent.get(_lookup(raw, parts[:-1] + ["name"]))
        valid = sorted(parent.model_fields) if isinstance(parent, type) else []
        hint = difflib.get_close_matches(str(parts[-1]), valid, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"{key}: unknown key{suggestion}; valid keys here: {', '.join(valid)}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = sorted(_model_at(parts) or {})
        given = _lookup(raw, parts + ["name"])
        hint = difflib.get_close_matches(str(given), tags, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        what = f"unknown name '{given}'" if given is not None else "missing 'name'"
        return f"{key}.name: {what}{suggestion}; valid: {', '.join(tags)}"
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", error["ctx"].get("expected", ""))
        hint = difflib.get_close_matches(str(error.get("input")), expected, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"{key}: '{error.get('input')}' is not allowed{suggestion}; expected {error['ctx'].get('expected')}"
    if kind == "missing":
        return f"{key}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}: {message} (got {error.get('input')!r})"


def _lookup(raw: Any, parts: list) -> Any:
    for part in parts:
        if not isinstance(raw, dict):
            return None
        raw = raw.get(part)
    return raw
