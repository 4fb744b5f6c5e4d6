"""Reading a job: YAML, `--set` overrides, validation, and paths made absolute."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from segjob.errors import UserError
from segjob.job.messages import error_key, problems_in
from segjob.job.schema import JobConfig
from segjob.job.walk import TAG, section_type, tag_of
from segjob.job.yaml_file import read_yaml


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The job file and its --set overrides, the same for every command that takes a job."""
    parser.add_argument("job", help="job YAML file, e.g. jobs/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job key, e.g. --set train.epochs=3 (repeatable)")


def load_job(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Read, override and validate a job file; every problem becomes one UserError line."""
    path = Path(path)
    raw = read_yaml(path, "job")
    if raw is None:  # an empty job file: every default
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (name, data, model, ...)")
    raw.setdefault("name", path.stem)
    applied = {}
    for override in overrides:
        key, value = parse_override(override)
        applied[key] = described_override(override, set_job_key(raw, key, value, override))
    return validate_job(raw, source=str(path), overrides=applied)


def validate_job(raw: dict[str, Any], source: str = "job", overrides: dict[str, str] | None = None) -> JobConfig:
    try:
        job = JobConfig.model_validate(raw)
    except ValidationError as error:
        problems = problems_in(error.errors(), raw)
        first_key = error_key(error.errors()[0])
        where = source
        for key, override in (overrides or {}).items():
            if first_key == key or first_key.startswith(key + "."):
                where = f"{source} (--set {override})"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{where}: {problems[0]}{more}") from None
    return job


def resolve_local_paths(job: JobConfig, base: Path | None = None) -> JobConfig:
    """Make local data, model weight and storage paths absolute, so Ray workers in other folders find them."""
    base = base or Path.cwd()
    update: dict[str, Any] = {}
    for section in ("data", "model"):
        config = getattr(job, section)
        local = {key: getattr(config, key) for key in config.path_keys()}
        local = {key: path for key, path in local.items() if path and "://" not in path}
        if local:
            absolute = {key: str((base / path).resolve()) for key, path in local.items()}
            update[section] = config.model_copy(update=absolute)
    if "://" not in job.storage.uri:
        update["storage"] = job.storage.model_copy(update={"uri": str((base / job.storage.uri).resolve())})
    return job.model_copy(update=update)


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text}: expected KEY=VALUE, for example --set train.epochs=3")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        return key.strip(), value


def set_job_key(raw: dict, key: str, value: Any, override: str) -> tuple[str, str] | None:
    """Set a dotted job key in a raw job. A family of sections (model, loss, data, optim.schedule) that
    the raw job leaves out is its default member: --set model.encoder=resnet18 on a file without
    `model:` sets the default U-Net's encoder. Returns the family filled in and its member, ("model", "unet"),
    when the key is one of that member's own (where another member may be what the user meant)."""
    filled = None
    node: Any = raw
    model: type[BaseModel] | None = JobConfig
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        field = model.model_fields.get(part) if model is not None else None
        if field is None or not isinstance(node, dict):
            break
        kind = section_type(field.annotation)
        if node.get(part) is None:
            default = field.get_default(call_default_factory=True)
            member = tag_of(type(default)) if isinstance(kind, dict) and isinstance(default, BaseModel) else None
            node[part] = {TAG: member} if member is not None else {}
            if member is not None and depth == len(parts) - 2:
                filled = (".".join(parts[: depth + 1]), member)
        node = node[part]
        if isinstance(kind, dict):  # a family: the member the raw job names, if it names one
            tag = node.get(TAG) if isinstance(node, dict) else None
            kind = kind.get(tag) if isinstance(tag, (str, int)) else None
        model = kind
    set_path(raw, key, value, override)
    return filled


def described_override(override: str, defaulted: tuple[str, str] | None) -> str:
    """How an error names the --set it came from, and the family member it fell back on."""
    if defaulted is None:
        return override
    family, member = defaulted
    return (f"{override}; the file has no {family}: section, so {family}.{TAG} is the default {member}: "
            f"--set {family}.{TAG}=... picks another")


def set_path(raw: dict, key: str, value: Any, override: str) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {override}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value
