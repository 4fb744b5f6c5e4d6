"""pydantic's validation errors, reworded as one line each that names the key and the fix."""

from __future__ import annotations

import difflib
import re
import reprlib
from typing import Any

from segjob.job.schema import JobConfig
from segjob.job.walk import walk_location

# A value from a file can be megabytes (an anchor bomb, a pasted blob): messages quote at most this much of it.
QUOTE_LIMIT = 60
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 2, 3, 4, 4, 3
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = QUOTE_LIMIT, 30, QUOTE_LIMIT


def shown(value: Any) -> str:
    """repr(value) as a message quotes it: cut short, however large the value."""
    return cut(_REPR.repr(value))


def cut(text: Any, limit: int = QUOTE_LIMIT) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dotted(parts: list | tuple) -> str:
    """A key path as the user writes it, each part cut short (a key, too, comes from the file)."""
    return ".".join(cut(part) for part in parts)


def error_key(error: dict) -> str:
    """The dotted key a user wrote for an error, without the tags pydantic adds (data.pets.root -> data.root)."""
    return dotted(walk_location(JobConfig, error["loc"])[0])


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
            problems.append(f"{key}: {shown(found[0].get('input'))} is not allowed; expected {forms}")
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


def _describe(error: dict, raw: dict) -> str:
    parts, found = walk_location(JobConfig, error["loc"])
    key = dotted(parts)
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = walk_location(JobConfig, error["loc"][:-1])[1]  # the location names the family member
        valid = sorted(parent.model_fields) if isinstance(parent, type) else []
        hint = difflib.get_close_matches(cut(parts[-1]), valid, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"{key}: unknown key{suggestion}; valid keys here: {', '.join(valid)}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = sorted(found or {})
        given = _lookup(raw, parts + ["name"])
        hint = difflib.get_close_matches(cut(given), tags, n=1) if given is not None else []
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        what = f"unknown name '{cut(given)}'" if given is not None else "missing 'name'"
        return f"{key}.name: {what}{suggestion}; valid: {', '.join(tags)}"
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", error["ctx"].get("expected", ""))
        hint = difflib.get_close_matches(cut(error.get("input")), expected, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"{key}: '{cut(error.get('input'))}' is not allowed{suggestion}; expected {error['ctx'].get('expected')}"
    if kind == "missing":
        return f"{key}: required key is missing"
    message = cut(error["msg"].removeprefix("Value error, "), 4 * QUOTE_LIMIT)  # a validator may quote the value
    return f"{key}: {message} (got {shown(error.get('input'))})"


def _lookup(raw: Any, parts: list) -> Any:
    for part in parts:
        if not isinstance(raw, dict):
            return None
        raw = raw.get(part)
    return raw
