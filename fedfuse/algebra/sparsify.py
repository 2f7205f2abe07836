"""Client-side sparsifiers as pure functions: TIES trim, seeded DARE, breadcrumbs and seeded DELLA.

All return :class:`SparseTensor` (kept entries only) so a sparse update never densifies on its
way to the server. Conventions follow PEFT ``merge_utils`` and mergekit: a trim keeps the top
⌊d·n⌋ magnitudes; DARE keeps each entry with probability ``density`` and rescales kept values by
1/density, drawing its mask with ``torch.bernoulli`` from a CPU ``torch.Generator`` seeded per tensor.
Breadcrumbs and DELLA live in :mod:`fedfuse.algebra.magnitude_drops`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedfuse.algebra.magnitude_drops import RESCALES, breadcrumbs_drop, check_della, della_drop, l1_rescale
from fedfuse.algebra.seeds import derive_seed
from fedfuse.algebra.sparse import SparseTensor


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


SparsifierKind = Literal["none", "trim", "dare", "breadcrumbs", "della"]
SPARSIFIER_KINDS: tuple[str, ...] = ("none", "trim", "dare", "breadcrumbs", "della")
"""Every sparsifier a client or ``fedfuse merge`` can apply."""
DEFAULT_GAMMA = 0.01
"""Breadcrumbs' default outlier fraction (mergekit's)."""
DEFAULT_EPSILON = 0.15
"""DELLA's default spread of keep probabilities (mergekit's)."""
RANDOM_KINDS = ("dare", "della")
"""Sparsifiers that draw a seeded random mask (their kept values are rescaled, by default by 1/p)."""


@dataclass(frozen=True)
class Sparsifier:
    """How a client shrinks its task vector before sending it.

    kind: ``"none"`` (dense), ``"trim"`` (TIES top-magnitude), ``"dare"`` (seeded random drop),
        ``"breadcrumbs"`` (drop the ⌊γ·n⌋ largest outliers and the smallest) or ``"della"`` (seeded
        drop, keep probability rising with the magnitude rank in the row).
    density: the kept fraction, for every kind (DARE keeps each entry with this probability).
    gamma: the outlier fraction breadcrumbs drops from the top (mergekit's ``gamma``, default 0.01).
    epsilon: DELLA's half-spread of keep probabilities, d ± ε (mergekit's ``epsilon``, default 0.15).
    rescale: ``"auto"`` (1/p for dare and della, none otherwise), ``"inverse"``, ``"l1"`` (mergekit's
        ``rescale: true``) or ``"none"``.
    scope: ``"tensor"`` trims each tensor on its own; ``"global"`` keeps the top ⌊d·N⌋ over the whole
        model. DARE draws every entry independently, so scope does not change it.
    seed_scope: for DARE, ``"node"`` gives every client its own mask, ``"round"`` one mask per round
        shared by all clients (aligned supports, as secure aggregation needs).
    """

    kind: SparsifierKind = "none"
    density: float = 1.0
    scope: Literal["tensor", "global"] = "tensor"
    seed_scope: Literal["node", "round"] = "node"
    gamma: float = DEFAULT_GAMMA
    epsilon: float = DEFAULT_EPSILON
    rescale: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in SPARSIFIER_KINDS:
            raise ValueError(f"unknown sparsifier {self.kind!r}: choose {', '.join(SPARSIFIER_KINDS)}")
        if self.scope not in ("tensor", "global"):
            raise ValueError(f"unknown sparsifier scope {self.scope!r}: choose tensor or global")
        if self.seed_scope not in ("node", "round"):
            raise ValueError(f"unknown DARE seed scope {self.seed_scope!r}: choose node or round")
        _check_density(self.density)
        if self.kind == "dare" and self.density == 0.0:
            raise ValueError("DARE needs density > 0 (kept values are rescaled by 1/density)")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"breadcrumbs gamma must be in [0, 1], got {self.gamma}")
        # A field the kind does not use keeps its default, so equal sparsifiers compare equal.
        if self.kind != "breadcrumbs":
            object.__setattr__(self, "gamma", DEFAULT_GAMMA)
        if self.kind != "della":
            object.__setattr__(self, "epsilon", DEFAULT_EPSILON)
        if self.kind == "della":
            check_della(self.density, self.epsilon)
        if self.rescale not in ("auto", *RESCALES):
            raise ValueError(f"unknown rescale {self.rescale!r}: choose auto, {', '.join(RESCALES)}")
        if self.rescale == "inverse" and self.kind not in RANDOM_KINDS:
            raise ValueError(f"rescale 'inverse' (1/p) needs a random drop (dare, della), not {self.kind!r}")

    @property
    def resolved_rescale(self) -> str:
        """The rescale actually applied: ``auto`` is ``inverse`` for dare and della, ``none`` otherwise."""
        if self.rescale != "auto":
            return self.rescale
        return "inverse" if self.kind in RANDOM_KINDS else "none"

    @property
    def seeded(self) -> bool:
        """Whether the sparsifier draws a seeded random mask (needs ``seed_for``)."""
        return self.kind in RANDOM_KINDS


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
    """Apply ``sparsifier`` to every tensor of a task vector.

    ``seed_for(name)`` gives each tensor's DARE or DELLA seed; build it with :func:`dare_seed_fn`.
    """
    kind, density, rescale = sparsifier.kind, sparsifier.density, sparsifier.resolved_rescale
    if kind == "none":
        return dict(tau)
    if kind in ("trim", "breadcrumbs") and rescale == "l1" and sparsifier.scope == "global":
        raise ValueError("an l1 rescale is per tensor: it cannot follow a global trim")
    if kind == "trim":
        if sparsifier.scope == "global":
            return dict(global_trim(tau, density))
        trimmed = {name: ties_trim(t, density) for name, t in tau.items()}
        return {name: _l1(tau[name], s) for name, s in trimmed.items()} if rescale == "l1" else dict(trimmed)
    if kind == "breadcrumbs":
        return {name: breadcrumbs_drop(t, density, sparsifier.gamma, rescale) for name, t in tau.items()}
    if seed_for is None:
        raise ValueError(f"{kind} needs seed_for(name) -> seed; build one with dare_seed_fn(...)")
    if kind == "della":
        return {name: della_drop(t, density, sparsifier.epsilon, seed_for(name), rescale) for name, t in tau.items()}
    dropped = {name: dare_drop(t, density, seed_for(name), rescale=rescale == "inverse") for name, t in tau.items()}
    return {name: _l1(tau[name], s) for name, s in dropped.items()} if rescale == "l1" else dict(dropped)


def _l1(original: torch.Tensor, kept: SparseTensor) -> SparseTensor:
    """``kept`` with its values l1-rescaled to ``original``'s norm (support, DARE seed and density kept)."""
    return dataclasses.replace(kept, values=l1_rescale(original.reshape(-1).to(torch.float32), kept.values))


def dare_seed_fn(
    run_seed: int, round_number: int, node_id: int | str | None, seed_scope: str = "node"
) -> Callable[[str], int]:
    """Per-tensor DARE seeds for one client and round (``seed_scope="round"`` ignores the node)."""
    node = None if seed_scope == "round" else node_id
    return lambda name: derive_seed(run_seed, round_number, node, name)
