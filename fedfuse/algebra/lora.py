"""LoRA factors as task vectors: exact ΔW products, the naive factor average, SVD refactoring.

A LoRA module adds ΔW = s·B·A to a base weight (A: r×in, B: out×r, s = alpha/r). Averaging A and B
separately gives (Σ pₖBₖ)(Σ pₖAₖ), which is not Σ pₖBₖAₖ: the cross terms BⱼAₖ (j ≠ k) creep in.
fedfuse merges ΔWₖ itself; the naive average stays here as a named baseline.

Factors travel under ``"<module>.lora_A"`` / ``"<module>.lora_B"``; the ΔW of a module is merged
under the name of the base weight it changes, ``"<module>.weight"``. With a frozen A shared by every node
(:func:`frozen_lora_a`, FFA-LoRA) ΔWₖ = s·Bₖ·A, so a linear merge of the B's alone is the exact merged ΔW.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch

from fedfuse.algebra.low_rank import truncate
from fedfuse.algebra.seeds import derive_seed

LORA_A_SUFFIX = ".lora_A"
LORA_B_SUFFIX = ".lora_B"
FROZEN_A_TAG = "frozen-lora-A|"
"""Prefix of the module name in a frozen A's seed (:func:`frozen_lora_a`), apart from any DARE mask's."""


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = scale · B @ A in float32 (A: r×in, B: out×r)."""
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(
            f"LoRA factors do not chain: A is {tuple(lora_a.shape)}, B is {tuple(lora_b.shape)} "
            "(need B: out×r, A: r×in)"
        )
    return (lora_b.float() @ lora_a.float()).mul_(scale)


def frozen_lora_a(seed: int, round_number: int, module: str, shape: tuple[int, int]) -> torch.Tensor:
    """The A every node of round ``round_number`` shares for ``module`` (FFA-LoRA): float32, ``shape`` = (r, in).

    PEFT's lora_A init, kaiming-uniform with a = √5, i.e. U(−1/√in, 1/√in), drawn on the CPU from a generator
    seeded by (run seed, round, module), so every node and the server redraw the same matrix without sending it.
    Rows are drawn in order: a rank-rₖ node's A is the first rₖ rows of the run's rank-r A.
    """
    rank, fan_in = shape
    if rank < 1 or fan_in < 1:
        raise ValueError(f"a LoRA A needs rank >= 1 and fan-in >= 1; got shape {tuple(shape)}")
    generator = torch.Generator().manual_seed(derive_seed(seed, round_number, None, FROZEN_A_TAG + module))
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(rank, fan_in, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def factor_names(module: str) -> tuple[str, str]:
    """The wire names of a module's A and B factors."""
    return module + LORA_A_SUFFIX, module + LORA_B_SUFFIX


def lora_modules(names: Sequence[str]) -> list[str]:
    """The modules whose A and B factors are both among ``names`` (sorted); an unpaired factor is an error."""
    a_modules = {n[: -len(LORA_A_SUFFIX)] for n in names if n.endswith(LORA_A_SUFFIX)}
    b_modules = {n[: -len(LORA_B_SUFFIX)] for n in names if n.endswith(LORA_B_SUFFIX)}
    unpaired = sorted(a_modules ^ b_modules)
    if unpaired:
        raise ValueError(f"LoRA factors without their partner for modules: {', '.join(unpaired[:5])}")
    return sorted(a_modules)


def factors_to_deltas(tensors: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Replace every A/B pair by its ΔW under ``"<module>.weight"``; other tensors pass through."""
    modules = lora_modules(list(tensors))
    out: dict[str, torch.Tensor] = {}
    factor_keys: set[str] = set()
    for module in modules:
        a_name, b_name = factor_names(module)
        factor_keys.update((a_name, b_name))
        weight_name = module + ".weight"
        if weight_name in tensors:
            raise ValueError(f"{weight_name} arrives both as a tensor and as LoRA factors")
        out[weight_name] = lora_delta(tensors[a_name], tensors[b_name], scale)
    for name, tensor in tensors.items():
        if name not in factor_keys:
            out[name] = tensor
    return out


def pad_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r×in) and B (out×r) padded with zero rows of A and zero columns of B to rank ``rank`` ≥ r.

    B·A is unchanged (the padded terms are 0·0), so a rank-r pair can travel or be stored where a
    larger rank is expected.
    """
    have = lora_a.shape[0]
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_b.shape[1] != have:
        raise ValueError(f"LoRA factors do not chain: A is {tuple(lora_a.shape)}, B is {tuple(lora_b.shape)}")
    if rank < have:
        raise ValueError(f"cannot pad rank-{have} LoRA factors down to rank {rank}")
    if rank == have:
        return lora_a, lora_b
    padded_a = torch.cat([lora_a, lora_a.new_zeros(rank - have, lora_a.shape[1])], dim=0)
    padded_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], rank - have)], dim=1)
    return padded_a, padded_b


def naive_factor_average(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float], scale: float
) -> torch.Tensor:
    """The FedIT/FlowerTune baseline: ΔW = s·(Σ pₖBₖ)(Σ pₖAₖ) with pₖ = wₖ/Σw (cross terms included)."""
    if len(factors) != len(weights) or not factors:
        raise ValueError("need one weight per (A, B) pair and at least one pair")
    total = float(sum(weights))
    # factors is non-empty, so each sum is a tensor (never sum's start value 0)
    mean_a = cast(torch.Tensor, sum(w / total * a.float() for (a, _), w in zip(factors, weights, strict=False)))
    mean_b = cast(torch.Tensor, sum(w / total * b.float() for (_, b), w in zip(factors, weights, strict=False)))
    return lora_delta(mean_a, mean_b, scale)


@dataclass(frozen=True)
class Refactored:
    """A rank-``rank`` form B·A of a matrix and its relative Frobenius error ‖ΔW − BA‖/‖ΔW‖."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    rank: int
    relative_error: float


def svd_refactor(delta: torch.Tensor, rank: int) -> Refactored:
    """Best rank-``rank`` factors of ``delta`` (truncated SVD, singular values split evenly over B and A)."""
    truncation = truncate(delta, rank)
    factors = truncation.factors
    return Refactored(factors.a, factors.b, factors.rank, truncation.relative_error)
