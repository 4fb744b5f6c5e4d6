"""pydantic's validation errors, reworded as one line each that names the key and the fix."""

from __future__ import annotations

import difflib
import re
import types
from typing import Annotated, Any, Union, get_args, get_origin

from segjob.job.schema import JobConfig, Section


def error_key(error: dict) -> str:
    return ".".join(str(part) for part in _user_loc(error["loc"]))


def problems_in(errors: list[dict], raw: dict) -> list[str]:
    """One line per key: a value that fits no member of a union (auto or a boolean) fails once per
    member in pydantic; the user hears of it once, with every form the key takes."""
    by_key: dict[str, list[dict]] = {}
    for error in errors:
        by_key.setdefault(error_key(error), []).append(error)
    problems = []
    for key, found in by_key.items():
        if len(found) == 1:
            problems.append(_describe(found[0], raw))
        else:
            forms = " or ".join(dict.fromkeys(_expected_form(e) for e in found))
            problems.append(f"{key}: {found[0].get('input')!r} is not allowed; expected {forms}")
    return problems


def _expected_form(error: dict) -> str:
    kind = error["type"]
    if kind == "literal_error":
        return error["ctx"].get("expected", "")
    for prefix, form in (("bool", "true or false"), ("int", "an integer"), ("float", "a number"),
                         ("none", "null"), ("string", "a string"), ("list", "a list")):
        if kind.startswith(prefix):
            return form
    return error["msg"]


def _user_loc(loc: tuple) -> list:
    """Drop the tags pydantic inserts: a tagged union's (data.pets.root -> data.root) and a plain
    union's member (scaling.use_gpu.bool -> scaling.use_gpu)."""
    parts, model = [], JobConfig
    for part in loc:
        if model is _MEMBER:  # the union member pydantic tried, not a key
            model = None
            continue
        if model is None:
            parts.append(part)
            continue
        if isinstance(model, dict):  # a tagged union: this part is the tag
            model = model.get(part)
            continue
        parts.append(part)
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = _section_type(field.annotation) if field else None
        if model is None and field is not None and _plain_union(field.annotation):
            model = _MEMBER
    return parts


_MEMBER = object()  # marks the next part of a location as a union member's name


def _plain_union(annotation: Any) -> bool:
    """A union of plain values (auto or a boolean, ...); None does not count: pydantic names no member for it."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) not in (Union, types.UnionType):
        return False
    return len([member for member in get_args(annotation) if member is not type(None)]) > 1


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
