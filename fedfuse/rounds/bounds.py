"""What the round engine bounds in each update before folding it: its norm and its claimed weight.

Clipping every update to an L2 norm C works with any strategy (it is also the sensitivity bound of
central DP), and a cap on ``num_examples`` stops one client from claiming most of a FedAvg mean.
Both are counted, and every update's norm is kept (K floats) so a report can show an operator the
norms a ``clip-norm`` should be chosen from.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from fedfuse.algebra.low_rank import FactoredUpdate
from fedfuse.algebra.robust import clip_factor, scale_update, update_norm


@dataclass
class UpdateBounds:
    """Per-update limits of one round, and what they did.

    Parameters
    ----------
    clip_norm : float
        When > 0, an update of larger L2 norm is scaled down to it.
    max_num_examples : int
        When > 0, an update reporting more examples weighs as this many.
    weighting : {"num_examples", "uniform"}
        An update's weight: its (capped) number of examples, or 1.
    """

    clip_norm: float = 0.0
    max_num_examples: int = 0
    weighting: str = "num_examples"
    clipped: int = 0
    capped: int = 0
    norms: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm >= 0):
            raise ValueError(f"clip_norm must be >= 0 (0 = off), got {self.clip_norm}")
        if self.max_num_examples < 0:
            raise ValueError(f"max_num_examples must be >= 0 (0 = no cap), got {self.max_num_examples}")

    def weight(self, num_examples: float) -> float:
        """An update's weight: its (capped) number of examples, or 1 with uniform weighting."""
        if self.weighting != "num_examples":
            return 1.0
        if self.max_num_examples > 0:
            return float(min(num_examples, self.max_num_examples))
        return float(num_examples)

    def clip(self, tensors: FactoredUpdate) -> tuple[FactoredUpdate, float]:
        """``tensors`` scaled to at most ``clip_norm`` (unchanged when off or not needed), and their norm."""
        norm = update_norm(tensors)
        factor = 1.0 if self.clip_norm <= 0 else clip_factor(norm, self.clip_norm)
        return (tensors if factor == 1.0 else scale_update(tensors, factor)), norm

    def admitted(self, num_examples: float, norm: float) -> None:
        """Count an accepted update: its norm, and whether clipping or the example cap cut it."""
        self.norms.append(norm)
        if self.clip_norm > 0 and norm > self.clip_norm:
            self.clipped += 1
        if self.max_num_examples > 0 and num_examples > self.max_num_examples:
            self.capped += 1

    def metrics(self) -> dict[str, int | float]:
        """``clipped``, ``capped`` and, once an update was seen, ``update-norm-median`` / ``update-norm-max``."""
        metrics: dict[str, int | float] = {"clipped": self.clipped, "capped": self.capped}
        if self.norms:
            metrics["update-norm-median"] = statistics.median(self.norms)
            metrics["update-norm-max"] = max(self.norms)
        return metrics
