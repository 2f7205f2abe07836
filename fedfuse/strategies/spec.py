"""The method table: one ``MethodSpec`` per merge method, presets as data rows (as in mergekit).

A method is a strategy class with its declarations (``parameters``, ``capabilities``,
``default_sparsifier``). A preset such as ``dare_ties`` is not a subclass: it is a row
naming a base method, the sparsifier it defaults to and any parameter values it fixes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from fedfuse.strategies.contract import Capabilities, MergeStrategy
from fedfuse.strategies.params import COMMON_PARAMS, Param


@dataclass(frozen=True)
class Preset:
    """A named configuration of a base method.

    Parameters
    ----------
    name : str
        The preset's strategy name (``dare_ties``).
    base : str
        The method it configures (``ties``).
    default_sparsifier : str
        The client/offline sparsifier it implies (``dare``).
    fixed : Mapping[str, object]
        Base parameters the preset sets once and for all (no longer settable under its name).
    help : str
        One line for listings.
    """

    name: str
    base: str
    default_sparsifier: str = "none"
    fixed: Mapping[str, Any] = field(default_factory=dict)
    help: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """Everything the settings, the server and ``fedfuse merge`` need to know about a merge method.

    Parameters
    ----------
    name : str
        The strategy name users write.
    strategy : type[MergeStrategy]
        The class that runs it (a preset's base class).
    params : tuple[Param, ...]
        Its settable parameters, ``lam`` first.
    capabilities : Capabilities
        The class's record at its default parameters (``needs_fisher``, ``needs_gram``, ``mergeable``, …);
        an instance whose parameters change it carries its own (``strategy.capabilities``).
    default_sparsifier : str
        ``none``, ``trim``, ``dare``, … (a preset's own).
    preset_of : str or None
        The base method when this is a preset.
    fixed : Mapping[str, object]
        Parameter values the preset fixes (passed to the constructor, not settable).
    """

    name: str
    strategy: type[MergeStrategy]
    params: tuple[Param, ...]
    capabilities: Capabilities
    default_sparsifier: str
    preset_of: str | None = None
    fixed: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of_class(cls, name: str, strategy: type[MergeStrategy]) -> MethodSpec:
        """The spec a strategy class declares (a plug-in without ``parameters`` gets the common ones)."""
        own = tuple(getattr(strategy, "parameters", ()))
        return cls(
            name=name,
            strategy=strategy,
            params=_merged(COMMON_PARAMS, own, name),
            capabilities=_capabilities(name, strategy),
            default_sparsifier=str(strategy.default_sparsifier),
        )

    def with_preset(self, preset: Preset) -> MethodSpec:
        """This (base) method configured by ``preset``."""
        unknown = sorted(set(preset.fixed) - set(self.param_names))
        if unknown:
            raise ValueError(f"preset {preset.name!r} fixes {', '.join(unknown)}, which {self.name!r} does not declare")
        fixed = {name: self.param(name).coerce(value) for name, value in preset.fixed.items()}
        return MethodSpec(
            name=preset.name,
            strategy=self.strategy,
            params=tuple(p for p in self.params if p.name not in fixed),
            capabilities=self.capabilities,
            default_sparsifier=preset.default_sparsifier,
            preset_of=self.name,
            fixed=MappingProxyType(fixed),
        )

    @property
    def param_names(self) -> tuple[str, ...]:
        """The settable parameter names, ``lam`` first."""
        return tuple(p.name for p in self.params)

    def param(self, name: str) -> Param:
        """The declaration of parameter ``name`` (``ValueError`` listing the declared ones)."""
        for declared in self.params:
            if declared.name == name:
                return declared
        if name in self.fixed:
            raise ValueError(
                f"strategy {self.name!r} fixes {name} = {self.fixed[name]!r} (a preset of {self.preset_of})"
            )
        raise ValueError(
            f"strategy {self.name!r} has no parameter {name!r}; its parameters: {', '.join(self.param_names)}"
        )

    def declares(self, name: str) -> bool:
        """Whether ``name`` is a settable parameter of this method."""
        return name in self.param_names

    def coerce(self, params: Mapping[str, object]) -> dict[str, Any]:
        """``params`` checked against the declarations and converted to their types (strings parsed).

        Raises ``ValueError`` naming the first unknown parameter or bad value.
        """
        coerced: dict[str, Any] = {}
        for name, value in params.items():
            declared = self.param(name)
            try:
                coerced[name] = declared.coerce(value)
            except ValueError as exc:
                raise ValueError(f"strategy {self.name!r}: {exc}") from None
        return coerced

    def defaults(self) -> dict[str, Any]:
        """Every settable parameter at its default."""
        return {p.name: p.default for p in self.params}


def _capabilities(name: str, strategy: type[MergeStrategy]) -> Capabilities:
    declared = getattr(strategy, "capabilities", None)
    if not isinstance(declared, Capabilities):
        raise TypeError(f"strategy {name!r}: capabilities must be fedfuse.strategies.Capabilities, got {declared!r}")
    return declared


def _merged(common: tuple[Param, ...], own: tuple[Param, ...], name: str) -> tuple[Param, ...]:
    for declared in own:
        if not isinstance(declared, Param):
            raise TypeError(f"strategy {name!r}: parameters must be fedfuse.strategies.Param, got {declared!r}")
    names = [p.name for p in own]
    repeated = sorted({n for n in names if names.count(n) > 1} | ({p.name for p in common} & set(names)))
    if repeated:
        raise TypeError(f"strategy {name!r} declares {', '.join(repeated)} twice (lam is common to all strategies)")
    return common + own
