"""RegMean's closed form (Jin et al., 2023): merge linear layers so each keeps its inputs' outputs.

For a linear layer y = W·x, RegMean picks the W minimising Σₖ ‖Xₖ·Wᵀ − Xₖ·Wₖᵀ‖², Xₖ the inputs
model k saw. With Gram matrices Gₖ = XₖᵀXₖ (in × in) the answer is W = (Σ Wₖ·Gₖ)(Σ Gₖ)⁻¹; in task
vectors (Wₖ = W_base + τₖ) the same holds for τ. Both sums are additive, so the merge is a monoid:
clients, tiers and files add Σ wₖ·τₖ·G̃ₖ and Σ wₖ·G̃ₖ, and one solve finalizes.

G̃ = α·G + (1 − α)·diag(G) is the paper's regularizer: off-diagonal entries shrink by α, which
keeps Σ G̃ well conditioned (α = 0 is a per-input-feature weighted average, α = 1 plain RegMean).
"""

from __future__ import annotations

from typing import Any

import torch

from fedfuse.algebra.sparse import SparseTensor


def reduce_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·G + (1 − α)·diag(G): the off-diagonal entries of a square Gram matrix scaled by ``alpha``."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"a Gram matrix must be square, got shape {tuple(gram.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 1.0:
        return gram
    return gram * alpha + torch.diag_embed(torch.diagonal(gram) * (1.0 - alpha))


def gram_of(inputs: torch.Tensor) -> torch.Tensor:
    """XᵀX of a batch of inputs (rows are examples or tokens; the last dimension is the layer's input)."""
    rows = inputs.reshape(-1, inputs.shape[-1])
    return rows.T @ rows


def regmean_solve(weighted: torch.Tensor, gram_sum: torch.Tensor) -> torch.Tensor:
    """τ = (Σ τₖ·G̃ₖ)·(Σ G̃ₖ)⁻¹ for one layer: ``weighted`` is out × in, ``gram_sum`` in × in.

    A singular Σ G̃ (an input feature no client ever saw) falls back to the pseudo-inverse, so such a
    feature's column merges to 0 instead of failing.
    """
    solution, info = torch.linalg.solve_ex(gram_sum, weighted.T)
    if int(info) == 0 and bool(torch.isfinite(solution).all()):
        return solution.T
    return weighted @ torch.linalg.pinv(gram_sum, hermitian=True)


def check_gram(name: str, gram: Any, tensor: torch.Tensor | SparseTensor | None) -> None:
    """A Gram matrix must belong to a 2-D tensor of the update, be in × in for its last dimension, and finite."""
    if tensor is None:
        raise ValueError(f"Gram matrix names a tensor the update lacks: {name!r}")
    if len(tensor.shape) != 2:
        raise ValueError(f"tensor {name!r}: a Gram matrix needs a 2-D weight, got shape {tuple(tensor.shape)}")
    size = tensor.shape[-1]
    if not isinstance(gram, torch.Tensor) or not gram.is_floating_point() or tuple(gram.shape) != (size, size):
        shape = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
        raise ValueError(f"tensor {name!r}: its Gram matrix must be a float {size} × {size} tensor, got {shape}")
    if not bool(torch.isfinite(gram).all()):
        raise ValueError(f"tensor {name!r}: its Gram matrix has NaN or infinite entries")
    if gram.numel() and float(torch.diagonal(gram).min()) < 0:
        raise ValueError(f"tensor {name!r}: its Gram matrix has a negative diagonal (not XᵀX)")
