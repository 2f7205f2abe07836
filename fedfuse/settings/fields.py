"""What every settings section shares: the error type, field declarations, coercion and range checks.

A section field is declared with :func:`setting`, which keeps its one-line description (the README
table is generated from it) and, for keys that also accept ``"auto"``, the type of a non-auto value.
"""

from __future__ import annotations

import math
from dataclasses import Field, field, fields
from typing import Any

Scalar = int | float | str | bool


class SettingsError(ValueError):
    """A run-config value is missing, of the wrong type or out of range; the message names the key."""


def setting(default: Scalar, help: str, *, auto: type | None = None) -> Any:
    """A section field with its default, a one-line description and, if "auto" is allowed, the other type."""
    return field(default=default, metadata={"help": help, "auto": auto})


def key(name: str) -> str:
    """The run-config key of a field (``num_server_rounds`` → ``num-server-rounds``)."""
    return name.replace("_", "-")


def check_choice(section: Any, name: str, allowed: tuple[Any, ...]) -> None:
    """Refuse a field whose value is not one of ``allowed``, naming the key and the choices."""
    value = getattr(section, name)
    if value not in allowed:
        raise SettingsError(f"{key(name)} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def check_at_least(section: Any, minimum: int, *names: str) -> None:
    """Refuse fields below ``minimum`` (counts: ``>= 1`` or ``>= 0``)."""
    for name in names:
        if getattr(section, name) < minimum:
            raise SettingsError(f"{key(name)} must be >= {minimum}; got {getattr(section, name)}")


def check_positive(section: Any, *names: str) -> None:
    """Refuse fields that are not finite and > 0."""
    for name in names:
        value = getattr(section, name)
        if not (math.isfinite(value) and value > 0):
            raise SettingsError(f"{key(name)} must be > 0; got {value}")


def check_fraction(section: Any, name: str, *, low_open: bool = False, high_open: bool = False) -> None:
    """Refuse a field outside [0, 1] (or (0, 1], [0, 1) with the open ends asked for)."""
    value = getattr(section, name)
    low_ok = value > 0.0 if low_open else value >= 0.0
    high_ok = value < 1.0 if high_open else value <= 1.0
    if not (low_ok and high_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise SettingsError(f"{key(name)} must be in {interval}; got {value}")


def section_fields(section: type) -> dict[str, Field[Any]]:
    """The fields of a section class by name."""
    return {f.name: f for f in fields(section)}


def coerce(f: Field[Any], value: Any) -> Any:
    """Turn a run-config value (TOML or CLI string) into the field's type, or say which key is wrong."""
    default = f.default
    auto = f.metadata.get("auto")
    target: type = auto if auto is not None else type(default)
    try:
        if auto is not None and value == "auto":
            return value
        if target is bool:
            return _as_bool(value)
        if target is int:
            return _as_int(value)
        if target is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{key(f.name)}: cannot read {value!r} as {target.__name__}") from None


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(value)
    if isinstance(value, (bool, int)):
        return bool(value)
    raise TypeError(value)


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    return int(value)
