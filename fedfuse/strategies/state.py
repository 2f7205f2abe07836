"""Merge states: what a method has folded so far.

:class:`MergeState` is the contract every state satisfies (add, combine, finalize, serialize — the last
two refused by a state that is not a monoid). :class:`StatisticsState` is the monoid one: the summed
sufficient statistics, where updates are checked (all-or-nothing), accumulated, combined with other
states (tiers, gateways, files), finalized and serialized; :class:`FinalizeContext` is what a method
may read beyond its statistics when it finalizes one parameter. The spilled (robust) state is
:class:`fedfuse.strategies.spilled.SpilledState`.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedfuse.algebra.regmean import check_gram
from fedfuse.algebra.sparse import SparseTensor, Update, fisher_on_support

if TYPE_CHECKING:
    from fedfuse.strategies.base import StatisticsStrategy
    from fedfuse.strategies.contract import MergeStrategy

STAT_SEPARATOR = "::"
"""Joins a parameter name and a statistic name in serialized states (``"layer.weight::S"``)."""


def _shapes_text(shapes: Mapping[str, torch.Size]) -> str:
    return ", ".join(f"{stat} {tuple(shape)}" for stat, shape in shapes.items())


def _flat_values(tensor: torch.Tensor | SparseTensor, device: torch.device, dtype: torch.dtype):
    if isinstance(tensor, SparseTensor):
        return tensor.values.to(device=device, dtype=dtype), tensor.indices.to(device=device)
    return tensor.reshape(-1).to(device=device, dtype=dtype), None


def _check_fisher(name: str, fisher: torch.Tensor | SparseTensor, tensor: torch.Tensor | SparseTensor) -> None:
    """A Fisher diagonal must have the update's shape, share a sparse update's support, and be >= 0."""
    fisher_on_support(name, fisher, tensor)
    values = fisher.values if isinstance(fisher, SparseTensor) else fisher
    if values.numel() and float(values.min()) < 0:  # one vectorized pass; (x < 0).any() is two slow bool ones
        raise ValueError(f"tensor {name!r}: Fisher diagonal has negative entries")


@dataclass(frozen=True)
class FinalizeContext:
    """What a method may need beyond its statistics to finalize one parameter."""

    shape: torch.Size
    total_weight: float
    num_updates: int
    base: torch.Tensor | None = None
    """The parameter's base value, flat on the state's device (only for ``needs_base`` methods)."""
    consume: bool = False
    """The statistics are freed right after (``finalize(release=True)``): a method may reuse their memory."""


class MergeState(ABC):
    """The state of one merge (one method, one device): updates folded so far, their total weight and count."""

    def __init__(self, strategy: MergeStrategy) -> None:
        self.strategy = strategy
        self.shapes: dict[str, torch.Size] = {}
        self.total_weight = 0.0
        self.num_updates = 0
        self.released = False

    @abstractmethod
    def add(
        self,
        update: Update,
        weight: float = 1.0,
        fisher: Mapping[str, Any] | None = None,
        gram: Mapping[str, torch.Tensor] | None = None,
    ) -> MergeState:
        """Fold one update with ``weight`` (and the Fisher diagonal / Grams the method reads)."""

    @abstractmethod
    def combine(self, other: MergeState) -> MergeState:
        """Fold ``other`` into this state (``ValueError`` when the method is not a monoid)."""

    @abstractmethod
    def finalize(
        self, *, release: bool = False, base: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The merged task vector λ·merge(τ₁…τ_K), one tensor per parameter."""

    @abstractmethod
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The state as ``{"param::stat": tensor}`` (``ValueError`` when the method is not a monoid)."""

    @abstractmethod
    def metadata(self) -> dict[str, str]:
        """String metadata that, with :meth:`to_tensors`, fully describes this state."""

    @abstractmethod
    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Fill an empty state from :meth:`to_tensors`'s output (``ValueError`` when not a monoid)."""

    def _check_shape(self, name: str, shape: torch.Size) -> None:
        known = self.shapes.get(name)
        if known is not None and known != shape:
            raise ValueError(f"tensor {name!r}: shape {tuple(shape)} but earlier updates had {tuple(known)}")

    def _check_not_released(self) -> None:
        if self.released:
            raise ValueError("this merge state was spent by finalize(release=True); start a new one")

    @classmethod
    def from_tensors(
        cls, strategy: MergeStrategy, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
    ) -> MergeState:
        """Rebuild a state written by :meth:`to_tensors`/:meth:`metadata`, checking it fits ``strategy``."""
        try:
            identity = json.loads(metadata["fedfuse_state"])
            total_weight = float(metadata["total_weight"])
            num_updates = int(metadata["num_updates"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"not a fedfuse partial state (bad metadata: {exc})") from exc
        if identity != strategy.identity():
            raise ValueError(f"partial state was made by {identity}, not by {strategy.identity()}")
        state = strategy.new_state()
        state._load(tensors)
        state.total_weight = total_weight
        state.num_updates = num_updates
        return state


class StatisticsState(MergeState):
    """Summed sufficient statistics of the updates added so far (a statistics method's monoid state).

    Memory is the method's statistics for each parameter, whatever the number of updates.
    """

    strategy: StatisticsStrategy

    def __init__(self, strategy: StatisticsStrategy) -> None:
        super().__init__(strategy)
        self.stat_shapes: dict[str, dict[str, torch.Size]] = {}
        self.stats: dict[str, dict[str, torch.Tensor]] = {}

    def _check_statistics(self, name: str, shapes: Mapping[str, torch.Size]) -> None:
        known = self.stat_shapes.get(name)
        if known is not None and known != shapes:
            raise ValueError(
                f"tensor {name!r}: statistics of shapes {_shapes_text(shapes)} but earlier updates had "
                f"{_shapes_text(known)} (a Gram matrix given with some updates only?)"
            )

    def _stats_for(
        self, name: str, shape: torch.Size, shapes: Mapping[str, torch.Size] | None = None
    ) -> dict[str, torch.Tensor]:
        self._check_shape(name, shape)
        shapes = dict(shapes or self.strategy.statistic_shapes(torch.Size(shape), False))
        self._check_statistics(name, shapes)
        if name not in self.shapes:
            self.shapes[name] = torch.Size(shape)
            self.stat_shapes[name] = shapes
            s = self.strategy
            self.stats[name] = {
                stat: torch.zeros(size.numel(), dtype=s.dtype, device=s.device) for stat, size in shapes.items()
            }
        return self.stats[name]

    def add(
        self,
        update: Update,
        weight: float = 1.0,
        fisher: Mapping[str, Any] | None = None,
        gram: Mapping[str, torch.Tensor] | None = None,
    ) -> MergeState:
        """Fold one update (dense and/or sparse tensors) with ``weight``, optional Fisher diagonal and Grams.

        ``gram`` maps some 2-D tensors of the update to the in × in Gram matrix of their inputs (used by
        ``needs_gram`` methods, ignored by the others). All-or-nothing: every tensor is checked before
        any is accumulated, so a rejected update leaves the state exactly as it was.
        """
        self._check_not_released()
        weight = float(weight)
        s = self.strategy
        if not math.isfinite(weight) or (weight < 0 and not s.capabilities.negative_weights):
            raise ValueError(f"update weight must be finite and >= 0, got {weight}")
        if s.capabilities.needs_fisher and fisher is None:
            raise ValueError(f"strategy {s.name!r} needs a Fisher diagonal with every update")
        if fisher is not None:
            unknown = sorted(set(fisher) - set(update))
            if unknown:
                raise ValueError(f"Fisher diagonal names tensors the update lacks: {', '.join(unknown[:5])}")
        grams = dict(gram or {}) if s.capabilities.needs_gram else {}
        for name, given_gram in grams.items():
            check_gram(name, given_gram, update.get(name))
        for name, tensor in update.items():
            if not isinstance(tensor, SparseTensor) and not tensor.is_floating_point():
                raise ValueError(f"tensor {name!r}: updates must be floating point, got {tensor.dtype}")
            self._check_shape(name, tensor.shape)
            fisher_tensor = None if fisher is None else fisher.get(name)
            if fisher_tensor is not None:
                _check_fisher(name, fisher_tensor, tensor)
            elif s.capabilities.needs_fisher:
                raise ValueError(f"tensor {name!r}: strategy {s.name!r} needs its Fisher diagonal")
            self._check_statistics(name, s.statistic_shapes(torch.Size(tensor.shape), name in grams))
        for name, tensor in update.items():
            values, index = _flat_values(tensor, s.device, s.dtype)
            fisher_tensor = None if fisher is None else fisher.get(name)
            fisher_values = (
                None
                if fisher_tensor is None
                else fisher_on_support(name, fisher_tensor, tensor).to(device=s.device, dtype=s.dtype)
            )
            shape = torch.Size(tensor.shape)
            given = grams.get(name)
            stats = self._stats_for(name, shape, s.statistic_shapes(shape, given is not None))
            matrix = None if given is None else given.to(device=s.device, dtype=s.dtype)
            s.accumulate_parameter(stats, values, weight, fisher_values, index, shape, matrix)
        self.total_weight += weight
        self.num_updates += 1
        return self

    def combine(self, other: MergeState) -> MergeState:
        """Fold ``other`` into this state (element-wise sums); ``other`` is left unchanged.

        All-or-nothing like :meth:`add`: incompatible states raise before anything is summed.
        """
        self._check_not_released()
        other._check_not_released()
        if self.strategy.identity() != other.strategy.identity() or not isinstance(other, StatisticsState):
            raise ValueError(
                "cannot combine states of different strategies: "
                f"{self.strategy.identity()} vs {other.strategy.identity()}"
            )
        for name, shape in other.shapes.items():
            self._check_shape(name, shape)
            self._check_statistics(name, other.stat_shapes[name])
        for name, other_stats in other.stats.items():
            stats = self._stats_for(name, other.shapes[name], other.stat_shapes[name])
            for stat, tensor in other_stats.items():
                stats[stat].add_(tensor.to(device=stats[stat].device, dtype=stats[stat].dtype))
        self.total_weight += other.total_weight
        self.num_updates += other.num_updates
        return self

    def finalize(
        self, *, release: bool = False, base: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The merged task vector λ·merge(τ₁…τ_K), one tensor per parameter (state dtype and device).

        ``release=True`` frees each parameter's statistics as soon as its result exists, so the
        peak is the state plus one tensor's work instead of the state plus the whole output; the
        state is spent afterwards (a server does this at the end of a round). ``base`` gives the base
        tensors to a method that ``needs_base`` (SLERP, linear without normalization).
        """
        self._check_not_released()
        if self.num_updates == 0:
            raise ValueError("no updates were added to this merge state")
        strategy = self.strategy
        if strategy.capabilities.needs_base and (base is None or not set(self.stats) <= set(base)):
            raise ValueError(f"strategy {strategy.name!r} needs the base tensors to finalize (an offline merge)")
        lam = strategy.lam
        out = {}
        for name in list(self.stats):
            base_flat = (
                None
                if not strategy.capabilities.needs_base or base is None
                else base[name].reshape(-1).to(device=strategy.device, dtype=strategy.dtype)
            )
            context = FinalizeContext(self.shapes[name], self.total_weight, self.num_updates, base_flat, release)
            merged = strategy.finalize_parameter(self.stats[name], context)
            if lam != 1.0:  # in place only when nothing it might alias (a statistic, the base) survives
                merged = merged.mul_(lam) if release and base_flat is None else merged * lam
            out[name] = merged.reshape(self.shapes[name])
            if release:
                del self.stats[name]
        self.released = release
        return out

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The statistics as ``{"param::stat": tensor}`` in parameter shape (for files and the wire).

        The tensors are views of the live statistics: encode or copy them before adding more.
        """
        self._check_not_released()
        return {
            f"{name}{STAT_SEPARATOR}{stat}": tensor.reshape(self.stat_shapes[name][stat])
            for name, stats in self.stats.items()
            for stat, tensor in stats.items()
        }

    def metadata(self) -> dict[str, str]:
        """String metadata that, with :meth:`to_tensors`, fully describes this state."""
        return {
            "fedfuse_state": json.dumps(self.strategy.identity(), sort_keys=True),
            "total_weight": repr(self.total_weight),
            "num_updates": str(self.num_updates),
        }

    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        strategy = self.strategy
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            name, sep, stat = key.rpartition(STAT_SEPARATOR)
            if not sep or stat not in strategy.statistics:
                raise ValueError(f"partial state has an unexpected tensor {key!r}")
            grouped.setdefault(name, {})[stat] = tensor
        for name, stats in grouped.items():
            missing = sorted(set(strategy.statistics) - set(stats))
            if missing:
                raise ValueError(f"partial state lacks statistics {missing} for tensor {name!r}")
            shapes = {stat: torch.Size(t.shape) for stat, t in stats.items()}
            try:
                shape = strategy.parameter_shape(name, shapes)
            except ValueError as exc:
                raise ValueError(f"partial state: {exc}") from exc
            target = self._stats_for(name, torch.Size(shape), shapes)
            for stat, tensor in stats.items():
                target[stat].copy_(tensor.reshape(-1))
