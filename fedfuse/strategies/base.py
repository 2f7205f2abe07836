"""The merge-strategy contract: a commutative monoid of per-parameter sufficient statistics.

A strategy names its element-wise statistics, says how one update's kept entries add into them
(``accumulate``) and how the summed statistics become the merged task vector (``finalize_tensor``).
Everything else — dense vs sparse updates, devices, dtypes, combining partial states, λ — lives
here once, so a custom strategy is one short class. ``combine`` is an element-wise sum for every
strategy; that is what makes streaming, tiers and GPU placement exact and memory-flat.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedfuse.algebra.sparse import SparseTensor, Update, fisher_on_support
from fedfuse.strategies.params import Param

STAT_SEPARATOR = "::"
"""Joins a parameter name and a statistic name in serialized states (``"layer.weight::S"``)."""

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` means CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available (use 'auto' or 'cpu')")
    return resolved


def add_at(stat: torch.Tensor, contribution: torch.Tensor, index: torch.Tensor | None, alpha: float = 1.0) -> None:
    """``stat += alpha·contribution``, at ``index`` when the update is sparse (no densifying).

    Sparse indices are unique, so ``scatter_add_`` (faster than ``index_add_`` on CPU) is exact.
    """
    if index is None:
        stat.add_(contribution, alpha=alpha)
    else:
        stat.scatter_add_(0, index, contribution if alpha == 1.0 else contribution * alpha)


class MergeStrategy(ABC):
    """Base class of every merge method.

    Parameters
    ----------
    lam : float
        Scale λ applied to the merged task vector at :meth:`finalize` (default 1.0).
    device : str
        Where the statistics live: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
    dtype : str
        Accumulation precision, ``"float32"`` (default) or ``"float64"``. Inputs in bf16/fp16 are
        always accumulated at this precision.

    Subclasses set ``statistics`` (element-wise statistic names) and implement
    :meth:`accumulate` and :meth:`finalize_tensor`. Extra constructor parameters are declared in
    ``parameters`` (so run configs and command lines can set them) and returned by :meth:`params`
    (so partial states from different processes can be checked for compatibility).
    """

    name: str = ""
    statistics: tuple[str, ...] = ()
    parameters: ClassVar[tuple[Param, ...]] = ()
    """The method's own declared parameters (``lam`` is common to all; see :class:`Param`)."""
    needs_fisher: ClassVar[bool] = False
    """Every update must carry a Fisher diagonal (read by the settings, the server and ``fedfuse merge``)."""
    default_sparsifier: str = "none"
    mergeable: ClassVar[bool] = True
    """The state is a monoid (``combine`` sums statistics): tiers, gateways and partial states are exact."""
    federated: ClassVar[bool] = True
    """The method can merge a federated round (False: offline ``fedfuse merge`` only, e.g. SLERP)."""
    negative_weights: ClassVar[bool] = False
    """Update weights may be negative (task negation); otherwise a negative weight is refused."""
    needs_base: bool = False
    """``finalize`` needs the base tensors (the merged model is not base + a function of the task vectors)."""

    def __init__(self, *, lam: float = 1.0, device: str = "cpu", dtype: str = "float32") -> None:
        if not math.isfinite(lam):
            raise ValueError(f"lam must be finite, got {lam}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.lam = float(lam)
        self.dtype_name = dtype
        self.dtype = _DTYPES[dtype]
        self.device = resolve_device(device)

    @abstractmethod
    def accumulate(
        self,
        stats: dict[str, torch.Tensor],
        values: torch.Tensor,
        weight: float,
        fisher: torch.Tensor | None,
        index: torch.Tensor | None,
    ) -> None:
        """Add one update's entries of one tensor into ``stats`` (flat, on the state's device).

        ``values`` are the kept entries (all entries when ``index`` is None); ``fisher`` is the
        Fisher diagonal on the same entries, or None. Use :func:`add_at` to write.
        """

    @abstractmethod
    def finalize_tensor(self, stats: dict[str, torch.Tensor], total_weight: float) -> torch.Tensor:
        """The merged task vector of one tensor (flat, before λ) from its summed statistics."""

    def accumulate_parameter(
        self,
        stats: dict[str, torch.Tensor],
        values: torch.Tensor,
        weight: float,
        fisher: torch.Tensor | None,
        index: torch.Tensor | None,
        shape: torch.Size,
    ) -> None:
        """:meth:`accumulate` knowing the parameter's ``shape`` (row-wise methods override this one)."""
        self.accumulate(stats, values, weight, fisher, index)

    def finalize_parameter(self, stats: dict[str, torch.Tensor], context: FinalizeContext) -> torch.Tensor:
        """:meth:`finalize_tensor` knowing the shape, the update count and (``needs_base``) the base tensor."""
        return self.finalize_tensor(stats, context.total_weight)

    def params(self) -> dict[str, Any]:
        """The parameters that change the merge's meaning (serialized with partial states)."""
        return {"lam": self.lam, "dtype": self.dtype_name}

    def identity(self) -> dict[str, Any]:
        """Name plus parameters: two states combine only when their identities are equal."""
        return {"strategy": self.name, **self.params()}

    def new_state(self) -> MergeState:
        """An empty state (the monoid's identity element)."""
        return MergeState(self)

    def combine(self, a: MergeState, b: MergeState) -> MergeState:
        """Fold state ``b`` into state ``a`` (element-wise sums) and return ``a``."""
        return a.combine(b)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args}, device={str(self.device)!r})"


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


