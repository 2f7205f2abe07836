"""RegMean: linear layers merged so each keeps the outputs its models gave their inputs (Gram-weighted)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedfuse.algebra.regmean import reduce_gram, regmean_solve
from fedfuse.strategies.base import Capabilities, FinalizeContext, StatisticsStrategy, add_at
from fedfuse.strategies.params import Param

SCALAR = torch.Size([1])
"""The shape of ``G`` for a parameter without Gram matrices: one summed weight."""


class RegMean(StatisticsStrategy):
    """RegMean (Jin et al., 2023): τ = (Σ wₖ·τₖ·G̃ₖ)(Σ wₖ·G̃ₖ)⁻¹ per linear weight, a weighted mean elsewhere.

    Each update carries, for its 2-D (linear) weights, the Gram matrix Gₖ = XₖᵀXₖ of the inputs that
    layer saw on the sender's data (in × in; a LoRA module's is its base layer's inputs). G̃ₖ is Gₖ
    with its off-diagonal entries scaled by ``alpha``. Parameters sent without a Gram matrix (biases,
    norms, embeddings, heads) are averaged with the update weights, as in the paper.

    Parameters
    ----------
    alpha : float
        Off-diagonal scale of each Gram matrix, in [0, 1] (default 0.9): 1 is unregularized RegMean,
        0 a per-input-feature weighted mean.

    Statistics (a monoid, so tiers and partial states are exact): per linear weight M = Σ wₖ·τₖ·G̃ₖ
    (out × in) and G = Σ wₖ·G̃ₖ (in × in); per other parameter M = Σ wₖ·τₖ and G = Σ wₖ (one value).
    A parameter must come with a Gram matrix in every update or in none.
    """

    name = "regmean"
    statistics = ("M", "G")
    capabilities = Capabilities(needs_gram=True)
    parameters = (
        Param("alpha", float, 0.9, help="off-diagonal scale of each Gram matrix, in [0, 1] (1: plain RegMean)"),
    )

    def __init__(self, *, alpha: float = 0.9, **common: Any) -> None:
        super().__init__(**common)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "alpha": self.alpha}

    def statistic_shapes(self, shape: torch.Size, gram: bool) -> dict[str, torch.Size]:
        size = shape[-1] if gram and len(shape) == 2 else None
        return {"M": torch.Size(shape), "G": SCALAR if size is None else torch.Size([size, size])}

    def parameter_shape(self, name: str, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
        if sorted(shapes) != ["G", "M"]:
            raise ValueError(f"parameter {name!r}: statistics {sorted(shapes)}, expected ['G', 'M']")
        shape = tuple(shapes["M"])
        allowed = {tuple(SCALAR)} | ({(shape[-1], shape[-1])} if len(shape) == 2 else set())
        if tuple(shapes["G"]) not in allowed:
            raise ValueError(f"parameter {name!r}: G of shape {tuple(shapes['G'])} does not fit M of shape {shape}")
        return shape

    def accumulate(self, stats, values, weight, fisher, index) -> None:
        add_at(stats["M"], values, index, alpha=weight)
        stats["G"].add_(weight)

    def accumulate_parameter(self, stats, values, weight, fisher, index, shape, gram=None) -> None:
        if gram is None:
            self.accumulate(stats, values, weight, fisher, index)
            return
        if index is not None:
            values = torch.zeros(shape.numel(), dtype=values.dtype, device=values.device).scatter_(0, index, values)
        reduced = reduce_gram(gram, self.alpha)
        stats["M"].add_((values.reshape(shape) @ reduced).reshape(-1), alpha=weight)
        stats["G"].add_(reduced.reshape(-1), alpha=weight)

    def finalize_tensor(self, stats: dict[str, torch.Tensor], total_weight: float) -> torch.Tensor:
        raise TypeError("regmean needs each parameter's shape: MergeState calls finalize_parameter")

    def finalize_parameter(self, stats: dict[str, torch.Tensor], context: FinalizeContext) -> torch.Tensor:
        summed, gram = stats["M"], stats["G"]
        if gram.numel() == 1:
            if float(gram) <= 0:
                raise ValueError("regmean needs a positive total weight (all update weights were 0)")
            return summed / gram
        size = context.shape[-1]
        return regmean_solve(summed.reshape(context.shape), gram.reshape(size, size)).reshape(-1)
