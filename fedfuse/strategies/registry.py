"""Strategies by name: the built-ins, ``@register_strategy``, presets and the ``fedfuse.strategies`` entry points.

Every lookup goes through the declarations (:func:`method_spec`): parameters are checked and
coerced against what the method declares, never discovered from its constructor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any, TypeVar

from fedfuse.strategies.base import MergeStrategy
from fedfuse.strategies.spec import MethodSpec, Preset

ENTRY_POINT_GROUP = "fedfuse.strategies"
"""Entry-point group of plug-in strategies: ``name = package.module:StrategyClass`` (or a ``Preset``)."""

_REGISTRY: dict[str, type[MergeStrategy]] = {}
_PRESETS: dict[str, Preset] = {}

S = TypeVar("S", bound=type[MergeStrategy])


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator that makes a strategy available to :func:`build_strategy` under ``name``.

    The class declares its parameters in ``parameters`` (a tuple of :class:`Param`; without it only
    the common ``lam``), its ``capabilities`` record and ``default_sparsifier`` as needed.
    """

    def decorate(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, MergeStrategy)):
            raise TypeError(f"{cls!r} is not a MergeStrategy subclass")
        existing = _REGISTRY.get(name)
        if (existing is not None and existing is not cls) or name in _PRESETS:
            taken = existing.__qualname__ if existing is not None else f"preset of {_PRESETS[name].base}"
            raise ValueError(f"a strategy named {name!r} is already registered ({taken})")
        MethodSpec.of_class(name, cls)  # refuse bad declarations now, not at the first merge
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def register_preset(preset: Preset) -> Preset:
    """Make ``preset`` (a base method + default sparsifier + fixed values) available by its name."""
    existing = _PRESETS.get(preset.name)
    if preset.name in _REGISTRY or (existing is not None and existing != preset):
        raise ValueError(f"a strategy named {preset.name!r} is already registered")
    if preset.base in _PRESETS or preset.base == preset.name:
        raise ValueError(f"preset {preset.name!r} must configure a strategy class, not {preset.base!r}")
    method_spec(preset.base).with_preset(preset)  # the base exists and declares what the preset fixes
    _PRESETS[preset.name] = preset
    return preset


def _plugin_strategies() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_strategies() -> list[str]:
    """Every strategy name :func:`build_strategy` accepts: built-ins, presets, registered and plug-ins."""
    return sorted(set(_REGISTRY) | set(_PRESETS) | set(_plugin_strategies()))


def _load_plugin(name: str) -> None:
    plugin = _plugin_strategies().get(name)
    if plugin is None:
        raise ValueError(f"unknown merge strategy {name!r}; available: {', '.join(available_strategies())}")
    try:
        loaded = plugin.load()
    except Exception as exc:
        raise ValueError(f"strategy plug-in {name!r} ({plugin.value}) failed to load: {exc}") from exc
    if isinstance(loaded, Preset):
        if loaded.name != name:
            raise ValueError(f"strategy plug-in {name!r} ({plugin.value}) is a preset named {loaded.name!r}")
        register_preset(loaded)
    else:
        register_strategy(name)(loaded)


def method_spec(name: str) -> MethodSpec:
    """The declarations of strategy ``name``: parameters, Fisher need, default sparsifier, mergeability."""
    if name not in _REGISTRY and name not in _PRESETS:
        _load_plugin(name)
    preset = _PRESETS.get(name)
    if preset is not None:
        return method_spec(preset.base).with_preset(preset)
    return MethodSpec.of_class(name, _REGISTRY[name])


def strategy_class(name: str) -> type[MergeStrategy]:
    """The class that runs ``name`` (a preset's base class), loading a plug-in entry point when needed."""
    return method_spec(name).strategy


def build_strategy(
    name: str, params: Mapping[str, object] | None = None, *, device: str = "cpu", dtype: str = "float32"
) -> MergeStrategy:
    """Strategy ``name`` with its declared ``params`` (strings coerced by the declared types).

    ``device`` and ``dtype`` place the merge state. Raises ``ValueError`` naming an unknown strategy,
    an undeclared parameter (listing the declared ones) or a bad value.
    """
    spec = method_spec(name)
    values = spec.coerce(params or {})
    try:
        strategy = spec.strategy(**spec.fixed, **values, device=device, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"strategy {name!r}: {exc}") from exc
    if spec.preset_of is not None:  # the instance carries the preset's name (partial states, file metadata)
        strategy.name = spec.name
        strategy.default_sparsifier = spec.default_sparsifier
    return strategy


def get_strategy(name: str, *, device: str = "cpu", dtype: str = "float32", **params: Any) -> MergeStrategy:
    """``build_strategy(name, params, device=..., dtype=...)`` with the parameters as keywords."""
    return build_strategy(name, params, device=device, dtype=dtype)
