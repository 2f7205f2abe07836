"""Robust aggregation as pure functions: norm clipping, coordinate-wise median and trimmed mean, Krum.

Rows are updates (one row per client, one column per parameter entry). The coordinate-wise functions
work on any column slice, so a caller can merge a model chunk by chunk; Krum needs the pairwise
distances of whole updates, which :func:`pairwise_sq_distances` gets from a Gram matrix summed over
chunks. Sorting makes the coordinate-wise results independent of the order of the rows.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from fedfuse.algebra.low_rank import FactoredUpdate, LowRank, frobenius_norm
from fedfuse.algebra.sparse import SparseTensor


def update_norm(update: FactoredUpdate) -> float:
    """The Euclidean norm of a whole update (all its tensors; a sparse tensor's kept values; B·A from its factors)."""
    total = 0.0
    for tensor in update.values():
        if isinstance(tensor, LowRank):
            total += frobenius_norm(tensor) ** 2
            continue
        values = tensor.values if isinstance(tensor, SparseTensor) else tensor
        total += float(values.double().square().sum())
    return math.sqrt(total)


def scale_update(update: FactoredUpdate, factor: float) -> dict[str, torch.Tensor | SparseTensor | LowRank]:
    """``factor`` × every tensor of ``update`` (sparse tensors keep their support and DARE seed)."""
    scaled: dict[str, torch.Tensor | SparseTensor | LowRank] = {}
    for name, tensor in update.items():
        if isinstance(tensor, SparseTensor):
            scaled[name] = replace(tensor, values=tensor.values * factor)
        elif isinstance(tensor, LowRank):
            scaled[name] = tensor.scaled(factor)
        else:
            scaled[name] = tensor * factor
    return scaled


def clip_factor(norm: float, max_norm: float) -> float:
    """min(1, C/‖τ‖): the factor that brings an update of norm ``norm`` to at most ``max_norm``."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    return 1.0 if norm <= max_norm else max_norm / norm


def trim_per_side(count: int, trim: float) -> int:
    """Rows dropped at each end by a trimmed mean of ``count`` rows: ⌊trim·count⌋, leaving at least one."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    return min(math.floor(trim * count), (count - 1) // 2)


def coordinate_median(rows: torch.Tensor) -> torch.Tensor:
    """The median of each column (the mean of the two middle values for an even number of rows)."""
    ordered = rows.sort(dim=0).values
    count = rows.shape[0]
    middle = count // 2
    if count % 2:
        return ordered[middle].clone()
    return (ordered[middle - 1] + ordered[middle]) / 2


def trimmed_mean(rows: torch.Tensor, trim: float) -> torch.Tensor:
    """The mean of each column after dropping its ⌊trim·K⌋ smallest and largest values (Yin et al.)."""
    count = rows.shape[0]
    cut = trim_per_side(count, trim)
    ordered = rows.sort(dim=0).values
    return ordered[cut : count - cut].mean(dim=0)


def pairwise_sq_distances(gram: torch.Tensor) -> torch.Tensor:
    """‖xᵢ − xⱼ‖² for every pair of rows from their Gram matrix G = X·Xᵀ (clamped at 0 against rounding)."""
    diagonal = gram.diagonal()
    return (diagonal[:, None] + diagonal[None, :] - 2 * gram).clamp_min_(0)


def krum_scores(sq_distances: torch.Tensor, byzantine: int) -> torch.Tensor:
    """Krum's score of each row: the sum of its squared distances to its K − f − 2 nearest other rows.

    With too few rows for ``byzantine`` = f (K ≤ f + 2) the nearest one other row counts, so a round
    with few replies still merges; a single row scores 0.
    """
    count = sq_distances.shape[0]
    if byzantine < 0:
        raise ValueError(f"byzantine must be >= 0, got {byzantine}")
    if count == 1:
        return torch.zeros(1, dtype=sq_distances.dtype)
    neighbours = max(1, count - byzantine - 2)
    others = sq_distances + torch.diag(torch.full((count,), math.inf, dtype=sq_distances.dtype))
    return others.sort(dim=1).values[:, :neighbours].sum(dim=1)


def krum_selection(sq_distances: torch.Tensor, byzantine: int, select: int) -> torch.Tensor:
    """Mixing coefficients of the rows (multi-)Krum keeps: 1/m on the m best-scored rows, 0 elsewhere.

    ``select`` = m: 1 is Krum, m > 1 multi-Krum, 0 means K − f (multi-Krum's usual choice); m is
    capped at K. Ties in score go to the earlier row.
    """
    count = sq_distances.shape[0]
    if select < 0:
        raise ValueError(f"select must be >= 0, got {select}")
    keep = min(count, select if select else max(1, count - byzantine))
    scores = krum_scores(sq_distances, byzantine)
    chosen = torch.sort(scores, stable=True).indices[:keep]
    coefficients = torch.zeros(count, dtype=torch.float64)
    coefficients[chosen] = 1.0 / keep
    return coefficients
