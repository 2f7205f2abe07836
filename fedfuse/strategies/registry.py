"""Strategies by name: the built-ins, ``@register_strategy`` and the ``fedfuse.strategies`` entry points."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Callable, TypeVar

from fedfuse.strategies.base import MergeStrategy

ENTRY_POINT_GROUP = "fedfuse.strategies"

_REGISTRY: dict[str, type[MergeStrategy]] = {}

S = TypeVar("S", bound=type[MergeStrategy])


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator that makes a strategy available to :func:`get_strategy` under ``name``."""

    def decorate(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, MergeStrategy)):
            raise TypeError(f"{cls!r} is not a MergeStrategy subclass")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"a strategy named {name!r} is already registered ({existing.__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _plugin_strategies() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_strategies() -> list[str]:
    """Every strategy name :func:`get_strategy` accepts: built-ins, registered and plug-ins."""
    return sorted(set(_REGISTRY) | set(_plugin_strategies()))


def strategy_class(name: str) -> type[MergeStrategy]:
    """The class registered under ``name``, loading a plug-in entry point when needed."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    plugin = _plugin_strategies().get(name)
    if plugin is None:
        raise ValueError(f"unknown merge strategy {name!r}; available: {', '.join(available_strategies())}")
    try:
        cls = plugin.load()
    except Exception as exc:
        raise ValueError(f"strategy plug-in {name!r} ({plugin.value}) failed to load: {exc}") from exc
    return register_strategy(name)(cls)


def get_strategy(name: str, **params: Any) -> MergeStrategy:
    """Build the strategy ``name`` with ``params`` (``lam``, ``device``, ``dtype`` and its own)."""
    cls = strategy_class(name)
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"strategy {name!r}: {exc}") from exc
