"""Server optimizers on the merged task vector: FedAvgM, FedAdam, FedYogi (Reddi et al. 2021). Pure, no I/O.

Whatever strategy merged the round, its task vector Δₜ (after λ) is the pseudo-gradient: the direction
the clients moved the global model. A server optimizer replaces "add Δₜ" by one step of its own,
tensor by tensor (all operations element-wise)::

    FedAvgM  mₜ = β₁·mₜ₋₁ + Δₜ                                       xₜ₊₁ = xₜ + η·mₜ
    FedAdam  mₜ = β₁·mₜ₋₁ + (1 − β₁)·Δₜ,  vₜ = β₂·vₜ₋₁ + (1 − β₂)·Δₜ²    xₜ₊₁ = xₜ + η·mₜ / (√vₜ + τ)
    FedYogi  mₜ as FedAdam,  vₜ = vₜ₋₁ − (1 − β₂)·Δₜ²·sign(vₜ₋₁ − Δₜ²)     xₜ₊₁ = xₜ + η·mₜ / (√vₜ + τ)

with m₋₁ = v₋₁ = 0 and no bias correction, as in Algorithm 2 of "Adaptive Federated Optimization"
(Reddi et al., ICLR 2021) and Flower's ``FedYogi``/``FedAvgM`` (``flwr/serverapp/strategy/fedyogi.py``,
``fedopt.py``, ``fedavgm.py``). Flower's ``FedAdam`` alone multiplies η by √(1 − β₂ᵗ⁺¹)/(1 − β₁ᵗ⁺¹)
(``fedadam.py``); fedfuse follows the paper unless a rule asks for that ``bias_correction`` (``FedMerge``
does when it is given Flower's strategy name ``fedadam``). FedAvgM with β₁ = 0 and η = 1 is plain merging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

ServerOptimizerName = Literal["none", "fedavgm", "fedadam", "fedyogi"]
SERVER_OPTIMIZERS: tuple[str, ...] = ("none", "fedavgm", "fedadam", "fedyogi")
ADAPTIVE_OPTIMIZERS: tuple[str, ...] = ("fedadam", "fedyogi")
"""The optimizers with a second moment v (and so β₂ and τ)."""
DEFAULT_SERVER_LR: dict[str, float] = {"none": 1.0, "fedavgm": 1.0, "fedadam": 0.1, "fedyogi": 0.01}
"""η when the run does not set one: Flower's defaults for ``FedAvgM``, ``FedAdam`` and ``FedYogi``."""


@dataclass(frozen=True)
class ServerOptimizerRule:
    """One server optimizer and its hyperparameters.

    Parameters
    ----------
    name : {"fedavgm", "fedadam", "fedyogi"}
        The update rule.
    lr : float
        η, the server learning rate (> 0).
    momentum : float
        β₁ in [0, 1): FedAvgM's momentum, FedAdam's and FedYogi's first-moment decay.
    beta2 : float
        β₂ in [0, 1): the second-moment decay (FedAdam, FedYogi).
    tau : float
        τ > 0: the adaptivity, added to √v in the denominator (FedAdam, FedYogi).
    bias_correction : bool
        Scale η by √(1 − β₂ʳ⁺¹)/(1 − β₁ʳ⁺¹) in server round r, as Flower's ``FedAdam`` does (adaptive rules).
    """

    name: str
    lr: float
    momentum: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    bias_correction: bool = False

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS[1:]:
            raise ValueError(f"server optimizer must be one of {', '.join(SERVER_OPTIMIZERS[1:])}; got {self.name!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"server learning rate must be > 0; got {self.lr}")
        for label, value in (("momentum", self.momentum), ("beta2", self.beta2)):
            if not (math.isfinite(value) and 0.0 <= value < 1.0):
                raise ValueError(f"server {label} must be in [0, 1); got {value}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"server tau must be > 0; got {self.tau}")

    @property
    def adaptive(self) -> bool:
        """Whether the rule keeps a second moment v (FedAdam, FedYogi)."""
        return self.name in ADAPTIVE_OPTIMIZERS


def state_dtype(delta: torch.Tensor) -> torch.dtype:
    """The dtype m and v are kept in for a pseudo-gradient: at least float32 (float64 stays float64)."""
    return torch.promote_types(delta.dtype, torch.float32)


def first_moment(delta: torch.Tensor, m: torch.Tensor | None, rule: ServerOptimizerRule) -> torch.Tensor:
    """mₜ: β₁·mₜ₋₁ + Δₜ (FedAvgM) or β₁·mₜ₋₁ + (1 − β₁)·Δₜ (FedAdam, FedYogi); mₜ₋₁ = None is 0."""
    delta = delta.to(state_dtype(delta))
    previous = torch.zeros_like(delta) if m is None else m.to(delta)
    if rule.adaptive:
        return rule.momentum * previous + (1.0 - rule.momentum) * delta
    return rule.momentum * previous + delta


def second_moment(delta: torch.Tensor, v: torch.Tensor | None, rule: ServerOptimizerRule) -> torch.Tensor:
    """vₜ: β₂·vₜ₋₁ + (1 − β₂)·Δₜ² (FedAdam) or vₜ₋₁ − (1 − β₂)·Δₜ²·sign(vₜ₋₁ − Δₜ²) (FedYogi)."""
    delta = delta.to(state_dtype(delta))
    previous = torch.zeros_like(delta) if v is None else v.to(delta)
    squared = delta**2
    if rule.name == "fedyogi":
        return previous - (1.0 - rule.beta2) * squared * torch.sign(previous - squared)
    return rule.beta2 * previous + (1.0 - rule.beta2) * squared


def server_step(
    delta: torch.Tensor,
    m: torch.Tensor | None,
    v: torch.Tensor | None,
    rule: ServerOptimizerRule,
    server_round: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One tensor's step: (the change to add to the weights, mₜ, vₜ); vₜ is None for FedAvgM.

    Parameters
    ----------
    delta : Tensor
        Δₜ, this tensor's merged task vector (the pseudo-gradient).
    m, v : Tensor or None
        mₜ₋₁ and vₜ₋₁ (None: zeros, the first step).
    rule : ServerOptimizerRule
        The optimizer and its hyperparameters.
    server_round : int
        The round being stepped (only a ``bias_correction`` rule reads it).

    Returns
    -------
    tuple of Tensor
        η·mₜ (FedAvgM) or η·mₜ/(√vₜ + τ) (FedAdam, FedYogi), then mₜ and vₜ.
    """
    m_t = first_moment(delta, m, rule)
    if not rule.adaptive:
        return rule.lr * m_t, m_t, None
    v_t = second_moment(delta, v, rule)
    lr = rule.lr
    if rule.bias_correction:
        lr *= math.sqrt(1.0 - rule.beta2 ** (server_round + 1)) / (1.0 - rule.momentum ** (server_round + 1))
    return lr * m_t / (torch.sqrt(v_t) + rule.tau), m_t, v_t
