"""One registry for every family a job names: models, encoders, losses, datasets, schedules.

    MODELS = Registry("model", [ModelEntry("unet", UNetConfig, _build_unet), ...], where="model.name")
    entry = MODELS.lookup(cfg.name)
    # unknown: UserError "model.name: unknown model 'unett' (did you mean 'unet'?); valid: pspnet, segnet, unet"
    MODELS["unet"], list(MODELS), "unet" in MODELS     # otherwise a read-only dict by name

An entry is a frozen dataclass with a `name`. `Entry` adds the schema class whose `name`
tag selects it (the discriminated unions in schema.py) and checks the two agree when the
entry is made; each family subclasses it with what it builds.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from segjob.errors import UserError


class Named(Protocol):
    @property
    def name(self) -> str: ...


@dataclass(frozen=True)
class Entry:
    name: str  # what the job file writes, e.g. model.name: unet
    config_class: type  # the schema class whose `name` tag this is

    def __post_init__(self) -> None:
        tag = self.config_class.model_fields["name"].default
        if tag != self.name:  # the job file's name must find this entry
            raise ValueError(f"{type(self).__name__} '{self.name}' is registered with a config whose name is '{tag}'")


E = TypeVar("E", bound=Named)


class Registry(Mapping[str, E], Generic[E]):
    """A family's entries by name, in the order registered, and the one lookup that explains a miss.

    family      the word in the message: "unknown <family> '<name>'"
    where       the job key the name came from, put first ("model.name: ..."); "" for none
    suggest     add "(did you mean '<closest>'?)" when a registered name is close
    sort_valid  list the valid names sorted (else in registration order)
    error       the exception raised (a UserError unless the name cannot come from a job file)
    """

    def __init__(self, family: str, entries: Iterable[E], *, where: str = "", suggest: bool = True,
                 sort_valid: bool = True, error: type[Exception] = UserError):
        self.family = family
        self.where = where
        self.suggest = suggest
        self.sort_valid = sort_valid
        self.error = error
        self._entries: dict[str, E] = {}
        for entry in entries:
            if entry.name in self._entries:  # a dict literal would keep the last one silently
                raise ValueError(f"{family} '{entry.name}' is registered twice")
            self._entries[entry.name] = entry

    def __getitem__(self, name: str) -> E:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, name: Any) -> E:
        entry = self._entries.get(name)
        if entry is None:
            raise self.error(self.unknown_message(name))
        return entry

    def unknown_message(self, name: Any) -> str:
        hint = difflib.get_close_matches(str(name), self._entries, n=1) if self.suggest else []
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        valid = sorted(self._entries) if self.sort_valid else list(self._entries)
        prefix = f"{self.where}: " if self.where else ""
        return f"{prefix}unknown {self.family} '{name}'{suggestion}; valid: {', '.join(valid)}"
