"""The top server's optimizer state across rounds: m and v per tensor and the step count.

:class:`ServerOptimizer` turns each round's merged task vector Δₜ (the pseudo-gradient, whatever the
strategy) into the change applied to the global model, with the update rules of
:mod:`fedfuse.algebra.server_optim` (FedAvgM, FedAdam, FedYogi). ``server-optimizer = "none"`` calls
:meth:`RoundEngine.merged_factored` unchanged, so such a run is bit for bit what it was without this class.
Only the top server holds one: tier gateways forward partial states and never finalize. Its state goes
into the round's checkpoint (:meth:`state_tensors`) and back (:meth:`load_state`), so a resumed run
steps exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedfuse.algebra import UpdateTensor, apply_task_vector, to_dense
from fedfuse.algebra.low_rank import LowRank, densified
from fedfuse.algebra.server_optim import ServerOptimizerRule, server_step
from fedfuse.rounds.engine import RoundEngine

MOMENT_SEPARATOR = "::"
"""State tensors are named ``<parameter>::m`` and ``<parameter>::v``."""


class ServerOptimizer:
    """A server optimizer's state, stepped once per round that accepted an update.

    Parameters
    ----------
    rule : ServerOptimizerRule or None
        The update rule and its hyperparameters; None for plain merging (``server-optimizer = "none"``).
    """

    def __init__(self, rule: ServerOptimizerRule | None = None) -> None:
        self.rule = rule
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.steps = 0
        """Rounds stepped so far (t + 1 after step t)."""

    @property
    def enabled(self) -> bool:
        """Whether the merged task vector goes through an optimizer (not ``none``)."""
        return self.rule is not None

    def step(self, delta: Mapping[str, UpdateTensor], server_round: int | None = None) -> dict[str, torch.Tensor]:
        """The change to add to the round's weights for the merged task vector ``delta``; updates m, v, steps.

        ``server_round`` (default: the steps taken + 1) matters only to a rule with bias correction.

        A tensor the optimizer knows but ``delta`` lacks steps with Δ = 0 (its momentum still moves it).
        """
        if self.rule is None:
            return {name: to_dense(t) for name, t in delta.items()}
        change: dict[str, torch.Tensor] = {}
        rounds = self.steps + 1 if server_round is None else server_round
        for name in list(delta) + [name for name in self.m if name not in delta]:
            given = delta.get(name)
            dense = torch.zeros_like(self.m[name]) if given is None else to_dense(given)
            change[name], self.m[name], v_t = server_step(dense, self.m.get(name), self.v.get(name), self.rule, rounds)
            if v_t is not None:
                self.v[name] = v_t
        self.steps += 1
        return change

    def round_change(self, engine: RoundEngine) -> dict[str, torch.Tensor | LowRank] | None:
        """The change a finished round makes to the weights (None if it accepted nothing: no step).

        Without a rule it is the merged task vector, low-rank matrices still as factors; with one, the
        rule's step on the (dense) merged task vector.
        """
        if not engine.contributions:
            return None
        if self.rule is None:
            return engine.merged_factored()
        return dict(self.step(engine.merged_task_vector(), engine.round_number))

    def apply(self, engine: RoundEngine, round_weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The next round's weights from a finished round's engine; None if it accepted nothing (no step)."""
        change = self.round_change(engine)
        return None if change is None else apply_task_vector(dict(round_weights), densified(change))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """m and v as ``<parameter>::m`` / ``<parameter>::v`` tensors (what the checkpoint stores)."""
        tensors = {f"{name}{MOMENT_SEPARATOR}m": t for name, t in self.m.items()}
        tensors.update({f"{name}{MOMENT_SEPARATOR}v": t for name, t in self.v.items()})
        return tensors

    def load_state(self, tensors: Mapping[str, torch.Tensor], steps: int) -> None:
        """Continue from :meth:`state_tensors` and ``steps`` of a checkpoint (ValueError for a foreign name)."""
        m: dict[str, torch.Tensor] = {}
        v: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            name, _, moment = key.rpartition(MOMENT_SEPARATOR)
            wanted = () if self.rule is None else ("m", "v") if self.rule.adaptive else ("m",)
            if not name or moment not in wanted:
                raise ValueError(f"server optimizer state has an unexpected tensor {key!r}")
            (m if moment == "m" else v)[name] = tensor
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"server optimizer steps must be an integer >= 0; got {steps!r}")
        self.m, self.v, self.steps = m, v, steps

    def describe(self) -> dict[str, Any]:
        """What ``report.json`` records: the optimizer, its hyperparameters and the steps taken."""
        if self.rule is None:
            return {"name": "none"}
        described: dict[str, Any] = {"name": self.rule.name, "lr": self.rule.lr, "momentum": self.rule.momentum}
        if self.rule.adaptive:
            described.update(beta2=self.rule.beta2, tau=self.rule.tau)
        described["steps"] = self.steps
        return described
