"""Linear: mergekit's weighted average of whole models, normalized or not; weights may be negative."""

from __future__ import annotations

from typing import Any

import torch

from fedfuse.strategies.base import Capabilities, FinalizeContext, StatisticsStrategy, add_at
from fedfuse.strategies.params import Param


class Linear(StatisticsStrategy):
    """Σ wₖθₖ / Σ wₖ (``normalize``, Wortsman et al.'s model soup) or Σ wₖθₖ, as mergekit ``linear``.

    Parameters
    ----------
    normalize : bool
        Divide by Σ wₖ (default True; then this is FedAvg with signed weights). Without it the merged
        model is Σ wₖθₖ = (Σ wₖ)·θ₀ + Σ wₖτₖ: the base is scaled too, so finalizing needs the base
        tensors and the method is offline only.

    Statistics: S = Σ wₖτₖ per entry; W = Σ wₖ is kept by the state. Weights may be negative; with
    ``normalize`` their sum must not be (nearly) zero.
    """

    name = "linear"
    statistics = ("S",)
    capabilities = Capabilities(negative_weights=True, averages=True, linear=True)  # at the default normalize=True
    parameters = (Param("normalize", bool, True, help="divide by the sum of the weights (mergekit `normalize`)"),)

    def __init__(self, *, normalize: bool = True, **common: Any) -> None:
        super().__init__(**common)
        self.normalize = bool(normalize)
        self.with_capabilities(averages=self.normalize, needs_base=not self.normalize, linear=self.normalize)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "normalize": self.normalize}

    def accumulate(self, stats, values, weight, fisher, index) -> None:
        add_at(stats["S"], values, index, alpha=weight)

    def finalize_tensor(self, stats: dict[str, torch.Tensor], total_weight: float) -> torch.Tensor:
        if abs(total_weight) < 1e-8:
            raise ValueError(f"linear with normalize needs weights that do not sum to 0 (they sum to {total_weight})")
        return stats["S"] / total_weight

    def finalize_parameter(self, stats: dict[str, torch.Tensor], context: FinalizeContext) -> torch.Tensor:
        if self.normalize:
            return self.finalize_tensor(stats, context.total_weight)
        assert context.base is not None  # MergeState.finalize checks needs_base
        return stats["S"] + (context.total_weight - 1.0) * context.base
