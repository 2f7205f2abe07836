"""Declared strategy parameters: what a method accepts, of which type, with which default and choices.

A strategy class lists its own parameters in ``parameters`` (next to ``needs_fisher``); ``lam`` is
common to all. The settings, the server, ``fedfuse simulate --strategy-param`` and ``fedfuse merge``
read these declarations instead of inspecting constructors, so a run-config string such as
``"eps=1e-8"`` is checked before anything starts. :class:`Param` itself lives in
:mod:`fedfuse.algebra.params`, shared with the sparsifiers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fedfuse.algebra.params import PARAM_TYPES, Param, parse_params

__all__ = ["COMMON_PARAMS", "LAM", "PARAM_TYPES", "Param", "format_strategy_params", "parse_strategy_params"]

LAM = Param("lam", float, 1.0, help="λ, the scale of the merged task vector")
COMMON_PARAMS: tuple[Param, ...] = (LAM,)
"""Parameters every strategy takes (``device`` and ``dtype`` are placement, passed separately)."""


def parse_strategy_params(items: str | Iterable[str]) -> dict[str, str]:
    """``"eps=1e-8,vote=count"`` or ``["eps=1e-8", "vote=count"]`` → ``{"eps": "1e-8", "vote": "count"}``.

    The values stay strings: :func:`fedfuse.strategies.build_strategy` (or ``MethodSpec.coerce``)
    converts them by the declared types. Raises ``ValueError`` for an entry that is not
    ``name=value`` or a name given twice.
    """
    return parse_params(items, "strategy")


def format_strategy_params(params: Mapping[str, object]) -> str:
    """The inverse of :func:`parse_strategy_params` for a run config (``"eps=1e-08,vote=count"``)."""
    return ",".join(f"{name}={value}" for name, value in params.items())
