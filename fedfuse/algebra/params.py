"""Declared parameters: a name, a type, a default, choices and one line of help.

Strategies (``fedfuse.strategies``) and sparsifiers (:mod:`fedfuse.algebra.sparsifiers`) list what
they accept as :class:`Param` records; settings, ``fedfuse merge`` and the wire read those records to
coerce and check values (run-config and command-line strings included) before anything runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

PARAM_TYPES: tuple[type, ...] = (float, int, str, bool)
"""The types a declared parameter may have (what a run config or a command line can spell)."""

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Param:
    """One declared parameter of a merge method or a sparsifier.

    Parameters
    ----------
    name : str
        The keyword the strategy's constructor takes (``eps``, ``vote``) or the sparsifier reads (``gamma``).
    type : type
        ``float``, ``int``, ``str`` or ``bool``; string values (run config, CLI) are coerced to it.
    default : object
        The value when the parameter is not given.
    choices : tuple
        Allowed values (empty: any value of the type).
    help : str
        One line for ``--help``, error messages and the docs.
    """

    name: str
    type: type
    default: Any
    choices: tuple[Any, ...] = ()
    help: str = ""

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise TypeError(f"parameter {self.name!r}: type must be one of float, int, str, bool; got {self.type!r}")
        if self.choices and self.default not in self.choices:
            raise ValueError(f"parameter {self.name!r}: default {self.default!r} is not one of its choices")

    def coerce(self, value: object) -> Any:
        """``value`` as this parameter's type (strings parsed), checked against the choices.

        Raises ``ValueError`` naming the parameter.
        """
        try:
            converted = _convert(self.type, value)
        except (TypeError, ValueError):
            raise ValueError(f"parameter {self.name!r}: cannot read {value!r} as {self.type.__name__}") from None
        if self.choices and converted not in self.choices:
            allowed = ", ".join(map(str, self.choices))
            raise ValueError(f"parameter {self.name!r} must be one of {allowed}; got {converted!r}")
        return converted

    def describe(self) -> str:
        """``name: type = default (choices) — help``, for listings."""
        choices = f" ({'|'.join(map(str, self.choices))})" if self.choices else ""
        text = f"{self.name}: {self.type.__name__} = {self.default!r}{choices}"
        return f"{text} — {self.help}" if self.help else text


def _convert(kind: type, value: object) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(value)
    if isinstance(value, bool):
        raise TypeError(value)
    if kind in (int, float):
        if not isinstance(value, str | int | float):
            raise TypeError(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        converted = float(value)
        if not math.isfinite(converted):
            raise ValueError(value)
        return converted
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def parse_params(items: str | Iterable[str], what: str) -> dict[str, str]:
    """``"eps=1e-8,vote=count"`` or ``["eps=1e-8", "vote=count"]`` → ``{"eps": "1e-8", "vote": "count"}``.

    The values stay strings (a :class:`Param` coerces them). ``what`` names the owner in errors
    (``strategy``, ``sparsifier``). Raises ``ValueError`` for an entry that is not ``name=value`` or
    a name given twice.
    """
    entries = items.split(",") if isinstance(items, str) else [part for item in items for part in item.split(",")]
    params: dict[str, str] = {}
    for entry in entries:
        entry = entry.strip()
        if not entry:
            continue
        name, sep, value = entry.partition("=")
        name, value = name.strip(), value.strip().strip("\"'")
        if not sep or not name or not value:
            raise ValueError(f"{what} parameters are name=value, got {entry!r}")
        if name in params:
            raise ValueError(f"{what} parameter {name!r} is given twice")
        params[name] = value
    return params
