"""Task arithmetic: the weighted sum of task vectors, scaled by λ."""

from __future__ import annotations

import torch

from fedfuse.strategies.base import MergeStrategy, add_at


class TaskArithmetic(MergeStrategy):
    """λ·Σ wₖτₖ (Ilharco et al.), as PEFT ``merge_utils.task_arithmetic``.

    Statistics: S = Σ wₖτₖ per entry.
    """

    name = "task_arithmetic"
    statistics = ("S",)

    def accumulate(self, stats, values, weight, fisher, index) -> None:
        add_at(stats["S"], values, index, alpha=weight)

    def finalize_tensor(self, stats: dict[str, torch.Tensor], total_weight: float) -> torch.Tensor:
        return stats["S"].clone()
