"""Client-side sparsifiers as pure functions: TIES magnitude trim and seeded DARE drop.

Both return :class:`SparseTensor` (kept entries only) so a sparse update never densifies on its
way to the server. Conventions follow PEFT ``merge_utils`` and mergekit: a trim keeps the top
⌊d·n⌋ magnitudes; DARE keeps each entry with probability ``density`` and rescales kept values by
1/density, drawing its mask with ``torch.bernoulli`` from a CPU ``torch.Generator`` seeded per tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

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


SparsifierKind = Literal["none", "trim", "dare"]


@dataclass(frozen=True)
class Sparsifier:
    """How a client shrinks its task vector before sending it.

    kind: ``"none"`` (dense), ``"trim"`` (TIES top-magnitude) or ``"dare"`` (seeded random drop).
    density: the kept fraction, for every kind (DARE keeps each entry with this probability).
    scope: ``"tensor"`` trims each tensor on its own; ``"global"`` keeps the top ⌊d·N⌋ over the whole
        model. DARE draws every entry independently, so scope does not change it.
    seed_scope: for DARE, ``"node"`` gives every client its own mask, ``"round"`` one mask per round
        shared by all clients (aligned supports, as secure aggregation needs).
    """

    kind: SparsifierKind = "none"
    density: float = 1.0
    scope: Literal["tensor", "global"] = "tensor"
    seed_scope: Literal["node", "round"] = "node"

    def __post_init__(self) -> None:
        if self.kind not in ("none", "trim", "dare"):
            raise ValueError(f"unknown sparsifier {self.kind!r}: choose none, trim or dare")
        if self.scope not in ("tensor", "global"):
            raise ValueError(f"unknown sparsifier scope {self.scope!r}: choose tensor or global")
        if self.seed_scope not in ("node", "round"):
            raise ValueError(f"unknown DARE seed scope {self.seed_scope!r}: choose node or round")
        _check_density(self.density)
        if self.kind == "dare" and self.density == 0.0:
            raise ValueError("DARE needs density > 0 (kept values are rescaled by 1/density)")


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

    ``seed_for(name)`` gives each tensor's DARE seed; build it with :func:`dare_seed_fn`.
    """
    if sparsifier.kind == "none":
        return dict(tau)
    if sparsifier.kind == "trim":
        if sparsifier.scope == "global":
            return dict(global_trim(tau, sparsifier.density))
        return {name: ties_trim(t, sparsifier.density) for name, t in tau.items()}
    if seed_for is None:
        raise ValueError("DARE needs seed_for(name) -> seed; build one with dare_seed_fn(...)")
    return {name: dare_drop(t, sparsifier.density, seed_for(name)) for name, t in tau.items()}


def dare_seed_fn(
    run_seed: int, round_number: int, node_id: int | str | None, seed_scope: str = "node"
) -> Callable[[str], int]:
    """Per-tensor DARE seeds for one client and round (``seed_scope="round"`` ignores the node)."""
    node = None if seed_scope == "round" else node_id
    return lambda name: derive_seed(run_seed, round_number, node, name)
