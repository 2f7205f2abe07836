"""Model Stock: move from the base towards the average by a ratio set by the task vectors' mutual angle."""

from __future__ import annotations

from typing import Any

import torch

from fedfuse.strategies.base import FinalizeContext, StatisticsStrategy, add_at
from fedfuse.strategies.params import Param


def row_length(shape: torch.Size, filter_wise: bool) -> int:
    """Entries per row of the angle: the last dimension (``filter_wise``) or the whole tensor."""
    numel = shape.numel()
    if not filter_wise or len(shape) == 0 or numel == 0:
        return max(numel, 1)
    return shape[-1]


class ModelStock(StatisticsStrategy):
    """Model Stock (Jang et al., 2024), computed as mergekit ``model_stock``: τ = t·Σwₖτₖ/Σwₖ.

    t = K·c / (1 + (K − 1)·c), with c the mean cosine between pairs of task vectors: over each
    whole tensor, or per row of its last dimension with ``filter_wise``.

    Parameters
    ----------
    filter_wise : bool
        One angle per row (output filter) instead of one per tensor (default False, as mergekit).

    Statistics make it a monoid: S = Σ wₖτₖ, U = Σ τ̂ₖ and Q = Σ τ̂ₖ² per entry, τ̂ being τ with each
    row scaled to unit norm (a zero row stays zero). Per row, ‖U‖² = ΣQ + 2·Σ_{i<j} cos(τᵢ, τⱼ), so
    c = (‖U‖² − ΣQ) / (K(K − 1)) — exact for any split of the updates into tiers. K is the number of
    updates; one update alone is returned as it is (t = 1). The average uses the weights, the angle
    does not (mergekit has no weights), so an update of weight 0 still counts in the angle. Where
    the unit task vectors cancel out (1 + (K − 1)·c = 0) t is 0 (mergekit divides by zero there).
    """

    name = "model_stock"
    statistics = ("S", "U", "Q")
    parameters = (Param("filter_wise", bool, False, help="one angle per row instead of per tensor (mergekit)"),)

    def __init__(self, *, filter_wise: bool = False, **common: Any) -> None:
        super().__init__(**common)
        self.filter_wise = bool(filter_wise)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "filter_wise": self.filter_wise}

    def accumulate(self, stats, values, weight, fisher, index) -> None:
        raise TypeError("model_stock needs each parameter's shape: MergeState calls accumulate_parameter")

    def accumulate_parameter(self, stats, values, weight, fisher, index, shape, gram=None) -> None:
        length = row_length(torch.Size(shape), self.filter_wise)
        add_at(stats["S"], values, index, alpha=weight)
        if index is None:
            rows = values.reshape(-1, length)
            norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
            unit = torch.where(norms > 0, rows / norms.clamp_min(torch.finfo(values.dtype).tiny), 0.0).reshape(-1)
        else:
            row = torch.div(index, length, rounding_mode="floor")
            squares = torch.zeros(max(torch.Size(shape).numel() // length, 1), dtype=values.dtype, device=values.device)
            norms = squares.scatter_add_(0, row, values * values).sqrt_()[row]
            unit = torch.where(norms > 0, values / norms.clamp_min(torch.finfo(values.dtype).tiny), 0.0)
        add_at(stats["U"], unit, index)
        add_at(stats["Q"], unit * unit, index)

    def finalize_tensor(self, stats: dict[str, torch.Tensor], total_weight: float) -> torch.Tensor:
        raise TypeError("model_stock needs the update count: MergeState calls finalize_parameter")

    def finalize_parameter(self, stats: dict[str, torch.Tensor], context: FinalizeContext) -> torch.Tensor:
        count = context.num_updates
        if context.total_weight <= 0:
            raise ValueError("model_stock needs a positive total weight (all update weights were 0)")
        if count == 1:
            return stats["S"] / context.total_weight
        length = row_length(context.shape, self.filter_wise)
        unit_sum = stats["U"].reshape(-1, length)
        squares = stats["Q"].reshape(-1, length).sum(dim=1, keepdim=True)
        cosine = (unit_sum.square().sum(dim=1, keepdim=True) - squares) / (count * (count - 1))
        denominator = 1 + (count - 1) * cosine
        # c = −1/(K − 1) only when the unit task vectors cancel out: then nothing is kept (mergekit: NaN)
        ratio = torch.where(denominator > 1e-12, count * cosine / denominator.clamp_min(1e-12), 0.0)
        return (stats["S"].reshape(-1, length) * (ratio / context.total_weight)).reshape(-1)
