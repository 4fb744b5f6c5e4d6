"""The user docs stay true to the code: the job reference is regenerated and compared, every
documented command exists with the options its guide names, and relative links resolve.

    .venv/bin/python -m pytest -q tests/test_docs.py
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from segjob.job import reference
from segjob.job.schema import JobConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REFERENCE = DOCS / "job-reference.md"
REGENERATE = ".venv/bin/python -m segjob.job.reference > docs/job-reference.md"
COMMANDS = ["train", "tune", "check", "pull", "evaluate", "predict", "report"]


def test_job_reference_matches_the_schema():
    fresh = reference.render()
    committed = REFERENCE.read_text() if REFERENCE.exists() else ""
    if fresh != committed:
        changed = [line for line in fresh.splitlines() if line not in committed.splitlines()][:5]
        pytest.fail(
            f"docs/job-reference.md is out of date with segjob/job/schema.py; regenerate it with\n    {REGENERATE}\n"
            "first lines that differ:\n    " + "\n    ".join(changed)
        )


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, info in model.model_fields.items():
        paths.append(prefix + name)
        for suffix, section, _ in reference.nested_sections(info.annotation):
            paths.extend(_leaf_paths(section, f"{prefix}{name}{suffix}."))
    return paths


def test_job_reference_lists_every_key_of_every_section():
    blocks = reference.collect(JobConfig)
    documented = {f"{block.path}.{row.key.strip('`')}".lstrip(".") for block in blocks.values() for row in block.rows}
    missing = sorted(set(_leaf_paths(JobConfig)) - documented)
    assert not missing, f"keys the reference leaves out: {missing}"


class _Uniform(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["uniform"] = "uniform"
    low: float = Field(0.0, ge=0.0, description="lower | bound")


class _Choice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["choice"] = "choice"
    values: list[str] = Field(default_factory=list)


class _Sweep(BaseModel):
    """A made-up section shaped like a search space: a mapping of tagged sections."""

    model_config = ConfigDict(extra="forbid")
    space: dict[str, Annotated[_Uniform | _Choice, Field(discriminator="kind")]] = Field(default_factory=dict)
    samples: int | None = None


def test_generator_handles_mappings_of_tagged_sections():
    text = reference.render(_Sweep)
    assert "## `space.<key>` with `kind: uniform`" in text
    assert "## `space.<key>` with `kind: choice`" in text
    assert "| `low` | number | `0.0` | ≥ 0.0 | lower \\| bound |" in text
    assert "| `samples` | integer or null | `null` |" in text


# --- per-command guides -----------------------------------------------------------------------


def _help_text(command: str) -> str:
    module = importlib.import_module(f"segjob.{command}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.main(["--help"])
    return out.getvalue()


@pytest.mark.parametrize("command", COMMANDS)
def test_command_guide_names_only_real_options(command):
    guide = DOCS / f"{command}.md"
    assert guide.is_file(), f"docs/{command}.md is missing"
    try:
        help_text = _help_text(command)
    except ModuleNotFoundError as error:
        pytest.fail(f"docs/{command}.md documents python -m segjob.{command}, which does not exist: {error}")
    options_section = re.search(r"^## Options\n(.*?)(?=^## |\Z)", guide.read_text(), re.M | re.S)
    assert options_section, f"docs/{command}.md has no '## Options' section"
    documented = set(re.findall(r"^\| `(--[a-z][a-z0-9-]*)", options_section.group(1), re.M))
    unknown = sorted(option for option in documented if option not in help_text)
    assert not unknown, f"docs/{command}.md names options that `python -m segjob.{command} --help` lacks: {unknown}"


LINKED_DOCS = [ROOT / "README.md", ROOT / "infra" / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", LINKED_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        if not (page.parent / target).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"
