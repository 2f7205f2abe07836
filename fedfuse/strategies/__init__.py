"""Merge strategies: one small class per method, a monoid of sufficient statistics or (robust methods) spilled.

Every method satisfies :class:`MergeStrategy` (identity, one :class:`Capabilities` record, ``new_state``)
through one of two small bases: :class:`StatisticsStrategy` (a monoid of summed statistics) or
:class:`SpilledStrategy` (robust methods that keep every update on disk). Each declares its parameters,
capabilities and default sparsifier; presets such as ``dare_ties`` are data rows
(see :mod:`fedfuse.strategies.presets`).

>>> from fedfuse.strategies import build_strategy, method_spec
>>> [p.name for p in method_spec("ties").params]
['lam', 'vote']
>>> ties = build_strategy("ties", {"vote": "count"})
>>> state = ties.new_state()          # add(update, weight, fisher) → combine → finalize
"""

from fedfuse.strategies.base import (
    Capabilities,
    FinalizeContext,
    MergeState,
    MergeStrategy,
    StatisticsState,
    StatisticsStrategy,
    add_at,
    resolve_device,
)
from fedfuse.strategies.fedavg import FedAvg
from fedfuse.strategies.fisher import FisherMerge
from fedfuse.strategies.krum import Krum
from fedfuse.strategies.linear import Linear
from fedfuse.strategies.median import Median
from fedfuse.strategies.model_stock import ModelStock
from fedfuse.strategies.params import COMMON_PARAMS, Param, format_strategy_params, parse_strategy_params
from fedfuse.strategies.presets import BUILT_IN_PRESETS
from fedfuse.strategies.registry import (
    ENTRY_POINT_GROUP,
    available_strategies,
    build_strategy,
    get_strategy,
    method_spec,
    register_preset,
    register_strategy,
    strategy_class,
)
from fedfuse.strategies.regmean import RegMean
from fedfuse.strategies.slerp import Slerp
from fedfuse.strategies.spec import MethodSpec, Preset
from fedfuse.strategies.spilled import SpilledState, SpilledStrategy
from fedfuse.strategies.task_arithmetic import TaskArithmetic
from fedfuse.strategies.tiers import MergeTree, TreeLeaf, reduce_tree
from fedfuse.strategies.ties import Ties
from fedfuse.strategies.trimmed_mean import TrimmedMean

_CLASSES = (
    FedAvg,
    Linear,
    TaskArithmetic,
    Ties,
    ModelStock,
    FisherMerge,
    RegMean,
    Slerp,
    Median,
    TrimmedMean,
    Krum,
)
BUILT_IN_STRATEGIES: tuple[str, ...] = tuple(cls.name for cls in _CLASSES)
"""The strategy classes fedfuse ships (presets: :data:`BUILT_IN_PRESETS`)."""

for _cls in _CLASSES:
    register_strategy(_cls.name)(_cls)
for _preset in BUILT_IN_PRESETS:
    register_preset(_preset)

__all__ = [
    "BUILT_IN_PRESETS",
    "BUILT_IN_STRATEGIES",
    "COMMON_PARAMS",
    "ENTRY_POINT_GROUP",
    "Capabilities",
    "FedAvg",
    "FinalizeContext",
    "FisherMerge",
    "Krum",
    "Linear",
    "Median",
    "MergeState",
    "MergeStrategy",
    "MergeTree",
    "MethodSpec",
    "ModelStock",
    "Param",
    "Preset",
    "RegMean",
    "Slerp",
    "SpilledState",
    "SpilledStrategy",
    "StatisticsState",
    "StatisticsStrategy",
    "TaskArithmetic",
    "Ties",
    "TreeLeaf",
    "TrimmedMean",
    "add_at",
    "available_strategies",
    "build_strategy",
    "format_strategy_params",
    "get_strategy",
    "method_spec",
    "parse_strategy_params",
    "reduce_tree",
    "register_preset",
    "register_strategy",
    "resolve_device",
    "strategy_class",
]
