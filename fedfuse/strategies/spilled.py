"""Strategies that are not monoids (median, trimmed mean, Krum): every update kept once, on disk.

A robust merge needs all K updates of each entry at once, so its state cannot be a sum of
statistics. :class:`SpilledState` writes each update once, as one row of an unlinked temporary file
(nothing is left behind even if the process is killed), and :meth:`SpilledState.finalize` merges
parameter by parameter and chunk by chunk: memory is one chunk of K rows plus one parameter's
result, whatever K and the model size. Such states cannot be combined, so tiers, gateways and
partial states refuse these strategies. Update weights (``num_examples``) are recorded but do not
steer the merge: a client cannot buy influence by inflating its count.
"""

from __future__ import annotations

import math
import os
import tempfile
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, BinaryIO, ClassVar

import torch

from fedfuse.algebra import Update, to_dense
from fedfuse.algebra.robust import pairwise_sq_distances
from fedfuse.strategies.contract import Capabilities, MergeStrategy
from fedfuse.strategies.state import MergeState

CHUNK_BYTES = 8 * 2**20
"""Bytes of the K-row buffer read per step of a spilled merge (the sort needs about twice that)."""


class SpilledStrategy(MergeStrategy):
    """Base of the non-monoid methods: ``merge_rows`` turns a chunk of K update rows into merged entries.

    A method that needs whole-update distances (Krum) sets ``uses_distances`` and overrides
    :meth:`coefficients`; its rows are then mixed by the returned coefficients.
    """

    capabilities = Capabilities(mergeable=False)
    uses_distances: ClassVar[bool] = False

    def new_state(self) -> SpilledState:
        return SpilledState(self)

    @abstractmethod
    def merge_rows(self, rows: torch.Tensor, selection: torch.Tensor | None) -> torch.Tensor:
        """The merged entries of one chunk from its K rows (``selection``: :meth:`coefficients`'s result)."""

    def coefficients(self, sq_distances: torch.Tensor) -> torch.Tensor | None:
        """Mixing coefficients of the K updates from their pairwise squared distances (``uses_distances``).

        None (the default): the rows are merged by :meth:`merge_rows` alone.
        """
        return None