class MergeState:
    """Summed sufficient statistics of the updates added so far (one strategy, one device).

    Memory is the strategy's statistics for each parameter, whatever the number of updates.
    """

    def __init__(self, strategy: MergeStrategy) -> None:
        self.strategy = strategy
        self.shapes: dict[str, torch.Size] = {}
        self.stats: dict[str, dict[str, torch.Tensor]] = {}
        self.total_weight = 0.0
        self.num_updates = 0
        self.released = False

    def _check_shape(self, name: str, shape: torch.Size) -> None:
        known = self.shapes.get(name)
        if known is not None and known != shape:
            raise ValueError(f"tensor {name!r}: shape {tuple(shape)} but earlier updates had {tuple(known)}")

    def _stats_for(self, name: str, shape: torch.Size) -> dict[str, torch.Tensor]:
        self._check_shape(name, shape)
        if name not in self.shapes:
            self.shapes[name] = torch.Size(shape)
            numel = torch.Size(shape).numel()
            s = self.strategy
            self.stats[name] = {stat: torch.zeros(numel, dtype=s.dtype, device=s.device) for stat in s.statistics}
        return self.stats[name]

    def add(self, update: Update, weight: float = 1.0, fisher: Mapping[str, Any] | None = None) -> MergeState:
        """Fold one update (dense and/or sparse tensors) with ``weight`` and optional Fisher diagonal.

        All-or-nothing: every tensor is checked before any is accumulated, so a rejected update
        leaves the state exactly as it was.
        """
        self._check_not_released()
        weight = float(weight)
        s = self.strategy
        if not math.isfinite(weight) or (weight < 0 and not s.negative_weights):
            raise ValueError(f"update weight must be finite and >= 0, got {weight}")
        if s.needs_fisher and fisher is None:
            raise ValueError(f"strategy {s.name!r} needs a Fisher diagonal with every update")
        if fisher is not None:
            unknown = sorted(set(fisher) - set(update))
            if unknown:
                raise ValueError(f"Fisher diagonal names tensors the update lacks: {', '.join(unknown[:5])}")
        for name, tensor in update.items():
            if not isinstance(tensor, SparseTensor) and not tensor.is_floating_point():
                raise ValueError(f"tensor {name!r}: updates must be floating point, got {tensor.dtype}")
            self._check_shape(name, tensor.shape)
            fisher_tensor = None if fisher is None else fisher.get(name)
            if fisher_tensor is not None:
                _check_fisher(name, fisher_tensor, tensor)
            elif s.needs_fisher:
                raise ValueError(f"tensor {name!r}: strategy {s.name!r} needs its Fisher diagonal")
        for name, tensor in update.items():
            values, index = _flat_values(tensor, s.device, s.dtype)
            fisher_tensor = None if fisher is None else fisher.get(name)
            fisher_values = (
                None
                if fisher_tensor is None
                else fisher_on_support(name, fisher_tensor, tensor).to(device=s.device, dtype=s.dtype)
            )
            s.accumulate_parameter(
                self._stats_for(name, tensor.shape), values, weight, fisher_values, index, tensor.shape
            )
        self.total_weight += weight
        self.num_updates += 1
        return self

    def combine(self, other: MergeState) -> MergeState:
        """Fold ``other`` into this state (element-wise sums); ``other`` is left unchanged.

        All-or-nothing like :meth:`add`: incompatible states raise before anything is summed.
        """
        self._check_not_released()
        other._check_not_released()
        if self.strategy.identity() != other.strategy.identity():
            raise ValueError(
                "cannot combine states of different strategies: "
                f"{self.strategy.identity()} vs {other.strategy.identity()}"
            )
        for name, shape in other.shapes.items():
            self._check_shape(name, shape)
        for name, other_stats in other.stats.items():
            stats = self._stats_for(name, other.shapes[name])
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
        if strategy.needs_base and (base is None or not set(self.stats) <= set(base)):
            raise ValueError(f"strategy {strategy.name!r} needs the base tensors to finalize (an offline merge)")
        lam = strategy.lam
        out = {}
        for name in list(self.stats):
            base_flat = (
                None
                if not strategy.needs_base or base is None
                else base[name].reshape(-1).to(device=strategy.device, dtype=strategy.dtype)
            )
            context = FinalizeContext(self.shapes[name], self.total_weight, self.num_updates, base_flat)
            merged = strategy.finalize_parameter(self.stats[name], context)
            out[name] = (merged * lam if lam != 1.0 else merged).reshape(self.shapes[name])
            if release:
                del self.stats[name]
        self.released = release
        return out

    def _check_not_released(self) -> None:
        if self.released:
            raise ValueError("this merge state was spent by finalize(release=True); start a new one")

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The statistics as ``{"param::stat": tensor}`` in parameter shape (for files and the wire).

        The tensors are views of the live statistics: encode or copy them before adding more.
        """
        self._check_not_released()
        return {
            f"{name}{STAT_SEPARATOR}{stat}": tensor.reshape(self.shapes[name])
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
        state = cls(strategy)
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
            shapes = {tuple(t.shape) for t in stats.values()}
            if len(shapes) != 1:
                raise ValueError(f"partial state has statistics of different shapes for tensor {name!r}")
            target = state._stats_for(name, next(iter(stats.values())).shape)
            for stat, tensor in stats.items():
                target[stat].copy_(tensor.reshape(-1))
        state.total_weight = total_weight
        state.num_updates = num_updates
        return state
