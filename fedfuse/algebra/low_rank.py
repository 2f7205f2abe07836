"""Matrices held as factors ΔW = B·A: exact sums of LoRA updates without forming ΔW, and their SVD truncation.

A weighted sum of K rank-r LoRA updates Σ cₖ·sₖBₖAₖ is exactly [c₁s₁B₁ … c_KsₖB_K]·[A₁; …; A_K]: its
factors are the updates' factors stacked (rank ≤ K·r). Folding an update is then a concatenation,
O(r·(in + out)), not a product, O(r·in·out); the product is formed once, where a dense matrix is needed
(:meth:`LowRank.dense`), or never (a node applies W ← W + B·A itself). The stacked form pays only while
its K·r·(in + out) entries are fewer than the matrix's in·out (:func:`factors_are_smaller`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedfuse.algebra.sparse import SparseTensor


@dataclass(frozen=True)
class LowRank:
    """A matrix ``b @ a`` kept as its factors (B: out×R, A: R×in)."""

    b: torch.Tensor
    a: torch.Tensor

    def __post_init__(self) -> None:
        if self.a.ndim != 2 or self.b.ndim != 2 or self.b.shape[1] != self.a.shape[0]:
            raise ValueError(
                f"factors do not chain: B is {tuple(self.b.shape)}, A is {tuple(self.a.shape)} (need B: out×R, A: R×in)"
            )

    @property
    def shape(self) -> torch.Size:
        """The shape of the matrix B·A."""
        return torch.Size((self.b.shape[0], self.a.shape[1]))

    @property
    def rank(self) -> int:
        """The factors' inner dimension R (an upper bound on the matrix's rank)."""
        return int(self.a.shape[0])

    @property
    def numel(self) -> int:
        """Entries held: R·(out + in)."""
        return self.b.numel() + self.a.numel()

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """B·A as a dense matrix in ``dtype``: the product taken in float64 and rounded once.

        So the same factors give the same bits whatever the BLAS blocking or thread count, and a matrix sent
        dense lands exactly as the same matrix sent as factors (:func:`fedfuse.rounds.apply_delta`).
        """
        return (self.b.to(torch.float64) @ self.a.to(torch.float64)).to(dtype)

    def scaled(self, factor: float) -> LowRank:
        """``factor``·B·A (B scaled, A shared)."""
        return LowRank(self.b * factor, self.a)

    def to(self, dtype: torch.dtype) -> LowRank:
        """Both factors in ``dtype``."""
        return LowRank(self.b.to(dtype), self.a.to(dtype))


FactoredTensor = torch.Tensor | SparseTensor | LowRank
"""One tensor of an update that may hold matrices as factors."""
FactoredUpdate = Mapping[str, FactoredTensor]
"""An update keyed by parameter name whose matrices may be held as factors (:class:`LowRank`)."""


def densified(update: FactoredUpdate) -> dict[str, torch.Tensor | SparseTensor]:
    """``update`` with every :class:`LowRank` matrix formed densely (other tensors as they are)."""
    return {name: t.dense() if isinstance(t, LowRank) else t for name, t in update.items()}


def stack(terms: Sequence[LowRank]) -> LowRank:
    """Σ Bₖ·Aₖ as one pair: the Bs side by side, the As one above the other (exact, no product)."""
    if not terms:
        raise ValueError("stack needs at least one low-rank term")
    shapes = {term.shape for term in terms}
    if len(shapes) != 1:
        raise ValueError(f"cannot stack low-rank terms of different shapes: {sorted(tuple(s) for s in shapes)}")
    if len(terms) == 1:
        return terms[0]
    return LowRank(torch.cat([t.b for t in terms], dim=1), torch.cat([t.a for t in terms], dim=0))


def frobenius_norm(matrix: LowRank) -> float:
    """‖B·A‖_F from the factors: √Σ (BᵀB ⊙ AAᵀ), O(R²·(in + out)) instead of forming B·A."""
    b, a = matrix.b.float(), matrix.a.float()  # the R × R Grams in float32, their product summed in float64
    squared = float(((b.T @ b).double() * (a @ a.T).double()).sum())
    return math.sqrt(max(squared, 0.0))


def factors_are_smaller(shape: Sequence[int], rank: int) -> bool:
    """Whether rank-``rank`` factors of an out×in matrix hold fewer entries than the matrix."""
    out_features, in_features = int(shape[0]), int(shape[1])
    return rank * (out_features + in_features) < out_features * in_features


@dataclass(frozen=True)
class Truncation:
    """A matrix's best rank-R factors and what they leave out (the residual a sender keeps for next time)."""

    factors: LowRank
    residual: torch.Tensor
    relative_error: float
    """‖residual‖ / ‖matrix‖ (0 for a zero matrix)."""


def truncate(matrix: torch.Tensor, rank: int) -> Truncation:
    """The rank-``rank`` truncated SVD of ``matrix`` as factors (singular values split over B, A), and its residual."""
    if matrix.ndim != 2:
        raise ValueError(f"can only truncate a matrix, got shape {tuple(matrix.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    wide = matrix.float()
    u, s, vh = torch.linalg.svd(wide, full_matrices=False)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    factors = LowRank((u[:, :keep] * root).contiguous(), (root[:, None] * vh[:keep]).contiguous())
    residual = wide - factors.dense()
    norm = float(torch.linalg.matrix_norm(wide))
    error = float(torch.linalg.matrix_norm(residual)) / norm if norm > 0 else 0.0
    return Truncation(factors, residual, error)
