"""Coordinate-wise median: each entry of the merged task vector is the median of the clients' entries."""

from __future__ import annotations

import torch

from fedfuse.algebra.robust import coordinate_median
from fedfuse.strategies.contract import Capabilities
from fedfuse.strategies.spilled import SpilledStrategy


class Median(SpilledStrategy):
    """Coordinate-wise median (Yin et al., 2018): robust while fewer than half the clients misbehave.

    Each entry is the median over the K updates (the mean of the two middle values for even K).
    Not a monoid: updates are spilled to disk and merged chunk by chunk (see :mod:`.spilled`).
    A sparse update counts its dropped entries as zeros.
    """

    capabilities = Capabilities(mergeable=False, averages=True)

    name = "median"

    def merge_rows(self, rows: torch.Tensor, selection: torch.Tensor | None) -> torch.Tensor:
        return coordinate_median(rows)
