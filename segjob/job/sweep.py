"""A sweep: a job file plus a `tune:` section that says what to search and how.

    sweep = load_sweep("jobs/tune_quickstart.yaml", overrides=["tune.num_samples=4"])
    job = sweep.trial_job("a1b2c3d4", {"optim.lr": 0.003})   # what one trial trains

    # in the YAML, next to the job's own sections
    tune:
      num_samples: 8                 # trials in all
      space:                         # job keys -> what to try
        optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
        data.augment.strength: {uniform: [0.0, 1.0]}
        train.batch_size: {integer: [16, 64], step: 16}
        model.encoder: {choice: [resnet50, mobilenet_v3_large, vgg16_bn]}
      points_to_evaluate:            # tried first, as given (e.g. the seed recipe): every space key
        - {optim.lr: 1.0e-4, data.augment.strength: 0.5, train.batch_size: 32, model.encoder: resnet50}
      asha: {grace_period: 1, reduction_factor: 3}

The `tune:` section is read here and removed before the rest is validated as a job, so
the job part means exactly what it means to `segjob.train`. Every space key must be a
job key and every value a search may propose must make a valid job: each choice and both
ends of each range on their own, then their combinations (corners()), and every starting
point are validated as a whole job before anything starts, so a typo, an impossible value
or an impossible combination is one error line, never a failed trial. check_trials() runs
the checks that need more than the schema (the model, the dataset) on the same jobs.
No Ray here; Optuna only for its distribution types.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from segjob.errors import UserError
from segjob.job.load import described_override, parse_override, resolve_local_paths, set_job_key, set_path, validate_job
from segjob.job.messages import cut, shown
from segjob.job.schema import JobConfig, MetricConfig, Section
from segjob.job.walk import walk_location
from segjob.job.yaml_file import read_yaml

TUNE_KEY = "tune"
TRIALS_DIR = "trials"  # <storage.uri>/<sweep>/trials/<trial id>/: each trial's segjob run

# Keys a search may not set: they name, place, size or score the run rather than shape the model.
NOT_SEARCHABLE = ("name", "storage.", "scaling.", "failure.", "preemption.", "metric.", "train.epochs")
KEY_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
DIMENSION_FORMS = (
    "{loguniform: [low, high]}, {uniform: [low, high]}, {integer: [low, high]} (optional step, log), "
    "or {choice: [a, b, ...]}"
)

Scalar = bool | int | float | str | None


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched key: a float range (log or not), an integer range (inclusive) or a choice."""

    kind: Literal["float", "int", "choice"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: int | None = None
    choices: tuple[Scalar, ...] = ()

    def values_to_check(self) -> list[Scalar]:
        """The values that bound what this dimension can propose: both ends, or every choice."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.last_int())]
        return [self.low, self.high]

    def last_int(self) -> int:
        step = self.step or 1
        return int(self.low + (self.high - self.low) // step * step)

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return any(value == choice and type(value) is type(choice) for choice in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int":
            on_step = (value - self.low) % (self.step or 1) == 0
            return float(value).is_integer() and self.low <= value <= self.high and on_step
        return self.low <= value <= self.high

    def to_optuna(self):
        """The Optuna distribution TPE samples from."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=self.step or 1)
        return FloatDistribution(self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.kind == "choice":
            return "choice of " + ", ".join(cut(choice) for choice in self.choices)
        scale = "log-uniform" if self.log else "uniform"
        what = "integers" if self.kind == "int" else "floats"
        step = f", step {self.step}" if self.step else ""
        return f"{scale} {what} in [{self.low:g}, {self.high:g}]{step}"


def parse_dimension(spec: Any) -> Dimension:
    """`{loguniform: [lo, hi]}` and friends -> Dimension; ValueError naming what is wrong."""
    if not isinstance(spec, dict) or len(set(spec) & {"loguniform", "uniform", "integer", "choice"}) != 1:
        raise ValueError(f"expected one of {DIMENSION_FORMS}")
    kind = next(key for key in ("loguniform", "uniform", "integer", "choice") if key in spec)
    allowed = {"integer": {"integer", "step", "log"}}.get(kind, {kind})
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"unknown option '{cut(unknown[0])}' for {kind}; allowed: {', '.join(sorted(allowed))}")
    value = spec[kind]
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise ValueError("choice needs a non-empty list, e.g. {choice: [adam, sgd]}")
        if not all(isinstance(item, Scalar) for item in value):
            raise ValueError("choice values must be numbers, strings, booleans or null (one key per searched value)")
        if len({(type(item), item) for item in value}) != len(value):
            raise ValueError("choice lists a value twice")
        return Dimension("choice", choices=tuple(value))
    if not (isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)):
        # YAML 1.1 reads 1e-4 as text: only 1.0e-4 is a number
        exponent_as_text = any(isinstance(v, str) and re.fullmatch(r"[-+]?\d+[eE][-+]?\d+", v)
                               for v in (value if isinstance(value, list) else []))
        hint = "; write exponents with a dot, 1.0e-4 (YAML reads 1e-4 as text)" if exponent_as_text else ""
        raise ValueError(f"{kind} needs [low, high], two numbers (got {shown(value)}){hint}")
    low, high = value
    if not low < high:
        raise ValueError(f"{kind}: low ({low}) must be below high ({high})")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"loguniform: low must be above 0 (got {low})")
    if kind == "uniform":
        return Dimension("float", float(low), float(high))
    if kind == "loguniform":
        return Dimension("float", float(low), float(high), log=True)
    if not (float(low).is_integer() and float(high).is_integer()):
        raise ValueError(f"integer: low and high must be whole numbers (got {low}, {high})")
    step, log = spec.get("step"), spec.get("log", False)
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 1):
        raise ValueError(f"integer: step must be a whole number >= 1 (got {shown(step)})")
    if not isinstance(log, bool):
        raise ValueError(f"integer: log must be true or false (got {shown(log)})")
    if log and (low < 1 or (step or 1) != 1):
        raise ValueError("integer with log: low must be >= 1 and step 1")
    return Dimension("int", int(low), int(high), log=log, step=step)


