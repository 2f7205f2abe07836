"""FedAvg: the weighted mean of task vectors."""

from __future__ import annotations

import torch

from fedfuse.strategies.base import Capabilities, StatisticsStrategy, add_at


class FedAvg(StatisticsStrategy):
    """Weighted average Σ wₖτₖ / Σ wₖ (McMahan et al.).

    Statistics: S = Σ wₖτₖ per entry; the total weight W = Σ wₖ is kept by the state. An entry a
    sparse update dropped counts as τ = 0 with the update's full weight.
    """

    capabilities = Capabilities(averages=True, linear=True)

    name = "fedavg"
    statistics = ("S",)

    def accumulate(self, stats, values, weight, fisher, index) -> None:
        add_at(stats["S"], values, index, alpha=weight)

    def finalize_tensor(self, stats: dict[str, torch.Tensor], total_weight: float) -> torch.Tensor:
        if total_weight <= 0:
            raise ValueError("FedAvg needs a positive total weight (all update weights were 0)")
        return stats["S"] / total_weight
