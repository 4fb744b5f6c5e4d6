"""Reading a job: YAML, `--set` overrides, validation, and paths made absolute."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from segjob.errors import UserError
from segjob.job.messages import error_key, problems_in
from segjob.job.schema import JobConfig


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
        set_path(raw, key, value, override)
        applied[key] = override
    return validate_job(raw, source=str(path), overrides=applied)


def read_yaml(path: Path, kind: str) -> Any:
    """A job or sweep file's parsed YAML; a missing file or a syntax error is one UserError line that names the file."""
    if not path.is_file():
        raise UserError(f"{path}: {kind} file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise UserError(f"{path}: {where}not valid YAML ({getattr(error, 'problem', error)})") from None


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


def set_path(raw: dict, key: str, value: Any, override: str) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {override}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value
