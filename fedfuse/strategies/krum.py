"""Krum and multi-Krum: keep the updates closest to their neighbours, average them."""

from __future__ import annotations

from typing import Any

import torch

from fedfuse.algebra.robust import krum_selection
from fedfuse.strategies.contract import Capabilities
from fedfuse.strategies.params import Param
from fedfuse.strategies.spilled import SpilledStrategy


class Krum(SpilledStrategy):
    """Krum (Blanchard et al., 2017) and multi-Krum (El Mhamdi et al., 2018).

    Parameters
    ----------
    byzantine : int
        f, the number of misbehaving clients tolerated: each update is scored by the summed squared
        distances to its K − f − 2 nearest others (at least one).
    select : int
        m, how many best-scored updates are averaged: 1 is Krum, 0 means K − f (multi-Krum).

    Distances are taken over whole updates (every tensor), from a Gram matrix summed chunk by chunk
    over the spilled updates; the kept updates are then averaged entry by entry, unweighted.
    """

    capabilities = Capabilities(mergeable=False, averages=True)

    name = "krum"
    uses_distances = True
    parameters = (
        Param("byzantine", int, 1, (), "f, misbehaving clients tolerated (scores use the K − f − 2 nearest)"),
        Param("select", int, 1, (), "m, best-scored updates averaged: 1 = Krum, 0 = K − f (multi-Krum)"),
    )

    def __init__(self, *, byzantine: int = 1, select: int = 1, **common: Any) -> None:
        super().__init__(**common)
        if byzantine < 0 or select < 0:
            raise ValueError(f"byzantine and select must be >= 0, got {byzantine} and {select}")
        self.byzantine = int(byzantine)
        self.select_count = int(select)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "byzantine": self.byzantine, "select": self.select_count}

    def coefficients(self, sq_distances: torch.Tensor) -> torch.Tensor:
        return krum_selection(sq_distances, self.byzantine, self.select_count)

    def merge_rows(self, rows: torch.Tensor, selection: torch.Tensor | None) -> torch.Tensor:
        assert selection is not None
        return selection.to(device=rows.device, dtype=rows.dtype) @ rows
