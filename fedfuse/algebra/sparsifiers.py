"""Sparsifiers by name: declarations, ``@register_sparsifier`` and the ``fedfuse.sparsifiers`` entry points.

A sparsifier is one per-tensor function ``fn(tensor, sparsifier, seed) -> SparseTensor`` plus what it
declares: its own parameters (:class:`Param`, e.g. breadcrumbs' ``gamma``), whether it draws a seeded
mask, which rescales it takes and the one it applies by default. :class:`~fedfuse.algebra.Sparsifier`
checks itself against these declarations, :func:`~fedfuse.algebra.sparsify_update` dispatches through
them, and the settings, ``fedfuse merge``, the offline plan and the wire header read them: adding a
sparsifier is one file with one registration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from fedfuse.algebra.params import Param
from fedfuse.algebra.sparse import SparseTensor

if TYPE_CHECKING:
    from fedfuse.algebra.sparsify import Sparsifier

ENTRY_POINT_GROUP = "fedfuse.sparsifiers"
"""Entry-point group of plug-in sparsifiers: ``name = package.module:function`` (decorated) or a ``SparsifierSpec``."""

RESCALES = ("inverse", "l1", "none")
"""How kept entries are rescaled: 1/keep-probability (random drops), to the tensor's L1 norm (mergekit), or not."""

RESERVED = ("kind", "density", "scope", "seed_scope", "rescale", "options")
"""Names a sparsifier may not declare: every sparsifier has these (``Sparsifier``'s own fields)."""

SparsifyFn = Callable[[torch.Tensor, "Sparsifier", int | None], "SparseTensor | torch.Tensor"]
"""``fn(tensor, sparsifier, seed)``: the kept entries of one tensor (``seed`` is None unless seeded)."""
WholeModelFn = Callable[[Mapping[str, torch.Tensor], "Sparsifier"], Mapping[str, SparseTensor]]
"""``fn(tau, sparsifier)``: the kept entries of every tensor together (``scope="global"``)."""

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class SparsifierSpec:
    """What a sparsifier declares.

    name: what settings, ``--sparsifier`` and the wire header call it.
    fn: the per-tensor function (see :data:`SparsifyFn`).
    parameters: its own parameters beyond density, scopes and rescale.
    seeded: draws a random mask from a per-tensor seed (``sparsify_update`` then needs ``seed_for``).
    rescales: the rescales it accepts besides ``"auto"``; ``default_rescale`` is what ``"auto"`` means.
    dense: keeps everything (density and rescale do not apply).
    global_fn: what ``scope="global"`` does (without it, scope does not change the sparsifier).
    check: refuses a bad combination of values at construction (e.g. DELLA's d ± ε inside (0, 1)).
    """

    name: str
    fn: SparsifyFn
    parameters: tuple[Param, ...] = ()
    seeded: bool = False
    rescales: tuple[str, ...] = ("l1", "none")
    default_rescale: str = "none"
    dense: bool = False
    global_fn: WholeModelFn | None = None
    check: Callable[[Sparsifier], None] | None = None
    help: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"a sparsifier name must be an identifier, got {self.name!r}")
        if not callable(self.fn):
            raise TypeError(f"sparsifier {self.name!r}: fn must be callable, got {self.fn!r}")
        for param in self.parameters:
            if not isinstance(param, Param):
                raise TypeError(f"sparsifier {self.name!r}: parameters must be Param records, got {param!r}")
            if param.name in RESERVED:
                raise ValueError(f"sparsifier {self.name!r}: parameter name {param.name!r} is reserved")
        unknown = [r for r in (*self.rescales, self.default_rescale) if r not in RESCALES]
        if unknown or self.default_rescale not in self.rescales:
            raise ValueError(f"sparsifier {self.name!r}: rescales must be among {RESCALES} and include the default")

    def declares(self, name: str) -> bool:
        """Whether ``name`` is one of this sparsifier's own parameters."""
        return any(param.name == name for param in self.parameters)

    def param(self, name: str) -> Param:
        """The declared parameter ``name``; ``ValueError`` listing the declared ones otherwise."""
        for param in self.parameters:
            if param.name == name:
                return param
        declared = ", ".join(p.name for p in self.parameters) or "none"
        raise ValueError(f"sparsifier {self.name!r} has no parameter {name!r}; its parameters: {declared}")


_REGISTRY: dict[str, SparsifierSpec] = {}


def register(spec: SparsifierSpec) -> SparsifierSpec:
    """Make ``spec`` available by its name (registering the same spec twice is harmless)."""
    existing = _REGISTRY.get(spec.name)
    if existing is not None and existing != spec:
        raise ValueError(f"a sparsifier named {spec.name!r} is already registered ({existing.fn.__qualname__})")
    _REGISTRY[spec.name] = spec
    return spec


def register_sparsifier(
    name: str,
    *,
    parameters: tuple[Param, ...] = (),
    seeded: bool = False,
    rescales: tuple[str, ...] = ("l1", "none"),
    default_rescale: str = "none",
    dense: bool = False,
    global_fn: WholeModelFn | None = None,
    check: Callable[[Sparsifier], None] | None = None,
    help: str = "",
) -> Callable[[F], F]:
    """Decorator registering a per-tensor function ``fn(tensor, sparsifier, seed)`` as sparsifier ``name``.

    The keywords are :class:`SparsifierSpec`'s; the function is returned unchanged.
    """

    def decorate(fn: F) -> F:
        register(SparsifierSpec(name, fn, parameters, seeded, rescales, default_rescale, dense, global_fn, check, help))
        return fn

    return decorate


def _plugin_sparsifiers() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_sparsifiers() -> list[str]:
    """Every sparsifier name :func:`sparsifier_spec` accepts: built-ins, registered and plug-ins, sorted."""
    return sorted(set(_REGISTRY) | set(_plugin_sparsifiers()))


def _load_plugin(name: str) -> None:
    plugin = _plugin_sparsifiers().get(name)
    if plugin is None:
        raise ValueError(f"unknown sparsifier {name!r}: choose {', '.join(available_sparsifiers())}")
    try:
        loaded = plugin.load()
    except Exception as exc:
        raise ValueError(f"sparsifier plug-in {name!r} ({plugin.value}) failed to load: {exc}") from exc
    if isinstance(loaded, SparsifierSpec):
        register(loaded)
    if name not in _REGISTRY:
        raise ValueError(f"sparsifier plug-in {name!r} ({plugin.value}) registered no sparsifier named {name!r}")


def sparsifier_spec(name: str) -> SparsifierSpec:
    """The declarations of sparsifier ``name`` (a ``fedfuse.sparsifiers`` entry point is loaded on first use)."""
    if name not in _REGISTRY:
        _load_plugin(name)
    return _REGISTRY[name]


def registered_sparsifiers() -> list[SparsifierSpec]:
    """The sparsifiers loaded so far (built-ins, registered, plug-ins already used), by name."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def declaring(parameter: str) -> list[str]:
    """The loaded sparsifiers that declare ``parameter`` (for "applies to …" errors)."""
    return [spec.name for spec in registered_sparsifiers() if spec.declares(parameter)]