def parse_space_entry(key: Any, spec: Any) -> Dimension:
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise ValueError(f"'{cut(key)}' is not a job key (dotted names like optim.lr)")
    if not searchable(key):
        raise ValueError(f"{cut(key)} cannot be searched: it names, places, sizes or scores the runs "
                         f"(every trial trains up to train.epochs; ASHA stops the poor ones sooner)")
    return parse_dimension(spec)


def searchable(key: str) -> bool:
    return not any(key.startswith(banned) if banned.endswith(".") else key == banned for banned in NOT_SEARCHABLE)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- the tune: section ------------------------------------------------------------------


class AshaSection(Section):
    grace_period: int = Field(1, ge=1, description="epochs every trial trains before it can be stopped")
    reduction_factor: float = Field(3.0, gt=1.0, description="at each rung, 1 trial in this many goes on")
    max_t: int | None = Field(
        None, ge=1, description="epochs after which any trial is stopped (default and at most: train.epochs)",
    )


class TuneSection(Section):
    space: dict[str, Dimension] = Field(description="job key -> " + DIMENSION_FORMS)
    num_samples: int = Field(8, ge=1, description="trials in all, starting points included")
    metric: str | None = Field(
        None, description="what the search maximises or minimises (default: the job's metric.name)",
    )
    mode: Literal["max", "min"] | None = Field(None, description="default: the job's metric.mode")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="default: as many trials as the cluster's CPUs/GPUs fit at the trial's worker count"
    )
    seed: int | None = Field(None, description="seed of Optuna's TPE sampler (default: the job's seed)")
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list,
        description="configurations tried first, e.g. the seed recipes; a value for every space key",
    )
    scheduler: Literal["asha", "none"] = Field(
        "asha", description="asha: stop poor trials early; none: train every trial fully",
    )
    asha: AshaSection = Field(default_factory=AshaSection)

    @field_validator("space", mode="before")
    @classmethod
    def _parse_space(cls, space: Any) -> dict[str, Dimension]:
        if not isinstance(space, dict) or not space:
            raise ValueError("needs at least one key to search, e.g. optim.lr: {loguniform: [1.0e-4, 1.0e-2]}")
        return {key: spec if isinstance(spec, Dimension) else parse_space_entry(key, spec)
                for key, spec in space.items()}

    @model_validator(mode="after")
    def _not_more_points_than_trials(self) -> TuneSection:
        if len(self.points_to_evaluate) > self.num_samples:
            raise ValueError(f"points_to_evaluate: {len(self.points_to_evaluate)} points, more than "
                             f"num_samples ({self.num_samples})")
        return self

    def dump(self) -> dict[str, Any]:
        """Plain data (what sweep.json records and a resubmission is compared with)."""
        data = self.model_dump(mode="json", exclude={"space"})
        data["space"] = {key: dataclasses.asdict(dim) | {"choices": list(dim.choices)}
                         for key, dim in self.space.items()}
        return data


# --- the sweep --------------------------------------------------------------------------