class _RowFile:
    """Fixed-length rows of one dtype in an unlinked temporary file: appended whole, read by column range."""

    def __init__(self, row_numel: int, dtype: torch.dtype) -> None:
        self.file: BinaryIO = tempfile.TemporaryFile(prefix="fedfuse-spill-", buffering=0)  # noqa: SIM115
        self.row_numel = row_numel
        self.dtype = dtype
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        self.rows = 0

    def append(self, parts: list[torch.Tensor]) -> None:
        """Write one row from its parts in order; a failed write leaves the file as it was."""
        start = self.rows * self.row_numel * self.itemsize
        try:
            for part in parts:
                self.file.write(part.contiguous().numpy().data)
        except BaseException:
            self.file.truncate(start)
            self.file.seek(start)
            raise
        self.rows += 1

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Columns ``[start, stop)`` of every row, as a (rows, stop − start) tensor."""
        out = torch.empty((self.rows, stop - start), dtype=self.dtype)
        buffer = out.numpy()
        for row in range(self.rows):
            offset = (row * self.row_numel + start) * self.itemsize
            os.preadv(self.file.fileno(), [buffer[row]], offset)
        return out

    def close(self) -> None:
        self.file.close()


class SpilledState(MergeState):
    """Every update of a non-monoid method, one row each on disk, merged chunk by chunk at the end.

    It adds and finalizes like any state; combining and serializing are refused (``ValueError``).
    """

    strategy: SpilledStrategy

    def __init__(self, strategy: SpilledStrategy) -> None:
        super().__init__(strategy)
        self.offsets: dict[str, tuple[int, int]] = {}
        self.weights: list[float] = []
        self._rows: _RowFile | None = None

    def add(
        self,
        update: Update,
        weight: float = 1.0,
        fisher: Mapping[str, Any] | None = None,
        gram: Mapping[str, Any] | None = None,
    ) -> SpilledState:
        """Spill one update (dense or sparse tensors; a sparse one is written with its zeros; Grams unused).

        The first update fixes the tensor names and shapes; every later one must have the same.
        """
        self._check_not_released()
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"update weight must be finite and >= 0, got {weight}")
        if not self.shapes:
            self._layout(update)
        missing, extra = sorted(set(self.shapes) - set(update)), sorted(set(update) - set(self.shapes))
        if missing or extra:
            raise ValueError(
                f"strategy {self.strategy.name!r} needs every update to carry the same tensors: "
                f"missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for name, tensor in update.items():
            self._check_shape(name, torch.Size(tensor.shape))
            if not tensor.dtype.is_floating_point:
                raise ValueError(f"tensor {name!r}: updates must be floating point, got {tensor.dtype}")
        assert self._rows is not None
        dtype = self.strategy.dtype
        self._rows.append([to_dense(update[name]).reshape(-1).to(device="cpu", dtype=dtype) for name in self.shapes])
        self.weights.append(weight)
        self.total_weight += weight
        self.num_updates += 1
        return self

    def _layout(self, update: Update) -> None:
        offset = 0
        for name, tensor in update.items():
            shape = torch.Size(tensor.shape)
            self.shapes[name] = shape
            self.offsets[name] = (offset, shape.numel())
            offset += shape.numel()
        self._rows = _RowFile(offset, self.strategy.dtype)

    def combine(self, other: MergeState) -> MergeState:
        raise ValueError(self._not_a_monoid("its states cannot be combined"))

    def _not_a_monoid(self, what: str) -> str:
        return (
            f"strategy {self.strategy.name!r} is not a monoid: {what} "
            "(tiers, gateways and partial states need a mergeable strategy)"
        )

    def _chunks(self, numel: int) -> range:
        step = max(1, CHUNK_BYTES // max(1, self.num_updates * self.strategy.dtype.itemsize))
        return range(0, numel, step)

    def _chunk(self, name: str, start: int, stop: int) -> torch.Tensor:
        assert self._rows is not None
        offset = self.offsets[name][0]
        return self._rows.read(offset + start, offset + stop).to(self.strategy.device)

    def _selection(self) -> torch.Tensor | None:
        """Krum-style coefficients from the Gram matrix of the rows, summed over chunks in float64."""
        if not self.strategy.uses_distances:
            return None
        gram = torch.zeros((self.num_updates, self.num_updates), dtype=torch.float64)
        for name, (_, numel) in self.offsets.items():
            chunks = self._chunks(numel)
            for start in chunks:
                rows = self._chunk(name, start, min(numel, start + chunks.step)).double()
                gram += (rows @ rows.T).cpu()
        return self.strategy.coefficients(pairwise_sq_distances(gram))

    def finalize(
        self, *, release: bool = False, base: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The merged task vector, parameter by parameter (λ applied); ``release`` deletes the spill file.

        ``base`` is accepted for the common signature; robust methods do not need it.
        """
        self._check_not_released()
        if self.num_updates == 0:
            raise ValueError("no updates were added to this merge state")
        selection = self._selection()
        lam = self.strategy.lam
        out = {}
        for name, (_, numel) in self.offsets.items():
            merged = torch.empty(numel, dtype=self.strategy.dtype, device=self.strategy.device)
            chunks = self._chunks(numel)
            for start in chunks:
                stop = min(numel, start + chunks.step)
                merged[start:stop] = self.strategy.merge_rows(self._chunk(name, start, stop), selection)
            out[name] = (merged * lam if lam != 1.0 else merged).reshape(self.shapes[name])
        if release:
            self.close()
            self.released = True
        return out

    def close(self) -> None:
        """Delete the spill file now (it is unlinked already: closing frees its disk space)."""
        if self._rows is not None:
            self._rows.close()
            self._rows = None

    def to_tensors(self) -> dict[str, torch.Tensor]:
        raise ValueError(self._not_a_monoid("it has no partial state"))

    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        raise ValueError(self._not_a_monoid("it has no partial state"))

    def metadata(self) -> dict[str, str]:
        raise ValueError(self._not_a_monoid("it has no partial state"))
