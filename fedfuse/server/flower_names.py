"""Flower's strategy names and constructor arguments, read as fedfuse's (``FedMerge`` accepts both).

A Flower user switching ``FedTrimmedAvg(beta=0.2)`` to ``FedMerge("fedtrimmedavg", beta=0.2)`` or
``FedAdam(eta=0.1, tau=1e-9)`` to ``FedMerge("fedadam", eta=0.1, tau=1e-9)`` keeps the arguments and
their defaults: each Flower name maps to one fedfuse method parameter or server-optimizer field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedfuse.algebra.server_optim import DEFAULT_SERVER_LR, ServerOptimizerRule

STRATEGY_ALIASES = {"fedmedian": "median", "fedtrimmedavg": "trimmed_mean", "multikrum": "multi_krum"}
"""Flower strategy names that are a fedfuse method under another name."""

OPTIMIZER_STRATEGIES = ("fedavgm", "fedadam", "fedyogi")
"""Flower strategies that are FedAvg followed by a server optimizer of the same name."""

FLOWER_OPTIMIZER_DEFAULTS: dict[str, dict[str, float]] = {
    "fedavgm": {"lr": 1.0, "momentum": 0.0},
    "fedadam": {"lr": 0.1, "momentum": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"lr": 0.01, "momentum": 0.9, "beta2": 0.99, "tau": 1e-3},
}
"""Flower's constructor defaults, used when a Flower strategy name picks the optimizer."""

FEDFUSE_OPTIMIZER_DEFAULTS: dict[str, float] = {"momentum": 0.9, "beta2": 0.99, "tau": 1e-3}
"""The run config's defaults (``server-momentum``, ``server-beta2``, ``server-tau``)."""

OPTIMIZER_ARGUMENTS = {
    "server_lr": "lr",
    "server_learning_rate": "lr",
    "eta": "lr",
    "server_momentum": "momentum",
    "beta_1": "momentum",
    "server_beta2": "beta2",
    "beta_2": "beta2",
    "server_tau": "tau",
    "tau": "tau",
}
"""Server-optimizer arguments, fedfuse's and Flower's, → the rule's field."""

IGNORED_ARGUMENTS = ("eta_l",)
"""Flower arguments that configure the clients, not the merge (FedOpt's client learning rate)."""

METHOD_ARGUMENTS = {"beta": "trim", "num_malicious_nodes": "byzantine", "num_nodes_to_select": "select"}
"""Flower method arguments → the fedfuse method parameter of the same meaning."""


@dataclass(frozen=True)
class MergeArguments:
    """A ``FedMerge`` call's method and server optimizer, in fedfuse's terms."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    optimizer: ServerOptimizerRule | None = None


def merge_arguments(strategy: str, server_optimizer: str, arguments: Mapping[str, Any]) -> MergeArguments:
    """Read a strategy name and keyword arguments, fedfuse's or Flower's, as one method and optimizer.

    Raises ``ValueError`` in one line for an optimizer argument without an optimizer, or for a Flower
    strategy name combined with another ``server_optimizer``.
    """
    method = STRATEGY_ALIASES.get(strategy, strategy)
    optimizer_name, defaults = server_optimizer, dict(FEDFUSE_OPTIMIZER_DEFAULTS)
    flower_rule = False
    if method in OPTIMIZER_STRATEGIES:
        if server_optimizer not in ("none", method):
            raise ValueError(
                f"strategy {strategy!r} is FedAvg with server optimizer {method!r}; got {server_optimizer!r}"
            )
        optimizer_name, defaults, method = method, dict(FLOWER_OPTIMIZER_DEFAULTS[method]), "fedavg"
        flower_rule = True
    rule_fields: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for name, value in arguments.items():
        if name in IGNORED_ARGUMENTS:
            continue
        if name in OPTIMIZER_ARGUMENTS:
            if value is not None:
                rule_fields[OPTIMIZER_ARGUMENTS[name]] = float(value)
            continue
        params[METHOD_ARGUMENTS.get(name, name)] = value
    if method == "multi_krum" and "select" in params:  # Flower's MultiKrum(num_nodes_to_select=m) is Krum's m
        method = "krum"
    if flower_rule and optimizer_name == "fedadam":  # Flower's FedAdam corrects η for the moments' bias
        rule_fields["bias_correction"] = True
    return MergeArguments(method, params, _optimizer_rule(optimizer_name, defaults, rule_fields))


def _optimizer_rule(name: str, defaults: dict[str, float], given: dict[str, Any]) -> ServerOptimizerRule | None:
    """The server optimizer's rule, or None for ``none`` (refusing arguments that it would ignore)."""
    if name == "none":
        if given:
            raise ValueError(f"{', '.join(sorted(given))} set for no server optimizer: pass server_optimizer=")
        return None
    values: dict[str, Any] = {"lr": DEFAULT_SERVER_LR.get(name, 1.0), **defaults, **given}
    return ServerOptimizerRule(name, values.pop("lr"), **values)
