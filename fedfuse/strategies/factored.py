"""A linear merge of low-rank updates kept as stacked factors: folding is a concatenation, not a product.

For a ``linear`` method (FedAvg, task arithmetic, normalized linear) the merged task vector is
c(W)·Σ wₖτₖ. When τₖ of a matrix arrives as factors Bₖ·Aₖ (exact LoRA ΔWₖ), the sum is exactly the
product of the stacked factors [w₁B₁ … w_KB_K]·[A₁; …; A_K] (:func:`fedfuse.algebra.low_rank.stack`), so
folding costs O(r·(in + out)) per update and the result stays low-rank while the stacked factors hold fewer
entries than the matrix. Everything else of an update goes to the dense state as
usual. As a partial state (tiers, files) it is the method's own dense statistics: exact, and combinable
with any other state of the method.

Past that size (more than ~in/(2r) updates of a square matrix) the factors are a buffer: when the next update
would not fit, the buffered Σ wₖBₖAₖ is added to the dense statistic as *one* product (a GEMM of inner
dimension up to in·out/(in + out)) and buffering starts afresh. The arithmetic is the same as forming
each ΔWₖ, but one pass over the out × in statistic serves ~in/(2r) updates instead of one: the fold is
compute-bound instead of memory-bound.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedfuse.algebra.low_rank import FactoredUpdate, LowRank, factors_are_smaller, stack
from fedfuse.algebra.sparse import Update
from fedfuse.strategies.base import StatisticsStrategy
from fedfuse.strategies.contract import MergeStrategy
from fedfuse.strategies.state import MergeState, StatisticsState


class FactoredState(MergeState):
    """A ``linear`` method's state that keeps low-rank matrices as weighted, stacked factors.

    Parameters
    ----------
    strategy : MergeStrategy
        A method whose capabilities say ``linear`` (its dense state holds everything else).
    """

    def __init__(self, strategy: MergeStrategy) -> None:
        if not strategy.capabilities.linear:
            raise ValueError(f"strategy {strategy.name!r} is not linear: it cannot fold updates as factors")
        super().__init__(strategy)
        dense = strategy.new_state()
        if not isinstance(dense, StatisticsState) or not isinstance(strategy, StatisticsStrategy):
            raise ValueError(f"strategy {strategy.name!r} keeps no summed statistics")
        self.dense = dense
        self.terms: dict[str, list[LowRank]] = {}
        """Per matrix still held as factors: each update's (w·B, A)."""

    @property
    def factored_names(self) -> list[str]:
        """The matrices currently held as factors."""
        return list(self.terms)

    def add(
        self,
        update: FactoredUpdate,
        weight: float = 1.0,
        fisher: Mapping[str, Any] | None = None,
        gram: Mapping[str, torch.Tensor] | None = None,
    ) -> MergeState:
        """Fold one update: its :class:`LowRank` matrices as weighted factors, the rest densely (all-or-nothing)."""
        self._check_not_released()
        low_rank = {name: t for name, t in update.items() if isinstance(t, LowRank)}
        for name, matrix in low_rank.items():  # checked before anything is folded: all-or-nothing
            known = self.shapes.get(name, self.dense.shapes.get(name))
            if known is not None and known != matrix.shape:
                raise ValueError(f"tensor {name!r}: shape {tuple(matrix.shape)} but earlier updates had {tuple(known)}")
        plain: Update = {name: t for name, t in update.items() if not isinstance(t, LowRank)}
        densified = {name: m.dense() for name, m in low_rank.items() if not factors_are_smaller(m.shape, m.rank)}
        self.dense.add({**plain, **densified}, weight=weight, fisher=fisher, gram=gram)
        for name, matrix in low_rank.items():
            if name in densified:
                continue
            held = self._held_rank(name)
            if held and not factors_are_smaller(matrix.shape, held + matrix.rank):
                self._densify(name)  # one product for the buffered updates, then buffer afresh
            self._append(name, matrix.scaled(weight).to(self.strategy.dtype))
        self.total_weight, self.num_updates = self.dense.total_weight, self.dense.num_updates
        return self

    def _held_rank(self, name: str) -> int:
        """The rank of the factors buffered for ``name`` (0: none)."""
        return sum(term.rank for term in self.terms.get(name, ()))

    def _append(self, name: str, weighted: LowRank) -> None:
        self.shapes[name] = weighted.shape
        self.terms.setdefault(name, []).append(weighted)

    def _densify(self, name: str) -> None:
        """Move a matrix's buffered factors into the dense statistics: Σ wₖBₖAₖ as one product, a zero-weight fold."""
        self._add_dense_sum(name, stack(self.terms.pop(name)))

    def _add_dense_sum(self, name: str, summed: LowRank) -> None:
        """Add an already weighted Σ wₖτₖ of one matrix to the dense statistics (accumulated at weight 1)."""
        strategy = self.strategy
        assert isinstance(strategy, StatisticsStrategy)  # checked in __init__: the dense state is a StatisticsState
        product = summed.b.to(strategy.dtype) @ summed.a.to(strategy.dtype)  # one GEMM for many updates
        values = product.reshape(-1).to(strategy.device)
        stats = self.dense._stats_for(name, summed.shape)
        strategy.accumulate_parameter(stats, values, 1.0, None, None, summed.shape, None)

    def combine(self, other: MergeState) -> MergeState:
        """Fold ``other`` (a dense or factored state of the same method) into this state."""
        self._check_not_released()
        other_dense = other.dense if isinstance(other, FactoredState) else other
        other_terms = other.terms if isinstance(other, FactoredState) else {}
        for name, terms in other_terms.items():
            for term in terms:
                self._check_shape(name, term.shape)
        for name in [name for name in self.terms if name in other_dense.shapes]:
            self._densify(name)  # the other side holds this matrix densely: sum it there
        self.dense.combine(other_dense)
        for name, terms in other_terms.items():
            if name in self.dense.shapes:
                self._add_dense_sum(name, stack(terms))
            else:
                for term in terms:
                    self._append(name, term)
        self.total_weight, self.num_updates = self.dense.total_weight, self.dense.num_updates
        return self

    def finalize(
        self, *, release: bool = False, base: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The merged task vector with every matrix dense (see :meth:`finalize_factored`)."""
        return {
            name: t.dense(self.strategy.dtype) if isinstance(t, LowRank) else t
            for name, t in self.finalize_factored(release=release).items()
        }

    def finalize_factored(self, *, release: bool = False) -> dict[str, torch.Tensor | LowRank]:
        """The merged task vector: matrices still held as factors as one :class:`LowRank` each, c(W) folded into B."""
        self._check_not_released()
        if self.num_updates == 0:
            raise ValueError("no updates were added to this merge state")
        coefficient = self.strategy.linear_coefficient(self.total_weight)
        for name in [name for name in self.terms if name in self.dense.shapes]:
            self._densify(name)  # part of it is dense already: the result is dense
        out: dict[str, torch.Tensor | LowRank] = dict(self.dense.finalize(release=release))
        for name in list(self.terms):
            out[name] = stack(self.terms[name]).scaled(coefficient)
            if release:
                del self.terms[name]
        self.released = release
        return out

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The method's dense statistics (factors formed once): a partial state any peer can combine."""
        self._check_not_released()
        for name in list(self.terms):
            self._densify(name)
        return self.dense.to_tensors()

    def metadata(self) -> dict[str, str]:
        """As the method's dense state (the serialized form is the same)."""
        return self.dense.metadata()

    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.dense._load(tensors)
