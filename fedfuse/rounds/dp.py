"""Client-level differential privacy: the Gaussian mechanism on clipped updates and its accounting.

Central DP (the server clips each update to C and noises the merge) and local DP (each client clips
and noises its own update) share the pieces here: the noise's scale on the merged output, the seed
of the noise (the operating system's randomness unless a test fixes it), the support noise goes on
(all entries, or the round's public DARE mask), and the privacy spent, accounted by Opacus's RDP
accountant — never by a hand-written formula.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from fedfuse.algebra import dare_indices, derive_seed
from fedfuse.algebra.noise import add_gaussian_noise
from fedfuse.rounds.space import UpdateSpace
from fedfuse.strategies import FedAvg, MergeStrategy, TaskArithmetic


@dataclass(frozen=True)
class CentralDP:
    """Central DP's mechanism: clip every update to ``clip_norm`` = C, add N(0, σ²C²) to the clipped sum.

    ``noise_seed`` < 0 draws the noise from the operating system's randomness (as DP needs); a test may fix it.
    """

    clip_norm: float
    noise_multiplier: float
    noise_seed: int = -1

    def __post_init__(self) -> None:
        if not (self.clip_norm > 0 and self.noise_multiplier >= 0):
            raise ValueError(
                f"central DP needs clip norm > 0 and noise multiplier >= 0; got {self.clip_norm}, "
                f"{self.noise_multiplier}"
            )


def central_noise_std(dp: CentralDP, strategy: MergeStrategy, expected_updates: int) -> float:
    """Standard deviation of the central-DP noise on each merged entry.

    The Gaussian mechanism adds N(0, σ²C²) to the sum of clipped updates; FedAvg divides that sum by
    the number of sampled clients (Flower's convention), task arithmetic keeps it; λ scales both.
    """
    std = dp.noise_multiplier * dp.clip_norm * strategy.lam
    if isinstance(strategy, FedAvg):
        return std / max(1, expected_updates)
    if isinstance(strategy, TaskArithmetic):
        return std
    raise ValueError(f"strategy {strategy.name!r} cannot run with differential privacy")


def noise_generator(seed: int, round_number: int, scope: str) -> torch.Generator:
    """The noise's generator: seeded from the OS (as DP needs) unless ``seed`` >= 0 fixes it for a test."""
    if seed < 0:
        return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return torch.Generator().manual_seed(derive_seed(seed, round_number, scope, "dp-noise"))


def public_support(space: UpdateSpace, round_number: int, name: str, numel: int) -> torch.Tensor | None:
    """The entries a DP merge may change: the round's DARE mask (public: it comes from the run seed), or all."""
    sparsifier = space.sparsifier
    if sparsifier.kind != "dare":
        return None
    return dare_indices(numel, sparsifier.density, derive_seed(space.seed, round_number, None, name))


SupportFn = Callable[[str, int], torch.Tensor | None]
"""``support(name, numel)``: the flat indices noise goes on, or None for every entry."""


def noised(
    tensors: Mapping[str, torch.Tensor], std: float, generator: torch.Generator, support: SupportFn
) -> dict[str, torch.Tensor]:
    """``tensors`` + N(0, std²) on each one's public support (every entry when it has none), in name order."""
    out = {}
    for name in sorted(tensors):
        tensor = tensors[name]
        kept = support(name, tensor.numel())
        if kept is None:
            out[name] = add_gaussian_noise(tensor, std, generator)
            continue
        flat = tensor.reshape(-1).clone()
        index = kept.to(flat.device)
        flat[index] = add_gaussian_noise(flat[index], std, generator)
        out[name] = flat.reshape(tensor.shape)
    return {name: out[name] for name in tensors}


@dataclass
class PrivacyAccountant:
    """(ε, δ) spent so far, from Opacus's RDP accountant; its history is saved with the checkpoint.

    Central DP steps once per round with the sampling rate sampled/available clients; local DP counts
    each client's own releases (rate 1: the server sees every one), so ε is a client's worst case.
    Opacus's amplification by sampling assumes Poisson sampling; fedfuse samples a fixed number of
    clients per round, as Flower and Opacus users usually do.
    """

    noise_multiplier: float
    delta: float
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def step(self, sample_rate: float) -> float:
        """Account one round at ``sample_rate`` and return ε at ``delta`` so far."""
        self.history.append((self.noise_multiplier, float(sample_rate), 1))
        return self.epsilon()

    def epsilon(self) -> float:
        """ε at ``delta`` for the rounds accounted so far (0 before any)."""
        if not self.history:
            return 0.0
        from opacus.accountants import RDPAccountant  # imported on use: Opacus costs seconds at start-up

        accountant = RDPAccountant()
        accountant.history = _runs_of_equal_steps(self.history)
        return float(accountant.get_epsilon(delta=self.delta))


def _runs_of_equal_steps(history: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Consecutive entries of equal (σ, rate) as one, counts summed: what Opacus's own ``step`` keeps.

    The RDP of a run of equal steps is computed once (times its count) instead of once per round.
    """
    merged: list[tuple[float, float, int]] = []
    for sigma, rate, count in history:
        if merged and merged[-1][:2] == (sigma, rate):
            merged[-1] = (sigma, rate, merged[-1][2] + int(count))
        else:
            merged.append((sigma, rate, int(count)))
    return merged


@dataclass(frozen=True)
class CentralPrivacy:
    """Central DP for one round: Gaussian noise on the merged task vector, scaled for the sampled clients.

    ``expected_updates`` is the number of clients sampled (Flower divides by it); when unknown, the
    number of accepted updates is used.
    """

    dp: CentralDP
    strategy: MergeStrategy
    space: UpdateSpace
    round_number: int
    expected_updates: int | None = None

    def apply(self, merged: Mapping[str, torch.Tensor], accepted: int) -> dict[str, torch.Tensor]:
        """``merged`` with the round's noise on each tensor's public support."""
        std = central_noise_std(self.dp, self.strategy, self.expected_updates or accepted)
        generator = noise_generator(self.dp.noise_seed, self.round_number, "central")
        return noised(
            merged, std, generator, lambda name, numel: public_support(self.space, self.round_number, name, numel)
        )
