"""Fisher-weighted averaging: each entry weighted by the client's diagonal Fisher information."""

from __future__ import annotations

from typing import Any

import torch

from fedfuse.strategies.base import Capabilities, StatisticsStrategy, add_at
from fedfuse.strategies.params import Param


class FisherMerge(StatisticsStrategy):
    """Σ wₖFₖτₖ / max(Σ wₖFₖ, ε) per entry (Matena & Raffel).

    Parameters
    ----------
    eps : float
        Floor of the denominator (default 1e-12); entries no client has Fisher mass on merge to 0.

    With sparse updates only the kept entries carry Fisher mass: a dropped entry is "no
    information", not "τ = 0".
    """

    name = "fisher"
    statistics = ("S", "Z")
    capabilities = Capabilities(needs_fisher=True, averages=True)
    parameters = (Param("eps", float, 1e-12, help="floor of the Fisher-weight denominator (> 0)"),)

    def __init__(self, *, eps: float = 1e-12, **common: Any) -> None:
        super().__init__(**common)
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = float(eps)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "eps": self.eps}

    def accumulate(self, stats, values, weight, fisher, index) -> None:
        if index is None:
            stats["S"].addcmul_(fisher, values, value=weight)
            stats["Z"].add_(fisher, alpha=weight)
        else:
            weighted_fisher = fisher * weight
            add_at(stats["Z"], weighted_fisher, index)
            add_at(stats["S"], weighted_fisher.mul_(values), index)

    def finalize_tensor(self, stats: dict[str, torch.Tensor], total_weight: float) -> torch.Tensor:
        return stats["S"] / stats["Z"].clamp_min(self.eps)
