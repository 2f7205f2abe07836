"""TIES merging: elect a sign per entry, then average the entries that agree with it."""

from __future__ import annotations

from typing import Any, Literal

import torch

from fedfuse.strategies.base import MergeStrategy, add_at


class Ties(MergeStrategy):
    """TIES-Merging (Yadav et al.): trim (client side), elect sign, disjoint mean, × λ.

    Parameters
    ----------
    vote : {"mass", "count"}
        ``"mass"`` (default) elects the sign of Σ wₖτₖ (PEFT "total", mergekit "sum");
        ``"count"`` elects the sign of Σ sign(τₖ) (PEFT "frequency"). A tie elects +.

    Statistics: P = Σ_{τₖ>0} wₖτₖ, Wp = Σ_{τₖ>0} wₖ, N = Σ_{τₖ<0} wₖτₖ, Wn = Σ_{τₖ<0} wₖ, plus
    C = Σ sign(τₖ) for the count vote. The result is P/Wp where + is elected, N/Wn where − is:
    with unit weights this equals PEFT ``merge_utils.ties``; with weights it follows mergekit
    (divide by the agreeing weight).
    """

    name = "ties"
    default_sparsifier = "trim"

    def __init__(self, *, vote: Literal["mass", "count"] = "mass", **common: Any) -> None:
        super().__init__(**common)
        if vote not in ("mass", "count"):
            raise ValueError(f"TIES vote must be 'mass' or 'count', got {vote!r}")
        self.vote = vote
        self.statistics = ("P", "Wp", "N", "Wn") + (("C",) if vote == "count" else ())

    def params(self) -> dict[str, Any]:
        return {**super().params(), "vote": self.vote}

    def accumulate(self, stats, values, weight, fisher, index) -> None:
        weighted = values * weight
        add_at(stats["P"], weighted.clamp(min=0), index)
        add_at(stats["N"], weighted.clamp(max=0), index)
        add_at(stats["Wp"], (values > 0).to(values.dtype), index, alpha=weight)
        add_at(stats["Wn"], (values < 0).to(values.dtype), index, alpha=weight)
        if self.vote == "count":
            add_at(stats["C"], values.sign(), index)

    def finalize_tensor(self, stats: dict[str, torch.Tensor], total_weight: float) -> torch.Tensor:
        if self.vote == "count":
            plus_elected = stats["C"] >= 0
            merged = torch.empty_like(stats["P"])
        else:
            merged = torch.add(stats["P"], stats["N"])
            plus_elected = merged >= 0
        torch.where(plus_elected, stats["P"], stats["N"], out=merged)
        # A zero agreeing weight comes with a zero agreeing sum (nothing was added), so clamping is exact.
        agreeing_weight = torch.where(plus_elected, stats["Wp"], stats["Wn"])
        return merged.div_(agreeing_weight.clamp_min_(torch.finfo(agreeing_weight.dtype).tiny))


class DareTies(Ties):
    """Preset: TIES over DARE-dropped task vectors (PEFT/mergekit ``dare_ties``)."""

    name = "dare_ties"
    default_sparsifier = "dare"
