"""One node's merge statistics as a ring vector, and a secure sum of them back as a merge state.

A monoid method's state is a sum over updates (``StatisticsState.combine`` adds tensors), so the state of
one update — its *statistics* — summed over nodes is the round's state, whoever adds them. Under secure
aggregation each node computes its own statistics (:func:`node_statistics`, with the round policy's
weight, example cap and clipping applied by the node, since the server never sees the update), lays them
out in a fixed order (:class:`StatisticsLayout`: every ``param::stat`` flat; for round-seeded DARE only the
entries every node kept), encodes them in the ring with SecAgg's fixed point and appends three exact
integers: the weight (in 1/1024ths), the update count and how many values the fixed point clipped. The
server decodes the unmasked sum into one state (:meth:`StatisticsLayout.to_state`) and folds it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedfuse.algebra import SparseTensor, Sparsifier, dare_seed_fn, name_mismatch, sparsify_update
from fedfuse.rounds.bounds import UpdateBounds
from fedfuse.rounds.space import UpdateSpace
from fedfuse.secagg.ring import FixedPoint
from fedfuse.strategies import MergeState, MergeStrategy
from fedfuse.strategies.state import STAT_SEPARATOR, StatisticsState
from fedfuse.wire import DecodedUpdate, Expectation, decode_partial, decode_update
from fedfuse.wire.container import unpack
from fedfuse.wire.header import UPDATE_FORMAT, parse_header
from fedfuse.wire.partial import PARTIAL_FORMAT, _parameter_shapes

WEIGHT_UNITS = 1024
"""The weight travels as an exact integer of 1/1024ths of an example."""
TAIL = ("weight", "updates", "clipped")


@dataclass(frozen=True)
class LayoutEntry:
    """One statistic's place in the vector: its key, shape, and the kept entries' count and digest (if any)."""

    key: str
    shape: tuple[int, ...]
    kept: int = -1
    """Entries sent when restricted to a support every node shares (round-seeded DARE); -1: all of them."""
    digest: str = ""

    @property
    def size(self) -> int:
        """Values this statistic takes in the vector."""
        return self.kept if self.kept >= 0 else int(np.prod(self.shape, dtype=np.int64))

    @property
    def parameter(self) -> str:
        """The merged parameter's name."""
        return self.key.rpartition(STAT_SEPARATOR)[0]


