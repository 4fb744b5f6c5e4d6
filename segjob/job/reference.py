"""The job file reference, generated from the pydantic schema in segjob/job/schema.py.

    python -m segjob.job.reference > docs/job-reference.md

Every section and key of a job file, with its type, default, limits and description, read from
`JobConfig` itself, so the reference cannot drift from what the loader accepts;
tests/test_docs.py regenerates it and compares it with the committed file. Families told apart by
a key (datasets, models, ... by `name`) get one table per member.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from segjob.job.schema import JobConfig
from segjob.job.walk import TAG, is_section, is_union, strip_annotated, tag_of, union_members

HEADER = """\
# Job file reference

<!-- Generated from segjob/job/schema.py by `python -m segjob.job.reference > docs/job-reference.md`.
     Do not edit by hand: tests/test_docs.py fails when this file and the schema differ. -->

A job is one YAML file (see `jobs/`). Every section is optional and has the defaults below;
`name` defaults to the job file's name without `.yaml`. Unknown keys are errors that name the key
and the valid ones, so a typo never passes silently. Any key can be overridden on the command
line with `--set KEY=VALUE` (the value is read as YAML: `--set train.epochs=3`,
`--set optim.betas=[0.9,0.99]`, `--set storage.endpoint_url=null`); `--set` may repeat. A `--set`
into a section the file leaves out reaches that section's default: `--set model.encoder=resnet18`
on a file without `model:` sets the encoder of the default `unet`.

A key written twice in one mapping is an error (YAML would silently keep the last), and so is a
file over 256 KiB, nested more than 32 levels deep or holding more than 10,000 values once its
aliases (`*name`) are expanded: a job needs a few hundred. Merge keys (`<<: *defaults`) work.

Some rules span the schema and the code, and are checked on the driver before anything starts
(`segjob.check`, `segjob.train`, and for every combination a sweep may propose, `segjob.tune`):
`data.image_size` must be at least the model's smallest input (SegNet and the plain U-Net halve
it once per stage or level: `2**model.stages`, `2**model.depth`; the `vgg16_bn` encoder 32),
`train.batch_size: 1` needs a model whose BatchNorm never sees a 1x1 map (PSPNet's 1x1 pyramid
bin and the image pooling of DeepLabV3+ and DeepLabV3 always do; see [models.md](models.md)),
`model.freeze_encoder` counts at most the encoder's stages, and a metric for one
class (`val/iou/<class>`, `val/dice/<class>`) must name a class of the dataset.
"""


@dataclass
class Row:
    key: str
    type: str
    default: str
    limits: str
    description: str


@dataclass
class Block:
    """One table: the keys of one section (or of one member of a family)."""

    path: str
    model: type[BaseModel]
    selector: str = ""  # e.g. "name: pets" for a member of a family
    rows: list[Row] = field(default_factory=list)


# --- walking the schema ---------------------------------------------------------------------


def discriminator_of(info: FieldInfo | None, annotation: Any) -> str | None:
    """The key that picks a member of a family of sections: declared, else a shared `name` Literal."""
    declared = getattr(info, "discriminator", None) if info is not None else None
    if isinstance(declared, str):
        return declared
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(getattr(meta, "discriminator", None), str):
            return meta.discriminator
    sections = [m for m in union_members(annotation) if is_section(m)]
    if len(sections) > 1 and all(tag_of(m, TAG) is not None for m in sections):
        return TAG
    return None


def nested_sections(annotation: Any, discriminator: str | None = None) -> list[tuple[str, type[BaseModel], str]]:
    """(path suffix, section, selector) for every section reachable inside a field's type."""
    discriminator = discriminator_of(None, annotation) or discriminator
    annotation = strip_annotated(annotation)
    origin = get_origin(annotation)
    if is_section(annotation):
        tag = tag_of(annotation, discriminator) if discriminator else None
        return [("", annotation, f"{discriminator}: {value_text(tag)}" if tag is not None else "")]
    if origin in (list, tuple, set, frozenset):
        return [("[]" + suffix, model, selector) for arg in get_args(annotation) if arg is not Ellipsis
                for suffix, model, selector in nested_sections(arg)]
    if origin is dict:
        args = get_args(annotation)
        if len(args) != 2:
            return []
        return [(".<key>" + suffix, model, selector) for suffix, model, selector in nested_sections(args[1])]
    if is_union(annotation):
        return [found for member in get_args(annotation) for found in nested_sections(member, discriminator)]
    return []


def collect(model: type[BaseModel], path: str = "", selector: str = "", blocks: dict | None = None) -> dict:
    """Blocks in reading order, keyed by (path, section class) so a shared section appears once."""
    blocks = {} if blocks is None else blocks
    key = (path, model)
    if key in blocks:
        return blocks
    block = Block(path=path, model=model, selector=selector)
    blocks[key] = block
    children: list[tuple[str, type[BaseModel], str]] = []
    for name, info in model.model_fields.items():
        full = f"{path}.{name}" if path else name
        block.rows.append(describe_field(name, info, full))
        for suffix, section, selector in nested_sections(info.annotation, discriminator_of(info, info.annotation)):
            children.append((full + suffix, section, selector))
    for child_path, section, child_selector in children:
        collect(section, child_path, child_selector, blocks)
    return blocks


# --- rendering ------------------------------------------------------------------------------


