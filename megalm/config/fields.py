"""Typed config fields: `ConfigError`, the coercion of YAML values to a field's type, the `_Section` base.

Every section (megalm/config/sections.py) is a `_Section` dataclass: on construction it checks each
field against its annotation (an int where a float is declared becomes a float), its allowed values
(`CHOICES`) and its own ranges (`_check_values`), and raises a `ConfigError` naming the dotted key.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A config problem, with a message naming the offending key and value and how to fix it."""


# ---- field typing --------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field's annotation; ints become floats for float fields."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
    if value is None and optional:
        return None
    or_null = " or null" if optional else ""
    if typing.get_origin(annotation) is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, list):
            return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
        expected = f"a list of {item_type.__name__} values"
    elif annotation is bool:
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        expected = "an integer"
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number{or_null}, got {value!r}")
            return float(value)
        expected = "a number"
    elif annotation is str:
        if isinstance(value, str):
            return value
        expected = "a string"
    else:  # pragma: no cover - guards against adding a field of an unsupported type
        raise TypeError(f"unsupported config field type {annotation!r} for {key}")
    raise ConfigError(f"{key} must be {expected}{or_null}, got {_describe(value)}")


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


# ---- the section base ----------------------------------------------------------------------------


@dataclass
class _Section:
    """Base of every config section: type-checks its fields and runs its own range checks."""

    SECTION: ClassVar[str] = ""
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Keys accepted under another name (a Python keyword cannot be a field): YAML name -> field name.
    ALIASES: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check this section's field types, allowed values and ranges."""
        for name, annotation in _field_types(type(self)).items():
            setattr(self, name, _coerce(getattr(self, name), annotation, self._key(name)))
        for name, allowed in self.CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                options = ", ".join(repr(option) for option in allowed)
                raise ConfigError(f"{self._key(name)} must be one of {options}, got {value!r}")
        self._check_values()

    def _check_values(self) -> None:
        """Range checks of one section; overridden per section."""

    def _key(self, name: str) -> str:
        return f"{self.SECTION}.{name}"

    def _require(self, condition: bool, name: str, rule: str) -> None:
        if not condition:
            raise ConfigError(f"{self._key(name)} must be {rule}, got {getattr(self, name)!r}")

    def _positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            self._require(value is None or value > 0, name, "positive")

    def _non_negative(self, *names: str) -> None:
        for name in names:
            self._require(getattr(self, name) >= 0, name, ">= 0")