@dataclass(frozen=True)
class StatisticsLayout:
    """The order and extent of a node's statistics in its input vector (public: names, shapes, supports)."""

    entries: tuple[LayoutEntry, ...]

    @property
    def float_length(self) -> int:
        """Fixed-point values before the integer tail."""
        return sum(entry.size for entry in self.entries)

    @property
    def length(self) -> int:
        """Ring elements in the vector (fixed-point values, then the tail)."""
        return self.float_length + len(TAIL)

    def describe(self) -> str:
        """Canonical JSON (what nodes send so the server can check they agree)."""
        return json.dumps([[e.key, list(e.shape), e.kept, e.digest] for e in self.entries], separators=(",", ":"))

    @classmethod
    def from_description(cls, text: str) -> StatisticsLayout:
        """Read :meth:`describe`'s output (``ValueError`` when malformed)."""
        try:
            rows = json.loads(text)
            return cls(tuple(LayoutEntry(str(k), tuple(int(d) for d in s), int(n), str(h)) for k, s, n, h in rows))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"statistics layout is malformed: {exc}") from None

    @classmethod
    def of(cls, state: StatisticsState, supports: Mapping[str, torch.Tensor]) -> StatisticsLayout:
        """The layout of ``state``'s statistics; a parameter in ``supports`` sends only those flat entries."""
        entries = []
        for key, tensor in sorted(state.to_tensors().items()):
            name = key.rpartition(STAT_SEPARATOR)[0]
            support = supports.get(name)
            if support is not None and tuple(tensor.shape) == tuple(state.shapes[name]):
                entries.append(LayoutEntry(key, tuple(tensor.shape), int(support.numel()), support_digest(support)))
            else:
                entries.append(LayoutEntry(key, tuple(tensor.shape)))
        return cls(tuple(entries))

    def check(self, strategy: MergeStrategy, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Refuse a layout that does not hold ``strategy``'s statistics of exactly the merged ``shapes``."""
        grouped: dict[str, dict[str, tuple[int, ...]]] = {}
        for entry in self.entries:
            name, _, stat = entry.key.rpartition(STAT_SEPARATOR)
            grouped.setdefault(name, {})[stat] = entry.shape
        problem = name_mismatch(shapes, grouped, missing="missing parameters", extra="unexpected parameters")
        if problem:
            raise ValueError(f"statistics layout: {problem}")
        for name, stats in grouped.items():
            shape = tuple(strategy.parameter_shape(name, stats))
            if shape != tuple(shapes[name]):
                raise ValueError(f"statistics layout: parameter {name!r} has shape {shape}, expected {shapes[name]}")

    def encode(
        self, state: StatisticsState, supports: Mapping[str, torch.Tensor], fixed: FixedPoint
    ) -> tuple[np.ndarray, int]:
        """The state as ring elements (fixed point, then the exact tail) and how many values were clipped."""
        tensors = state.to_tensors()
        parts = []
        for entry in self.entries:
            flat = tensors[entry.key].reshape(-1).double()
            if entry.kept >= 0:
                flat = flat[supports[entry.parameter]]
            parts.append(flat.numpy())
        values, clipped = fixed.encode(np.concatenate(parts) if parts else np.zeros(0))
        tail = fixed.encode_integers(
            np.array([round(state.total_weight * WEIGHT_UNITS), state.num_updates, clipped], dtype=np.int64)
        )
        return np.concatenate([values, tail]).astype(fixed.dtype), clipped

    def to_state(
        self, strategy: MergeStrategy, total: np.ndarray, fixed: FixedPoint, supports: Mapping[str, torch.Tensor]
    ) -> tuple[MergeState, int]:
        """The summed vector as one merge state (float32 statistics) and the total of clipped values."""
        if total.shape != (self.length,):
            raise ValueError(f"secure sum has {total.shape[0]} values; the layout needs {self.length}")
        floats = fixed.decode(total[: self.float_length])
        weight, updates, clipped = (int(v) for v in fixed.decode_integers(total[self.float_length :]))
        tensors, offset = {}, 0
        for entry in self.entries:
            chunk = torch.from_numpy(floats[offset : offset + entry.size].copy())
            offset += entry.size
            if entry.kept >= 0:
                dense = torch.zeros(int(np.prod(entry.shape, dtype=np.int64)), dtype=torch.float64)
                dense[supports[entry.parameter]] = chunk
                chunk = dense
            tensors[entry.key] = chunk.reshape(entry.shape).to(strategy.dtype)
        metadata = {
            "fedfuse_state": json.dumps(strategy.identity(), sort_keys=True),
            "total_weight": repr(weight / WEIGHT_UNITS),
            "num_updates": str(updates),
        }
        return MergeState.from_tensors(strategy, tensors, metadata), clipped


def support_digest(indices: torch.Tensor) -> str:
    """A short fingerprint of a support's indices (nodes and server must agree on it)."""
    return hashlib.sha256(indices.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def update_supports(update: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The kept indices of an update's sparse tensors (round-seeded DARE: the same on every node)."""
    return {name: t.indices for name, t in update.items() if isinstance(t, SparseTensor)}


def round_supports(
    sparsifier: Sparsifier, seed: int, round_number: int, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """The supports a round-seeded sparsifier keeps this round, as the server derives them (no update needed)."""
    if sparsifier.kind == "none":
        return {}
    ones = {name: torch.ones(shape) for name, shape in shapes.items()}
    kept = sparsify_update(ones, sparsifier, dare_seed_fn(seed, round_number, "", "round"))
    return update_supports(kept)


def own_update(payload: bytes) -> DecodedUpdate:
    """A node's own encoded update read back (the shapes its header names; nothing else expected)."""
    document, _ = unpack(payload, None)
    parsed = parse_header(document, UPDATE_FORMAT)
    return decode_update(payload, expect=Expectation({n: e.shape for n, e in parsed.entries.items()}))


def own_partial(payload: bytes, strategy: MergeStrategy) -> MergeState:
    """A tier gateway's own partial state read back (its members' summed statistics: its secure input)."""
    document, _ = unpack(payload, None)
    parsed = parse_header(document, PARTIAL_FORMAT, extra_keys={"state"})
    shapes = _parameter_shapes(parsed, strategy)
    return decode_partial(payload, strategy=strategy, expect=Expectation(shapes)).state


def node_statistics(
    update: DecodedUpdate, space: UpdateSpace, strategy: MergeStrategy, bounds: UpdateBounds
) -> StatisticsState:
    """One update's statistics, with the policy's weight, example cap and clipping applied (on the node)."""
    tensors, fisher = space.merge_input(update)
    clipped, norm = bounds.clip(tensors)
    state = strategy.new_state()
    if not isinstance(state, StatisticsState):
        raise ValueError(f"strategy {strategy.name!r} keeps no summed statistics: it cannot be summed securely")
    weight = bounds.weight(update.header.num_examples)
    if weight <= 0:
        raise ValueError(f"update has {update.header.num_examples} examples: nothing to weigh")
    state.add(clipped, weight=weight, fisher=fisher, gram=space.merge_grams(update))  # type: ignore[arg-type]
    bounds.admitted(update.header.num_examples, norm)
    return state
