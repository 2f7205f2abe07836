"""Coefficients learned by gradient descent: Adam on c (K×G), offline (AdaMerging) or from institutions' gradients.

:class:`CoefficientOptimizer` is the one step rule: the offline loop (:func:`learn`) and the federated server
(which receives each institution's gradient instead of computing it) both use it, so a federation that sends
the gradients of the same rows takes the same steps as a central run (up to float summation order).
Each step's gradient is the scored-position-weighted mean of the parts' gradients — what one objective over
all the rows together would give.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fedfuse.automerge.coefficients import CoefficientModel
from fedfuse.automerge.objectives import Rows, value_and_gradient


@dataclass
class CoefficientOptimizer:
    """Adam on K×G coefficients, each kept within ``[lower, upper]`` after a step."""

    coefficients: torch.Tensor
    learning_rate: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lower: float = 0.0
    upper: float = 2.0
    steps: int = 0
    _m: torch.Tensor = field(init=False)
    _v: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if self.learning_rate <= 0 or self.lower >= self.upper:
            raise ValueError(
                f"need a positive learning rate and lower < upper, got {self.learning_rate}, "
                f"[{self.lower}, {self.upper}]"
            )
        self.coefficients = self.coefficients.detach().double().clamp(self.lower, self.upper)
        self._m = torch.zeros_like(self.coefficients)
        self._v = torch.zeros_like(self.coefficients)

    def step(self, gradient: torch.Tensor) -> torch.Tensor:
        """One Adam step on ``gradient`` (same shape as the coefficients); the new coefficients."""
        g = torch.as_tensor(gradient, dtype=torch.float64)
        if g.shape != self.coefficients.shape or not torch.isfinite(g).all():
            raise ValueError(f"a gradient must be finite and {tuple(self.coefficients.shape)}, got {tuple(g.shape)}")
        self.steps += 1
        beta1, beta2 = self.betas
        self._m = beta1 * self._m + (1 - beta1) * g
        self._v = beta2 * self._v + (1 - beta2) * g * g
        m_hat = self._m / (1 - beta1**self.steps)
        v_hat = self._v / (1 - beta2**self.steps)
        self.coefficients = (self.coefficients - self.learning_rate * m_hat / (v_hat.sqrt() + self.eps)).clamp(
            self.lower, self.upper
        )
        return self.coefficients.clone()


def combine_gradients(parts: Sequence[tuple[float, torch.Tensor, int]]) -> tuple[float, torch.Tensor, int]:
    """(value, gradient, count) of parts → their count-weighted means and the total count."""
    total = sum(count for _, _, count in parts)
    if total <= 0:
        raise ValueError("no part scored any position")
    value = sum(v * n for v, _, n in parts) / total
    gradient = sum((g.double() * n for _, g, n in parts), torch.zeros_like(parts[0][1], dtype=torch.float64))
    return value, gradient / total, total


@dataclass(frozen=True)
class LearnedCoefficients:
    """The coefficients after the last step and each step's objective value (before that step)."""

    coefficients: torch.Tensor
    history: list[float]


def learn(
    model: CoefficientModel,
    parts: Sequence[Rows],
    initial: torch.Tensor,
    *,
    steps: int,
    objective: str,
    learning_rate: float = 0.05,
    bounds: tuple[float, float] = (0.0, 2.0),
    batch_size: int = 8,
    on_step: Callable[[int, float], None] | None = None,
) -> LearnedCoefficients:
    """``steps`` Adam steps on the objective over ``parts`` (rows kept apart, as institutions keep them)."""
    optimizer = CoefficientOptimizer(model.candidates.check(initial), learning_rate, lower=bounds[0], upper=bounds[1])
    history: list[float] = []
    for step in range(steps):
        c = optimizer.coefficients.to(torch.float32)
        value, gradient, _ = combine_gradients(
            [value_and_gradient(model, c, rows, objective, batch_size) for rows in parts]
        )
        history.append(value)
        if on_step is not None:
            on_step(step, value)
        optimizer.step(gradient)
    return LearnedCoefficients(optimizer.coefficients.to(torch.float32), history)