@dataclasses.dataclass
class Sweep:
    """A validated sweep: its job (the base every trial starts from) and its tune section."""

    source: str
    job: JobConfig  # resolved: absolute local paths, the sweep's metric
    tune: TuneSection
    base: dict[str, Any]  # the job as written (plus overrides and resolved paths): trial jobs start here

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def metric(self) -> str:
        """The reported key trials are ranked by (ASHA, Optuna, the sweep's report): with train.ema on, the
        EMA weights' figure (val_ema/...)."""
        return self.job.ranked_metric

    @property
    def mode(self) -> str:
        return self.job.metric.mode

    @property
    def max_epochs(self) -> int:
        """Epochs of the longest trial: ASHA's max_t."""
        return self.tune.asha.max_t or self.job.train.epochs

    def trials_uri(self) -> str:
        return f"{self.job.storage.uri.rstrip('/')}/{self.name}/{TRIALS_DIR}"

    def trial_job(self, trial_id: str, params: dict[str, Any], source: str | None = None) -> JobConfig:
        """The job one trial trains: the base job with the trial's values, its own run under the sweep."""
        raw = copy.deepcopy(self.base)
        for key, value in params.items():
            set_job_key(raw, key, value, f"{key}={shown(value)}")
        raw["name"] = trial_id
        raw.setdefault("storage", {})["uri"] = self.trials_uri()
        raw["metric"] = {"name": self.job.metric.name, "mode": self.mode}
        where = source or f"{self.source}: trial {trial_id} ({format_params(params)})"
        job = validate_job(raw, source=where)
        if job.train.ema.enabled != self.job.train.ema.enabled:  # its trials would not report the ranked metric
            raise UserError(f"{where}: turns train.ema {'on' if job.train.ema.enabled else 'off'} while the sweep "
                            f"ranks {self.metric}; search train.ema.decay within (0, 1), or set it for every trial")
        return job

    def record(self) -> dict[str, Any]:
        return {"job": self.job.model_dump(mode="json"), "tune": self.tune.dump()}


