"""The merge-strategy contract: a commutative monoid of per-parameter sufficient statistics.

A strategy names its element-wise statistics, says how one update's kept entries add into them
(``accumulate``) and how the summed statistics become the merged task vector (``finalize_tensor``).
Everything else — dense vs sparse updates, devices, dtypes, combining partial states, λ — lives
here once, so a custom strategy is one short class. ``combine`` is an element-wise sum for every
strategy; that is what makes streaming, tiers and GPU placement exact and memory-flat.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from fedfuse.strategies.params import Param
from fedfuse.strategies.state import STAT_SEPARATOR, FinalizeContext, MergeState

__all__ = ["STAT_SEPARATOR", "FinalizeContext", "MergeState", "MergeStrategy", "add_at", "resolve_device"]

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
    needs_gram: ClassVar[bool] = False
    """Updates carry Gram matrices XᵀX of their linear layers' inputs (RegMean); others ignore any given."""

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
        gram: torch.Tensor | None = None,
    ) -> None:
        """:meth:`accumulate` knowing the parameter's ``shape`` (row-wise methods override this one).

        ``gram`` is the update's in × in Gram matrix for this parameter (``needs_gram`` methods only).
        """
        self.accumulate(stats, values, weight, fisher, index)

    def statistic_shapes(self, shape: torch.Size, gram: bool) -> dict[str, torch.Size]:
        """The shape of each statistic of a parameter of ``shape`` (element-wise: all ``shape``).

        ``gram`` says whether the updates carry a Gram matrix for it; methods whose statistics are not
        element-wise (RegMean's in × in sums) override this and :meth:`parameter_shape`.
        """
        return {stat: torch.Size(shape) for stat in self.statistics}

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
