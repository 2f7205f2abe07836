"""Merge strategies: one small class per method, each a monoid of sufficient statistics.

>>> from fedfuse.strategies import get_strategy
>>> ties = get_strategy("ties", lam=1.0)
>>> state = ties.new_state()          # add(update, weight, fisher) → combine → finalize
"""

from fedfuse.strategies.base import MergeState, MergeStrategy, add_at, resolve_device
from fedfuse.strategies.fedavg import FedAvg
from fedfuse.strategies.fisher import FisherMerge
from fedfuse.strategies.registry import (
    ENTRY_POINT_GROUP,
    available_strategies,
    get_strategy,
    register_strategy,
    strategy_class,
)
from fedfuse.strategies.task_arithmetic import DareLinear, TaskArithmetic
from fedfuse.strategies.ties import DareTies, Ties
from fedfuse.strategies.tiers import Contribution, MergeTree, reduce_tree

for _cls in (FedAvg, TaskArithmetic, FisherMerge, Ties, DareLinear, DareTies):
    register_strategy(_cls.name)(_cls)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Contribution",
    "DareLinear",
    "DareTies",
    "FedAvg",
    "FisherMerge",
    "MergeState",
    "MergeStrategy",
    "MergeTree",
    "TaskArithmetic",
    "Ties",
    "add_at",
    "available_strategies",
    "get_strategy",
    "reduce_tree",
    "register_strategy",
    "resolve_device",
    "strategy_class",
]