def load_sweep(path: str | Path, overrides: list[str] = ()) -> Sweep:
    """Read a sweep file; `--set` overrides reach the job (train.epochs=3) or the tune section (tune.num_samples=4)."""
    path = Path(path)
    raw = read_yaml(path, "sweep")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (name, data, model, ..., tune)")
    tune_raw = raw.pop(TUNE_KEY, None)
    if tune_raw is None:
        raise UserError(f"{path}: no '{TUNE_KEY}:' section; a sweep needs one "
                        "(python -m segjob.train runs a single job)")
    if not isinstance(tune_raw, dict):
        raise UserError(f"{path}: '{TUNE_KEY}' must be a mapping (space, num_samples, asha, ...)")
    raw.setdefault("name", path.stem)
    applied = {}
    for override in overrides:
        key, value = parse_override(override)
        if key.startswith(f"{TUNE_KEY}.space."):  # space keys are dotted job keys: one entry, not nested sections
            space = tune_raw.setdefault("space", {})
            if not isinstance(space, dict):
                raise UserError(f"--set {override}: tune.space is not a mapping")
            space[key.removeprefix(f"{TUNE_KEY}.space.")] = value
        elif key.startswith(f"{TUNE_KEY}."):
            set_path(tune_raw, key.removeprefix(f"{TUNE_KEY}."), value, override)
        else:
            applied[key] = described_override(override, set_job_key(raw, key, value, override))
    job = resolve_local_paths(validate_job(raw, source=str(path), overrides=applied))
    tune = _validate_tune(tune_raw, path)
    if tune.asha.max_t and tune.asha.max_t > job.train.epochs:
        raise UserError(f"{path}: tune.asha.max_t ({tune.asha.max_t}) is more than the train.epochs a trial has "
                        f"({job.train.epochs}); lower it or raise train.epochs")
    try:
        metric = MetricConfig(name=tune.metric or job.metric.name, mode=tune.mode or job.metric.mode)
    except ValidationError as error:
        raise UserError(f"{path}: tune.metric: {error.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    job = job.model_copy(update={"metric": metric})
    base = _with_resolved_paths(raw, job)
    sweep = Sweep(str(path), job, tune, base)
    check_space_against_job(sweep)
    return sweep


def check_space_against_job(sweep: Sweep) -> None:
    """Every value the search may propose, on its own and together with the other keys' values
    (corners()), must give a valid job, and every starting point must lie in the space: one line
    for the first that doesn't."""
    space = sweep.tune.space
    for key, dimension in space.items():
        for value in dimension.values_to_check():
            where = f"{sweep.source}: tune.space.{format_params({key: value})} does not make a valid job"
            sweep.trial_job("check", {key: value}, source=where)
    if len(space) > 1:  # one key alone was checked just now
        for params in corners(space):
            where = f"{sweep.source}: tune.space: the combination {format_params(params)} does not make a valid job"
            try:
                sweep.trial_job("check", params, source=where)
            except UserError as error:
                raise UserError(f"{error}; a search may propose it, so narrow the space (or search these keys in "
                                "separate sweeps)") from None
    for number, point in enumerate(sweep.tune.points_to_evaluate, start=1):
        where = f"{sweep.source}: tune.points_to_evaluate[{number}]"
        unknown = [key for key in point if key not in space]
        if unknown:
            raise UserError(f"{where}: '{cut(unknown[0])}' is not in space ({cut(', '.join(space), 200)})")
        missing = [key for key in space if key not in point]
        if missing:  # Optuna's warm start takes whole points only
            raise UserError(f"{where}: no value for {', '.join(missing)} (every point gives every space key)")
        outside = [key for key, value in point.items() if not space[key].contains(value)]
        if outside:
            key = outside[0]
            raise UserError(f"{where}: {key}={shown(point[key])} is outside its space ({space[key].describe()})")
        sweep.trial_job("check", point, source=f"{where} does not make a valid job")


# Corners crossed in full up to this many; past it, every pair of keys (a rule between three keys is rare).
MAX_CORNERS = 4096


def corners(space: dict[str, Dimension]) -> Iterator[dict[str, Scalar]]:
    """The values a search can combine that bound what it proposes: every choice of each categorical
    key crossed with both ends of each range (cross-key rules are checked where they are tightest:
    at the ends). Past MAX_CORNERS combinations, every pair of keys crossed, the others at their first value."""
    keys = list(space)
    values = [space[key].values_to_check() for key in keys]
    if math.prod(len(options) for options in values) <= MAX_CORNERS:
        for combination in itertools.product(*values):
            yield dict(zip(keys, combination))
        return
    first = {key: options[0] for key, options in zip(keys, values)}
    for i, j in itertools.combinations(range(len(keys)), 2):
        for a, b in itertools.product(values[i], values[j]):
            yield {**first, keys[i]: a, keys[j]: b}


def check_trials(sweep: Sweep, check: Callable[[JobConfig], None]) -> None:
    """A check that needs more than the schema (the model's smallest input, the dataset's classes) on the
    job of every corner of the space and every starting point; its ValueError becomes one line naming them."""
    together = "the combination " if len(sweep.tune.space) > 1 else ""
    candidates = [(f"tune.space: {together}{format_params(params)}", params) for params in corners(sweep.tune.space)]
    candidates += [(f"tune.points_to_evaluate[{number}] ({format_params(point)})", point)
                   for number, point in enumerate(sweep.tune.points_to_evaluate, start=1)]
    for what, params in candidates:
        try:
            check(sweep.trial_job("check", params))
        except ValueError as error:
            raise UserError(f"{sweep.source}: {what} makes a job that cannot train: {error}") from None


def format_params(params: dict[str, Any]) -> str:
    return " ".join(f"{cut(key)}={shown(value)}" for key, value in params.items())


def _validate_tune(tune_raw: dict[str, Any], path: Path) -> TuneSection:
    space = tune_raw.get("space")
    if isinstance(space, dict):  # entry by entry first, for errors that name the key
        parsed = {}
        for key, spec in space.items():
            try:
                parsed[key] = parse_space_entry(key, spec)
            except ValueError as error:
                raise UserError(f"{path}: tune.space.{cut(key)}: {error}") from None
        tune_raw = {**tune_raw, "space": parsed}
    try:
        return TuneSection.model_validate(tune_raw)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in (TUNE_KEY, *first["loc"]))
        message = first["msg"].removeprefix("Value error, ")
        if not first["loc"]:  # a check across keys names its own key
            key, message = TUNE_KEY + "." + message.split(": ", 1)[0], message.split(": ", 1)[-1]
        if first["type"] == "extra_forbidden":
            valid = sorted(walk_location(TuneSection, first["loc"][:-1])[1].model_fields)
            message = f"unknown key; valid keys here: {', '.join(valid)}"
        elif first["type"] not in ("value_error", "missing"):
            message += f" (got {shown(first.get('input'))})"
        more = f" (and {len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
        raise UserError(f"{path}: {key}: {message}{more}") from None


def _with_resolved_paths(raw: dict[str, Any], job: JobConfig) -> dict[str, Any]:
    """The job as written, with the local paths made absolute (trials run in other folders)."""
    base = copy.deepcopy(raw)
    base.setdefault("storage", {})["uri"] = job.storage.uri
    for section in ("data", "model"):
        config = getattr(job, section)
        for key in config.path_keys():
            if getattr(config, key) is not None:
                base.setdefault(section, {})[key] = getattr(config, key)
    return base
