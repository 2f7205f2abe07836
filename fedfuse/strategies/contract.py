"""The contract every merge method satisfies, whatever keeps its state.

:class:`MergeStrategy` is what the round engine, the wire's partial-state codec, the offline merge and
tiers call: a name and parameters (``identity``), one :class:`Capabilities` record, λ / device / dtype,
and ``new_state``. Two small bases implement it: :class:`~fedfuse.strategies.base.StatisticsStrategy`
(a monoid of summed statistics) and :class:`~fedfuse.strategies.spilled.SpilledStrategy` (robust
methods that keep every update once, on disk).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedfuse.strategies.params import Param

if TYPE_CHECKING:
    from fedfuse.strategies.state import MergeState

__all__ = ["LEGACY_FLAGS", "Capabilities", "MergeStrategy", "resolve_device"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` means CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available (use 'auto' or 'cpu')")
    return resolved


@dataclass(frozen=True)
class Capabilities:
    """What a merge method needs and allows: declared once per class, read by settings, plans and servers.

    Parameters
    ----------
    needs_fisher : bool
        Every update must carry a Fisher diagonal (clients compute one; LoRA mode cannot).
    needs_gram : bool
        Updates carry Gram matrices XᵀX of their linear layers' inputs (RegMean); others ignore any given.
    needs_base : bool
        ``finalize`` needs the base tensors (the merged model is not base + a function of the task vectors).
    mergeable : bool
        The state is a monoid (``combine`` sums statistics): tiers, gateways and partial states are exact.
    federated : bool
        The method can merge a federated round (False: offline ``fedfuse merge`` only, e.g. SLERP).
    negative_weights : bool
        Update weights may be negative (task negation); otherwise a negative weight is refused.
    averages : bool
        The merge before λ is an average of the updates (coefficients summing to one, entry by entry), so
        it commutes with a shift of every input: see :attr:`MergeStrategy.reference_free`.
    linear : bool
        The merged task vector is c(W)·Σ wₖτₖ, a coefficient of the total weight W times the weighted sum
        (FedAvg, task arithmetic, normalized linear): low-rank updates may be folded as stacked factors
        (:class:`~fedfuse.strategies.factored.FactoredState`) and the merge stays low-rank.
    """

    needs_fisher: bool = False
    needs_gram: bool = False
    needs_base: bool = False
    mergeable: bool = True
    federated: bool = True
    negative_weights: bool = False
    averages: bool = False
    linear: bool = False


LEGACY_FLAGS = tuple(f.name for f in dataclasses.fields(Capabilities))
"""Class attributes a plug-in written before :class:`Capabilities` may set; they are folded into it."""


def _fold_legacy_flags(cls: type[MergeStrategy]) -> None:
    """A plug-in that still sets ``needs_fisher = True`` (etc.) on its class gets those in its record."""
    legacy = {flag: bool(cls.__dict__[flag]) for flag in LEGACY_FLAGS if flag in cls.__dict__}
    if legacy:
        warnings.warn(
            f"{cls.__qualname__}: set capabilities = Capabilities({', '.join(f'{k}=...' for k in legacy)}) "
            "instead of class attributes",
            DeprecationWarning,
            stacklevel=3,
        )
        cls.capabilities = dataclasses.replace(cls.capabilities, **legacy)


class MergeStrategy(ABC):
    """The contract of every merge method (subclass a base: statistics or spilled, not this one).

    Parameters
    ----------
    lam : float
        Scale λ applied to the merged task vector at ``finalize`` (default 1.0).
    device : str
        Where the state lives: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
    dtype : str
        Accumulation precision, ``"float32"`` (default) or ``"float64"``. Inputs in bf16/fp16 are
        always accumulated at this precision.

    Extra constructor parameters are declared in ``parameters`` (so run configs and command lines can set
    them) and returned by :meth:`params` (so partial states from different processes can be checked).
    """

    name: str = ""
    statistics: tuple[str, ...] = ()
    """The state's per-parameter statistic names (none for methods that keep whole updates)."""
    parameters: ClassVar[tuple[Param, ...]] = ()
    """The method's own declared parameters (``lam`` is common to all; see :class:`Param`)."""
    capabilities: Capabilities = Capabilities()
    """The class's record; an instance whose parameters change it (``linear``'s ``normalize``) sets its own."""
    default_sparsifier: str = "none"
    """The sparsifier a run or ``fedfuse merge`` uses unless told (a preset sets its own on the instance)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _adopt_legacy_statistics_subclass(cls)
        _fold_legacy_flags(cls)

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
    def new_state(self) -> MergeState:
        """An empty state (for a monoid: its identity element)."""

    def with_capabilities(self, **changes: bool) -> None:
        """Give this instance its own record: the class's with ``changes`` (parameters that change them)."""
        self.capabilities = dataclasses.replace(type(self).capabilities, **changes)

    @property
    def reference_free(self) -> bool:
        """Merging the replied weights themselves gives the round's weights plus the merged task vector.

        True for averages at λ = 1 (FedAvg, normalized linear, Fisher, median, trimmed mean, Krum): a Flower
        app may then merge replies without telling the strategy the round's weights.
        """
        return self.capabilities.averages and self.lam == 1.0

    def linear_coefficient(self, total_weight: float) -> float:
        """c(W) of a ``linear`` method, λ included: the merged task vector is c(W)·Σ wₖτₖ."""
        if not self.capabilities.linear:
            raise ValueError(f"strategy {self.name!r} is not linear in its updates")
        if not total_weight:
            raise ValueError("a linear merge needs a nonzero total weight")
        state = self.new_state()
        state.add({"unit": torch.ones(1, dtype=self.dtype, device=self.device)}, weight=total_weight)
        return float(state.finalize()["unit"][0]) / total_weight

    def params(self) -> dict[str, Any]:
        """The parameters that change the merge's meaning (serialized with partial states)."""
        return {"lam": self.lam, "dtype": self.dtype_name}

    def identity(self) -> dict[str, Any]:
        """Name plus parameters: two states combine only when their identities are equal."""
        return {"strategy": self.name, **self.params()}

    def parameter_shape(self, name: str, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
        """The parameter's shape from its statistics' shapes (read back from a file or the wire).

        Raises ``ValueError`` when the statistics are not exactly this method's, of consistent shapes.
        """
        missing = sorted(set(self.statistics) - set(shapes))
        unknown = sorted(set(shapes) - set(self.statistics))
        if missing or unknown:
            raise ValueError(f"parameter {name!r}: statistics {sorted(shapes)}, expected {list(self.statistics)}")
        distinct = {tuple(shape) for shape in shapes.values()}
        if len(distinct) != 1:
            raise ValueError(f"parameter {name!r} has statistics of different shapes")
        return next(iter(distinct))

    def combine(self, a: MergeState, b: MergeState) -> MergeState:
        """Fold state ``b`` into state ``a`` and return ``a`` (``ValueError`` unless ``mergeable``)."""
        return a.combine(b)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args}, device={str(self.device)!r})"


_STATISTICS_BASE: list[type] = []
"""The statistics base, registered by :mod:`fedfuse.strategies.base` (it imports this module)."""


def _adopt_legacy_statistics_subclass(cls: type[MergeStrategy]) -> None:
    """A class written as ``class X(MergeStrategy)`` with ``accumulate`` becomes a statistics method.

    Before the split, :class:`MergeStrategy` was the statistics base; such plug-ins keep working.
    """
    if _STATISTICS_BASE and cls.__bases__ == (MergeStrategy,) and "accumulate" in cls.__dict__:
        cls.__bases__ = (_STATISTICS_BASE[0],)
