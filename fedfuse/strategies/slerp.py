"""SLERP: spherical interpolation from the base model to one other model (offline only)."""

from __future__ import annotations

import math
from typing import Any

import torch

from fedfuse.strategies.base import Capabilities, FinalizeContext, StatisticsStrategy, add_at
from fedfuse.strategies.params import Param

COLINEAR_DOT = 0.9995
"""Above this |cos| of the two models' tensors SLERP falls back to linear interpolation (as mergekit)."""
_NORM_EPS = 1e-8


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between flat tensors ``v0`` (t = 0) and ``v1`` (t = 1), as mergekit's ``slerp``.

    The angle is the one between the two tensors as whole vectors; nearly colinear tensors are
    interpolated linearly.
    """
    n0, n1 = float(torch.linalg.vector_norm(v0)), float(torch.linalg.vector_norm(v1))
    u0 = v0 / n0 if n0 > _NORM_EPS else v0
    u1 = v1 / n1 if n1 > _NORM_EPS else v1
    dot = float((u0 * u1).sum())
    if abs(dot) > COLINEAR_DOT:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return (math.sin(theta - theta * t) / sin_theta) * v0 + (math.sin(theta * t) / sin_theta) * v1


class Slerp(StatisticsStrategy):
    """SLERP between the base θ₀ and exactly one fine-tuned model θ₁ = θ₀ + τ (mergekit ``slerp``).

    Parameters
    ----------
    t : float
        0 gives the base, 1 the other model (mergekit's ``t``; a per-layer list comes from a recipe).

    The merged task vector is slerp(t, θ₀, θ₁) − θ₀, so finalizing needs the base tensors: SLERP
    runs in ``fedfuse merge`` only, never in a federated round or a tier (two models, not a monoid).
    """

    name = "slerp"
    statistics = ("S",)
    capabilities = Capabilities(mergeable=False, federated=False, needs_base=True)
    parameters = (Param("t", float, 0.5, help="interpolation from the base (0) to the other model (1)"),)

    def __init__(self, *, t: float = 0.5, **common: Any) -> None:
        super().__init__(**common)
        if not math.isfinite(t):
            raise ValueError(f"slerp t must be finite, got {t}")
        self.t = float(t)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "t": self.t}

    def accumulate(self, stats, values, weight, fisher, index) -> None:
        add_at(stats["S"], values, index)

    def finalize_parameter(self, stats: dict[str, torch.Tensor], context: FinalizeContext) -> torch.Tensor:
        if context.num_updates != 1:
            raise ValueError(f"slerp merges the base with exactly one other model, got {context.num_updates}")
        assert context.base is not None  # MergeState.finalize checks needs_base
        return slerp(self.t, context.base, context.base + stats["S"]) - context.base
