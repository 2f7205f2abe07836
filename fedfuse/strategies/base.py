"""The statistics base: a merge method as a commutative monoid of per-parameter sufficient statistics.

A statistics method names its element-wise statistics, says how one update's kept entries add into
them (``accumulate``) and how the summed statistics become the merged task vector
(``finalize_tensor``). Everything else — dense vs sparse updates, devices, dtypes, combining partial
states, λ — lives in :class:`MergeState` once, so a custom method is one short class. ``combine`` is an
element-wise sum for every such method; that is what makes streaming, tiers and GPU placement exact
and memory-flat.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch

from fedfuse.strategies.contract import _STATISTICS_BASE, Capabilities, MergeStrategy, resolve_device
from fedfuse.strategies.state import STAT_SEPARATOR, FinalizeContext, MergeState, StatisticsState

__all__ = [
    "STAT_SEPARATOR",
    "Capabilities",
    "FinalizeContext",
    "MergeState",
    "MergeStrategy",
    "StatisticsState",
    "StatisticsStrategy",
    "add_at",
    "resolve_device",
]


def add_at(stat: torch.Tensor, contribution: torch.Tensor, index: torch.Tensor | None, alpha: float = 1.0) -> None:
    """``stat += alpha·contribution``, at ``index`` when the update is sparse (no densifying).

    Sparse indices are unique, so ``scatter_add_`` (faster than ``index_add_`` on CPU) is exact.
    """
    if index is None:
        stat.add_(contribution, alpha=alpha)
    else:
        stat.scatter_add_(0, index, contribution if alpha == 1.0 else contribution * alpha)


class StatisticsStrategy(MergeStrategy):
    """Base of the monoid methods: ``statistics`` plus :meth:`accumulate` and :meth:`finalize_tensor`.

    Optional hooks: the ``_parameter`` forms (row-wise methods, methods needing the base) and
    :meth:`statistic_shapes` / :meth:`~MergeStrategy.parameter_shape` (statistics that are not
    element-wise, as RegMean's). ``capabilities`` and ``parameters`` are declared as on every method.
    """

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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        defines_finalize = (
            cls.finalize_tensor is not StatisticsStrategy.finalize_tensor
            or cls.finalize_parameter is not StatisticsStrategy.finalize_parameter
        )
        if not getattr(cls.accumulate, "__isabstractmethod__", False) and not defines_finalize:
            raise TypeError(f"strategy class {cls.__qualname__} must define finalize_tensor (or finalize_parameter)")

    def finalize_tensor(self, stats: dict[str, torch.Tensor], total_weight: float) -> torch.Tensor:
        """The merged task vector of one tensor (flat, before λ) from its summed statistics.

        Every class defines this or :meth:`finalize_parameter` (checked when the class is created).
        """
        raise NotImplementedError  # unreachable: only called by the finalize_parameter this class keeps

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

    def finalize_parameter(self, stats: dict[str, torch.Tensor], context: FinalizeContext) -> torch.Tensor:
        """:meth:`finalize_tensor` knowing the shape, the update count and (``needs_base``) the base tensor."""
        return self.finalize_tensor(stats, context.total_weight)

    def new_state(self) -> StatisticsState:
        """An empty state (the monoid's identity element)."""
        return StatisticsState(self)


_STATISTICS_BASE.append(StatisticsStrategy)
