"""Encode a partial merge state (an institution gateway's or a region's) to bytes, and decode it.

The payload carries ``state.to_tensors()`` at the state's precision (fp32/fp64, lossless), each
statistic dense or — when most of it is zero, as after a few sparse updates — as its nonzeros
with packed indices, plus ``state.metadata()`` in the header. Decoding applies the same checks
as :func:`fedfuse.wire.decode_update` and rebuilds the state with ``MergeState.from_tensors``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedfuse.algebra import SparseTensor
from fedfuse.strategies import MergeState, MergeStrategy
from fedfuse.strategies.base import STAT_SEPARATOR
from fedfuse.wire.container import pack, unpack
from fedfuse.wire.errors import UpdateRejected
from fedfuse.wire.header import (
    PARTIAL_FORMAT,
    Expectation,
    TensorEntry,
    UpdateHeader,
    WireHeader,
    check_expectation,
    check_names_and_shapes,
    header_document,
    parse_header,
)
from fedfuse.wire.tensors import compact, decode_tensor, encode_tensor
from fedfuse.wire.update import check_blob_keys

STATE_KEYS = ("fedfuse_state", "num_updates", "total_weight")


@dataclass(frozen=True)
class DecodedPartial:
    """A validated partial state, ready for ``strategy.combine(mine, decoded.state)``."""

    state: MergeState
    header: UpdateHeader
    nbytes: int


def encode_partial(state: MergeState, *, header: UpdateHeader) -> bytes:
    """One safetensors payload for a partial state (statistics at the state's own precision)."""
    if not isinstance(state, MergeState):
        raise ValueError(f"state must be a fedfuse MergeState, got {type(state).__name__}")
    if not isinstance(header, UpdateHeader):
        raise ValueError(f"header must be a fedfuse.wire.UpdateHeader, got {type(header).__name__}")
    value_dtype = state.strategy.dtype_name
    entries: dict[str, TensorEntry] = {}
    blobs: dict[str, torch.Tensor] = {}
    for key, tensor in state.to_tensors().items():
        entries[key], tensor_blobs = encode_tensor(key, compact(tensor), value_dtype)
        blobs.update(tensor_blobs)
    extra = {"state": dict(state.metadata())}
    return pack(header_document(PARTIAL_FORMAT, header, value_dtype, entries, extra), blobs)


def _bad(message: str) -> UpdateRejected:
    return UpdateRejected("bad_partial", message)


def _check_state_metadata(parsed: WireHeader) -> dict[str, str]:
    metadata = parsed.extra["state"]
    if not isinstance(metadata, dict) or sorted(metadata) != sorted(STATE_KEYS):
        raise UpdateRejected(
            "malformed_header", f"partial state metadata must have exactly the keys {list(STATE_KEYS)}"
        )
    if not all(isinstance(value, str) for value in metadata.values()):
        raise UpdateRejected("malformed_header", "partial state metadata values must be strings")
    try:
        total_weight = float(metadata["total_weight"])
        num_updates = int(metadata["num_updates"])
    except ValueError as exc:
        raise _bad(f"partial state counters are not numbers: {exc}") from exc
    if not math.isfinite(total_weight) or total_weight < 0:
        raise _bad(f"partial state total weight must be finite and >= 0, got {metadata['total_weight']!r}")
    if num_updates < 0:
        raise _bad(f"partial state update count must be >= 0, got {num_updates}")
    return metadata


def _parameter_shapes(parsed: WireHeader, strategy: MergeStrategy) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape, checking its statistics are exactly the strategy's, all of one shape."""
    grouped: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, entry in parsed.entries.items():
        name, separator, stat = key.rpartition(STAT_SEPARATOR)
        if not separator or stat not in strategy.statistics:
            raise _bad(f"statistic {key!r} is not one of {strategy.name!r}'s {list(strategy.statistics)}")
        if entry.encoding == "dare" or entry.fisher:
            raise _bad(f"statistic {key!r} cannot be DARE-coded or carry a Fisher diagonal")
        grouped.setdefault(name, {})[stat] = entry.shape
    shapes: dict[str, tuple[int, ...]] = {}
    for name, stats in grouped.items():
        missing = sorted(set(strategy.statistics) - set(stats))
        if missing:
            raise _bad(f"parameter {name!r} lacks statistics {missing}")
        if len(set(stats.values())) != 1:
            raise _bad(f"parameter {name!r} has statistics of different shapes")
        shapes[name] = next(iter(stats.values()))
    return shapes


def _decode(data: bytes, strategy: MergeStrategy, expect: Expectation) -> DecodedPartial:
    document, blobs = unpack(data, expect.max_bytes)
    parsed = parse_header(document, PARTIAL_FORMAT, extra_keys={"state"})
    check_expectation(parsed, expect)
    metadata = _check_state_metadata(parsed)
    if parsed.value_dtype != strategy.dtype_name:
        raise _bad(f"partial state is in {parsed.value_dtype}, the strategy accumulates in {strategy.dtype_name}")
    check_names_and_shapes(_parameter_shapes(parsed, strategy), expect)
    check_blob_keys(parsed, blobs)
    tensors = {}
    for key, entry in parsed.entries.items():
        tensor, _ = decode_tensor(key, entry, blobs, parsed.value_dtype)
        tensors[key] = tensor.to_dense() if isinstance(tensor, SparseTensor) else tensor
    try:
        state = MergeState.from_tensors(strategy, tensors, metadata)
    except ValueError as exc:
        raise _bad(str(exc)) from exc
    return DecodedPartial(state, parsed.header, memoryview(data).nbytes)


def decode_partial(data: bytes, *, strategy: MergeStrategy, expect: Expectation) -> DecodedPartial:
    """Decode and validate a partial state made by the same strategy (raises :class:`UpdateRejected`)."""
    if not isinstance(strategy, MergeStrategy):
        raise TypeError(f"strategy must be a fedfuse MergeStrategy, got {type(strategy).__name__}")
    if not isinstance(expect, Expectation):
        raise TypeError(f"expect must be a fedfuse.wire.Expectation, got {type(expect).__name__}")
    try:
        return _decode(data, strategy, expect)
    except UpdateRejected:
        raise
    except Exception as exc:
        message = f"could not decode the partial state: {type(exc).__name__}: {exc}"
        raise UpdateRejected("malformed_payload", message) from exc
