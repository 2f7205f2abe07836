"""Task arithmetic: the weighted sum of task vectors, scaled by λ; negative weights negate a task."""

from __future__ import annotations

from typing import Any

import torch

from fedfuse.strategies.base import Capabilities, StatisticsStrategy, add_at
from fedfuse.strategies.params import Param


class TaskArithmetic(StatisticsStrategy):
    """λ·Σ wₖτₖ (Ilharco et al.), as PEFT ``merge_utils.task_arithmetic`` and mergekit ``task_arithmetic``.

    Parameters
    ----------
    normalize : bool
        Divide by Σ wₖ (mergekit's ``normalize``; default False, the plain sum).

    Statistics: S = Σ wₖτₖ per entry. A negative weight subtracts that task vector (task negation).
    """

    name = "task_arithmetic"
    statistics = ("S",)
    capabilities = Capabilities(negative_weights=True, linear=True)
    parameters = (Param("normalize", bool, False, help="divide by the sum of the weights (mergekit `normalize`)"),)

    def __init__(self, *, normalize: bool = False, **common: Any) -> None:
        super().__init__(**common)
        self.normalize = bool(normalize)
        self.with_capabilities(averages=self.normalize)

    def params(self) -> dict[str, Any]:
        # `normalize` appears only when set, so states written before it existed still combine.
        return {**super().params(), **({"normalize": True} if self.normalize else {})}

    def accumulate(self, stats, values, weight, fisher, index) -> None:
        add_at(stats["S"], values, index, alpha=weight)

    def finalize_tensor(self, stats: dict[str, torch.Tensor], total_weight: float) -> torch.Tensor:
        if not self.normalize:
            return stats["S"].clone()
        # mergekit's guard: a weight sum within 1e-8 of zero divides by 1
        return stats["S"] / (total_weight if abs(total_weight) >= 1e-8 else 1.0)