def type_name(annotation: Any, discriminator: str | None = None) -> str:
    discriminator = discriminator_of(None, annotation) or discriminator
    annotation = strip_annotated(annotation)
    origin = get_origin(annotation)
    members = union_members(annotation)
    if discriminator and len(members) > 1 and all(is_section(m) for m in members):
        tags = ", ".join(f"`{value_text(tag_of(m, discriminator))}`" for m in members)
        return f"one of ({discriminator}: {tags})"
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " \\| ".join(f"`{value_text(v)}`" for v in literal_values(annotation))
    if is_union(annotation):
        members = get_args(annotation)
        return " or ".join(type_name(m) for m in members)
    if origin in (list, set, frozenset):
        return f"list of {type_name(get_args(annotation)[0])}"
    if origin is tuple:
        args = get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin is dict:
        key, value = get_args(annotation) or (Any, Any)
        return f"mapping of {type_name(key)} to {type_name(value)}"
    if is_section(annotation):
        return "section"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " \\| ".join(f"`{value_text(m.value)}`" for m in annotation)
    if annotation is Any:  # a class itself since Python 3.11: ask first
        return "any"
    if isinstance(annotation, type):
        plain = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}
        return plain.get(annotation.__name__, re.sub(r"(?<=[a-z])(?=[A-Z])", " ", annotation.__name__).lower())
    return re.sub(r"\btyping\.", "", str(annotation))


def literal_values(annotation: Any) -> list[Any]:
    """A Literal's values, sorted: typing caches Literal["max", "min"] and Literal["min", "max"] as
    one object, so the written order depends on which module was imported first."""
    values = list(get_args(annotation))
    try:
        return sorted(values, key=lambda v: (type(v).__name__, v))
    except TypeError:
        return sorted(values, key=lambda v: (type(v).__name__, str(v)))


def value_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return value_text(value.value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float) and value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:g}"
    return str(value)


def default_text(info: FieldInfo, full: str) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        made = info.default_factory()
        if isinstance(made, BaseModel):
            tag = tag_of(type(made), discriminator_of(info, info.annotation) or "")
            return f"`{value_text(tag)}`" if tag is not None else "see below"
        return f"`{value_text(made)}`"
    if isinstance(info.default, BaseModel):
        return "see below"
    return f"`{value_text(info.default)}`"


CONSTRAINTS = (("ge", "≥ {}"), ("gt", "> {}"), ("le", "≤ {}"), ("lt", "< {}"), ("multiple_of", "multiple of {}"),
               ("min_length", "at least {} long"), ("max_length", "at most {} long"), ("pattern", "matches `{}`"))


def limits_text(info: FieldInfo) -> str:
    found = []
    for meta in info.metadata:
        for attribute, template in CONSTRAINTS:
            value = getattr(meta, attribute, None)
            if value is not None:
                found.append(template.format(value_text(value) if attribute != "pattern" else value))
    return ", ".join(found)


def describe_field(name: str, info: FieldInfo, full: str) -> Row:
    kind = type_name(info.annotation, discriminator_of(info, info.annotation))
    description = (info.description or "").replace("|", "\\|").replace("\n", " ")
    return Row(f"`{name}`", kind, default_text(info, full), limits_text(info), description)


def section_intro(model: type[BaseModel]) -> str:
    doc = model.__dict__.get("__doc__")
    return " ".join(doc.split()) if doc else ""


def title_of(block: Block) -> str:
    title = f"`{block.path}`" if block.path else "Top level"
    return title + (f" with `{block.selector}`" if block.selector else "")


def anchor_of(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


# Sections that live outside JobConfig: (path, import of the model, what to say first).
EXTRA_ROOTS = (
    ("tune", "segjob.job.sweep:TuneSection",
     "Sweep files only: a job plus this section, read by `python -m segjob.tune` (removed before the rest "
     "is validated as a job). `space` maps job keys (`optim.lr`, `data.augment.strength`, ...) to what to "
     "try; every value a search may propose is validated as a whole job before anything starts."),
)


def roots() -> list[tuple[str, type[BaseModel], str]]:
    """JobConfig, then each extra section whose module exists (a command may land later)."""
    found = [("", JobConfig, "")]
    for path, target, intro in EXTRA_ROOTS:
        module_name, _, attribute = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        found.append((path, getattr(module, attribute), intro))
    return found


def render(model: type[BaseModel] | None = None) -> str:
    blocks: dict = {}
    intros: dict[str, str] = {}
    for path, root, intro in ([("", model, "")] if model is not None else roots()):
        collect(root, path, "", blocks)
        intros[path] = intro
    blocks = list(blocks.values())
    titles = [title_of(block) for block in blocks]
    lines = [HEADER, "Sections: " + ", ".join(f"[{t}](#{anchor_of(t)})" for t in titles) + "."]
    for block, title in zip(blocks, titles):
        lines.append(f"\n## {title}\n")
        intro = " ".join(part for part in (intros.get(block.path, "") if block.path in intros else "",
                                             section_intro(block.model)) if part)
        if intro:
            lines.append(intro + "\n")
        lines.append("| key | type | default | limits | description |")
        lines.append("|---|---|---|---|---|")
        for row in block.rows:
            lines.append(f"| {row.key} | {row.type} | {row.default} | {row.limits} | {row.description} |")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segjob.job.reference", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
