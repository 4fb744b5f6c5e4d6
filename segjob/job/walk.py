"""Walking the job schema: which section a field holds, and which section an error's location reaches.

    section_type(JobConfig.model_fields["data"].annotation)   # {"pets": PetsData, "voc": VOCData, ...}
    walk_location(JobConfig, ("data", "pets", "augment"))       # (["data", "augment"], AugmentConfig)

Error messages, sweeps, the reference and the schema's own validators all ask these questions;
answering them here keeps `Union[...]`, `X | Y` and `Annotated[...]` handled alike everywhere.
Families of sections are unions told apart by a `name` Literal (the schema's discriminator).
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

TAG = "name"  # the key that picks a member of a family of sections

# What a field holds, as far as a walk is concerned: one section, a family {tag: section}, or neither.
SectionType = type[BaseModel] | dict[Any, type[BaseModel]] | None


def is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def strip_annotated(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def is_union(annotation: Any) -> bool:
    return get_origin(strip_annotated(annotation)) in (Union, types.UnionType)


def union_members(annotation: Any) -> list[Any]:
    """The members of a union (Annotated stripped), or [the annotation] for anything else."""
    annotation = strip_annotated(annotation)
    if is_union(annotation):
        return [strip_annotated(member) for member in get_args(annotation)]
    return [annotation]


def tag_of(model: type[BaseModel], key: str = TAG) -> Any:
    """The value of a section's Literal `key` (its default, else the Literal's first value), else None."""
    info = model.model_fields.get(key)
    if info is None or get_origin(strip_annotated(info.annotation)) is not Literal:
        return None
    return info.default if info.default is not PydanticUndefined else get_args(strip_annotated(info.annotation))[0]


def members_by_tag(annotation: Any, key: str = TAG) -> dict[Any, type[BaseModel]] | None:
    """{tag: section} for a union of sections that each have a Literal `key`, else None."""
    members = union_members(annotation)
    if not all(is_section(member) and tag_of(member, key) is not None for member in members):
        return None
    return {tag_of(member, key): member for member in members}


def section_type(annotation: Any) -> SectionType:
    """The section a field holds, {tag: section} for a family of them, else None."""
    sections = [member for member in union_members(annotation) if is_section(member)]
    if len(sections) > 1 and all(tag_of(member) is not None for member in sections):
        return {tag_of(member): member for member in sections}
    return sections[0] if len(sections) == 1 else None


def is_plain_union(annotation: Any) -> bool:
    """A union of plain values (auto or a boolean, ...): pydantic names the member it tried in an
    error's location. None does not count: pydantic names no member for it."""
    return is_union(annotation) and len([m for m in union_members(annotation) if m is not type(None)]) > 1


_MEMBER = object()  # marks the next part of a location as a plain union's member, not a key


def walk_location(root: type[BaseModel], location: tuple | list) -> tuple[list, SectionType]:
    """The key path a user wrote for a pydantic error location, and the section found there.

    pydantic inserts tags a user never writes: a family's member (data.pets.root -> data.root) and
    a plain union's member (scaling.use_gpu.bool -> scaling.use_gpu); both are dropped. The section
    is None once the path leaves sections (a list item, a plain value)."""
    parts: list = []
    model: Any = root
    for part in location:
        if model is _MEMBER:
            model = None
        elif isinstance(model, dict):  # a family: this part is the member's tag
            model = model.get(part)
        else:
            parts.append(part)
            if model is None:
                continue
            field = model.model_fields.get(part) if isinstance(part, str) else None
            model = section_type(field.annotation) if field else None
            if model is None and field is not None and is_plain_union(field.annotation):
                model = _MEMBER
    return parts, (None if model is _MEMBER else model)
