"""Client-side sparsifiers as pure functions: TIES trim, seeded DARE, breadcrumbs and seeded DELLA.

All return :class:`SparseTensor` (kept entries only) so a sparse update never densifies on its
way to the server. Conventions follow PEFT ``merge_utils`` and mergekit: a trim keeps the top
⌊d·n⌋ magnitudes; DARE keeps each entry with probability ``density`` and rescales kept values by
1/density, drawing its mask with ``torch.bernoulli`` from a CPU ``torch.Generator`` seeded per tensor.
Breadcrumbs and DELLA live in :mod:`fedfuse.algebra.magnitude_drops`. Each registers itself by name
(:mod:`fedfuse.algebra.sparsifiers`), and :func:`sparsify_update` dispatches through that registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from fedfuse.algebra.magnitude_drops import EPSILON, GAMMA, l1_rescale
from fedfuse.algebra.seeds import derive_seed
from fedfuse.algebra.sparse import SparseTensor
from fedfuse.algebra.sparsifiers import (
    RESCALES,
    SparsifierSpec,
    register_sparsifier,
    registered_sparsifiers,
    sparsifier_spec,
)


def _check_density(density: float) -> None:
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")


def trim_count(numel: int, density: float) -> int:
    """How many entries a TIES trim keeps: ⌊density·numel⌋, as PEFT and mergekit compute it."""
    _check_density(density)
    return int(density * numel)


def ties_trim(tensor: torch.Tensor, density: float) -> SparseTensor:
    """Keep the ⌊density·n⌋ largest-magnitude entries of ``tensor`` (values in fp32)."""
    flat = tensor.reshape(-1).to(torch.float32)
    k = trim_count(flat.numel(), density)
    if k == flat.numel():
        indices = torch.arange(flat.numel(), dtype=torch.int64, device=flat.device)
    else:
        indices = torch.topk(flat.abs(), k=k, largest=True, sorted=False).indices.sort().values
    return SparseTensor(indices=indices, values=flat[indices], shape=tensor.shape)


def dare_mask(shape: torch.Size | tuple[int, ...], density: float, seed: int) -> torch.Tensor:
    """The boolean keep-mask of DARE: each entry kept with probability ``density``.

    Drawn on CPU from ``torch.Generator().manual_seed(seed)`` with ``torch.bernoulli`` over an fp32
    probability tensor, so the same seed gives the same mask on every machine; it is also the mask
    PEFT's ``random_pruning`` draws after ``torch.manual_seed(seed)`` for an fp32 tensor.
    """
    _check_density(density)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    probabilities = torch.full(tuple(shape), density, dtype=torch.float32)
    return torch.bernoulli(probabilities, generator=generator).bool()


def dare_indices(numel: int, density: float, seed: int) -> torch.Tensor:
    """Sorted flat indices kept by :func:`dare_mask` for a tensor of ``numel`` entries."""
    return torch.from_numpy(np.flatnonzero(dare_mask((numel,), density, seed).numpy()).astype(np.int64, copy=False))


def dare_drop(tensor: torch.Tensor, density: float, seed: int, rescale: bool = True) -> SparseTensor:
    """DARE: keep each entry with probability ``density`` and rescale kept values by 1/density.

    The result remembers its seed, so the wire format can send the values alone.
    """
    flat = tensor.reshape(-1).to(torch.float32)
    indices = dare_indices(flat.numel(), density, seed).to(flat.device)
    values = flat[indices]
    if rescale and density > 0:
        values = values / density
    return SparseTensor(indices=indices, values=values, shape=tensor.shape, dare_seed=seed, dare_density=density)


SparsifierKind = str
"""A registered sparsifier's name: ``none``, ``trim``, ``dare``, ``breadcrumbs``, ``della`` or a plug-in's
(:func:`~fedfuse.algebra.sparsifiers.available_sparsifiers`)."""
SCOPES = ("tensor", "global")
"""``Sparsifier.scope``: each tensor on its own, or the whole model at once (trim)."""
SEED_SCOPES = ("node", "round")
"""``Sparsifier.seed_scope``: a seeded mask per node, or one per round shared by every node."""
DEFAULT_GAMMA: float = GAMMA.default
"""Breadcrumbs' default outlier fraction (mergekit's)."""
DEFAULT_EPSILON: float = EPSILON.default
"""DELLA's default spread of keep probabilities (mergekit's)."""
FIELD_PARAMS = ("gamma", "epsilon")
"""Declared parameters stored in a :class:`Sparsifier` field of their own (the rest go to ``options``)."""


@dataclass(frozen=True)
class Sparsifier:
    """How a client shrinks its task vector before sending it.

    kind: a registered sparsifier (:mod:`fedfuse.algebra.sparsifiers`): ``"none"`` (dense), ``"trim"``
        (TIES top-magnitude), ``"dare"`` (seeded random drop), ``"breadcrumbs"`` (drop the ⌊γ·n⌋ largest
        outliers and the smallest), ``"della"`` (seeded drop, keep probability rising with the magnitude
        rank in the row) or a plug-in.
    density: the kept fraction, for every kind (DARE keeps each entry with this probability).
    gamma: the outlier fraction breadcrumbs drops from the top (mergekit's ``gamma``, default 0.01).
    epsilon: DELLA's half-spread of keep probabilities, d ± ε (mergekit's ``epsilon``, default 0.15).
    rescale: ``"auto"`` (the kind's default: 1/p for dare and della, none otherwise), ``"inverse"``,
        ``"l1"`` (mergekit's ``rescale: true``) or ``"none"``, as the kind declares.
    scope: ``"tensor"`` trims each tensor on its own; ``"global"`` keeps the top ⌊d·N⌋ over the whole
        model. DARE draws every entry independently, so scope does not change it.
    seed_scope: for DARE, ``"node"`` gives every client its own mask, ``"round"`` one mask per round
        shared by all clients (aligned supports, as secure aggregation needs).
    options: the kind's declared parameters by name (a plug-in's), coerced, defaults filled in, stored
        as sorted ``(name, value)`` pairs so sparsifiers stay hashable; ``gamma`` and ``epsilon`` given
        here go to their fields. An undeclared name is refused. See :attr:`params`.
    """

    kind: SparsifierKind = "none"
    density: float = 1.0
    scope: Literal["tensor", "global"] = "tensor"
    seed_scope: Literal["node", "round"] = "node"
    gamma: float = DEFAULT_GAMMA
    epsilon: float = DEFAULT_EPSILON
    rescale: str = "auto"
    options: Mapping[str, Any] | tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        spec = sparsifier_spec(self.kind)
        if self.scope not in SCOPES:
            raise ValueError(f"unknown sparsifier scope {self.scope!r}: choose tensor or global")
        if self.seed_scope not in SEED_SCOPES:
            raise ValueError(f"unknown DARE seed scope {self.seed_scope!r}: choose node or round")
        _check_density(self.density)
        given = {name: spec.param(name).coerce(value) for name, value in dict(self.options).items()}
        for name in FIELD_PARAMS:  # gamma=… and options={"gamma": …} are the same sparsifier
            if name in given:
                object.__setattr__(self, name, given.pop(name))
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"breadcrumbs gamma must be in [0, 1], got {self.gamma}")
        self._normalize(spec, given)
        if spec.check is not None:
            spec.check(self)
        self._check_rescale(spec)

    def _normalize(self, spec: SparsifierSpec, given: dict[str, Any]) -> None:
        """A field the kind does not use keeps its default, so equal sparsifiers compare equal."""
        for name in FIELD_PARAMS:
            if not spec.declares(name):
                object.__setattr__(self, name, _FIELD_DEFAULTS[name])
            elif spec.param(name).default != _FIELD_DEFAULTS[name]:
                raise ValueError(f"sparsifier {spec.name!r} declares {name!r} with a default other than the field's")
        options = {p.name: given.get(p.name, p.default) for p in spec.parameters if p.name not in FIELD_PARAMS}
        object.__setattr__(self, "options", tuple(sorted(options.items())))

    def _check_rescale(self, spec: SparsifierSpec) -> None:
        if self.rescale not in ("auto", *RESCALES):
            raise ValueError(f"unknown rescale {self.rescale!r}: choose auto, {', '.join(RESCALES)}")
        if self.rescale == "inverse" and "inverse" not in spec.rescales:
            random = ", ".join(other.name for other in registered_sparsifiers() if "inverse" in other.rescales)
            raise ValueError(f"rescale 'inverse' (1/p) needs a random drop ({random}), not {self.kind!r}")
        if self.rescale not in ("auto", *spec.rescales):
            raise ValueError(f"sparsifier {self.kind!r} takes rescale auto, {', '.join(spec.rescales)}")

    @classmethod
    def of(
        cls,
        kind: SparsifierKind,
        density: float = 1.0,
        *,
        scope: str = "tensor",
        seed_scope: str = "node",
        rescale: str = "auto",
        params: Mapping[str, object] | None = None,
    ) -> Sparsifier:
        """Sparsifier ``kind`` from loose values: its declared ``params`` by name (strings coerced).

        A dense kind (``none``) ignores ``density`` and ``rescale``; an undeclared parameter is refused.
        The settings, the offline plan and ``task_vector_mod`` build theirs this way.
        """
        if sparsifier_spec(kind).dense:
            density, rescale = 1.0, "auto"
        return cls(kind, density, scope, seed_scope, rescale=rescale, options=dict(params or {}))  # type: ignore[arg-type]

    @property
    def spec(self) -> SparsifierSpec:
        """The kind's declarations (function, parameters, seeded, rescales)."""
        return sparsifier_spec(self.kind)

    @property
    def params(self) -> dict[str, Any]:
        """The kind's declared parameters and their values (``{"gamma": 0.01}`` for breadcrumbs)."""
        options = dict(self.options)
        declared = self.spec.parameters
        return {p.name: getattr(self, p.name) if p.name in FIELD_PARAMS else options[p.name] for p in declared}

    @property
    def resolved_rescale(self) -> str:
        """The rescale actually applied: ``auto`` is the kind's default (``inverse`` for dare and della)."""
        if self.rescale != "auto":
            return self.rescale
        return self.spec.default_rescale

    @property
    def seeded(self) -> bool:
        """Whether the sparsifier draws a seeded random mask (needs ``seed_for``)."""
        return self.spec.seeded


_FIELD_DEFAULTS = {"gamma": DEFAULT_GAMMA, "epsilon": DEFAULT_EPSILON}


def global_trim(tau: Mapping[str, torch.Tensor], density: float) -> dict[str, SparseTensor]:
    """Keep the top ⌊density·N⌋ magnitudes over all tensors together (N = total entries)."""
    names = list(tau)
    sizes = [tau[name].numel() for name in names]
    magnitudes = torch.cat([tau[name].reshape(-1).to(torch.float32).abs() for name in names])
    k = trim_count(magnitudes.numel(), density)
    kept = torch.topk(magnitudes, k=k, largest=True, sorted=False).indices.sort().values
    del magnitudes
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    out: dict[str, SparseTensor] = {}
    for i, name in enumerate(names):
        lo, hi = torch.searchsorted(kept, offsets[i : i + 2]).tolist()
        local = kept[lo:hi] - offsets[i]
        flat = tau[name].reshape(-1).to(torch.float32)
        out[name] = SparseTensor(indices=local, values=flat[local], shape=tau[name].shape)
    return out


def sparsify_update(
    tau: Mapping[str, torch.Tensor],
    sparsifier: Sparsifier,
    seed_for: Callable[[str], int] | None = None,
) -> dict[str, torch.Tensor | SparseTensor]:
    """Apply ``sparsifier`` to every tensor of a task vector, through its registered function.

    ``seed_for(name)`` gives each tensor's seed for a seeded kind (DARE, DELLA); build it with
    :func:`dare_seed_fn`.
    """
    spec = sparsifier.spec
    if spec.seeded and seed_for is None:
        raise ValueError(f"{sparsifier.kind} needs seed_for(name) -> seed; build one with dare_seed_fn(...)")
    if sparsifier.scope == "global" and spec.global_fn is not None:
        return dict(spec.global_fn(tau, sparsifier))
    if spec.seeded:
        assert seed_for is not None
        return {name: spec.fn(t, sparsifier, seed_for(name)) for name, t in tau.items()}
    return {name: spec.fn(t, sparsifier, None) for name, t in tau.items()}


def _l1(original: torch.Tensor, kept: SparseTensor) -> SparseTensor:
    """``kept`` with its values l1-rescaled to ``original``'s norm (support, DARE seed and density kept)."""
    return dataclasses.replace(kept, values=l1_rescale(original.reshape(-1).to(torch.float32), kept.values))


def dare_seed_fn(
    run_seed: int, round_number: int, node_id: int | str | None, seed_scope: str = "node"
) -> Callable[[str], int]:
    """Per-tensor DARE seeds for one client and round (``seed_scope="round"`` ignores the node)."""
    node = None if seed_scope == "round" else node_id
    return lambda name: derive_seed(run_seed, round_number, node, name)


# --- the built-in registrations (breadcrumbs and della register in magnitude_drops) -----------------


@register_sparsifier("none", dense=True, help="dense: send every entry")
def no_sparsifier(tensor: torch.Tensor, sparsifier: Sparsifier, seed: int | None) -> torch.Tensor:
    """The ``none`` sparsifier: the tensor itself."""
    return tensor


def _global_trim(tau: Mapping[str, torch.Tensor], sparsifier: Sparsifier) -> dict[str, SparseTensor]:
    if sparsifier.resolved_rescale == "l1":
        raise ValueError("an l1 rescale is per tensor: it cannot follow a global trim")
    return global_trim(tau, sparsifier.density)


@register_sparsifier("trim", global_fn=_global_trim, help="TIES: keep the top ⌊d·n⌋ magnitudes")
def trim_sparsifier(tensor: torch.Tensor, sparsifier: Sparsifier, seed: int | None) -> SparseTensor:
    """The ``trim`` sparsifier: :func:`ties_trim`, then an l1 rescale if asked."""
    kept = ties_trim(tensor, sparsifier.density)
    return _l1(tensor, kept) if sparsifier.resolved_rescale == "l1" else kept


def _check_dare(sparsifier: Sparsifier) -> None:
    if sparsifier.density == 0.0:
        raise ValueError("DARE needs density > 0 (kept values are rescaled by 1/density)")


@register_sparsifier(
    "dare",
    seeded=True,
    rescales=RESCALES,
    default_rescale="inverse",
    check=_check_dare,
    help="seeded random drop keeping each entry with probability d",
)
def dare_sparsifier(tensor: torch.Tensor, sparsifier: Sparsifier, seed: int | None) -> SparseTensor:
    """The ``dare`` sparsifier: :func:`dare_drop` with the tensor's seed, rescaled 1/d, by l1 or not."""
    assert seed is not None  # seeded: sparsify_update passes one
    rescale = sparsifier.resolved_rescale
    dropped = dare_drop(tensor, sparsifier.density, seed, rescale=rescale == "inverse")
    return _l1(tensor, dropped) if rescale == "l1" else dropped
