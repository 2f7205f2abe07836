"""Coordinate-wise trimmed mean: drop each entry's largest and smallest values, average the rest."""

from __future__ import annotations

from typing import Any

import torch

from fedfuse.algebra.robust import trim_per_side, trimmed_mean
from fedfuse.strategies.contract import Capabilities
from fedfuse.strategies.params import Param
from fedfuse.strategies.spilled import SpilledStrategy


class TrimmedMean(SpilledStrategy):
    """Coordinate-wise β-trimmed mean (Yin et al., 2018).

    Parameters
    ----------
    trim : float
        β in [0, 0.5): ⌊β·K⌋ values are dropped at each end of every entry (at least one value stays).
        It should be at least the fraction of clients that may misbehave.

    Not a monoid: updates are spilled to disk and merged chunk by chunk (see :mod:`.spilled`).
    """

    capabilities = Capabilities(mergeable=False, averages=True)

    name = "trimmed_mean"
    parameters = (Param("trim", float, 0.25, (), "fraction β dropped at each end of every entry, in [0, 0.5)"),)

    def __init__(self, *, trim: float = 0.25, **common: Any) -> None:
        super().__init__(**common)
        trim_per_side(1, trim)  # the range check, with its message
        self.trim = float(trim)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "trim": self.trim}

    def merge_rows(self, rows: torch.Tensor, selection: torch.Tensor | None) -> torch.Tensor:
        return trimmed_mean(rows, self.trim)
