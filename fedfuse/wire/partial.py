"""Encode a partial merge state (an institution gateway's, a region's, an offline group's) and decode it.

The payload carries ``state.to_tensors()`` at the state's precision (fp32/fp64, lossless), each
statistic dense or — when most of it is zero, as after a few sparse updates — as its nonzeros
with packed indices, plus ``state.metadata()`` in the header. Decoding applies the same checks
as :func:`fedfuse.wire.decode_update` and rebuilds the state with ``MergeState.from_tensors``.

One format for every partial state: the bytes a gateway sends are what ``fedfuse merge
--partial-out`` writes to a file (:mod:`fedfuse.wire.partial_file` does it one parameter at a
time), and either decodes with :func:`decode_partial` or opens with ``open_partial``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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


def encode_statistic(key: str, tensor: torch.Tensor, value_dtype: str) -> tuple[TensorEntry, dict[str, torch.Tensor]]:
    """The header entry and blobs of one statistic ``"param::stat"`` (sparse when that is smaller)."""
    return encode_tensor(key, compact(tensor), value_dtype)


def partial_document(
    header: UpdateHeader, value_dtype: str, entries: Mapping[str, TensorEntry], metadata: Mapping[str, str]
) -> dict[str, Any]:
    """The header document of a partial state (the container adds the CRC)."""
    return header_document(PARTIAL_FORMAT, header, value_dtype, entries, {"state": dict(metadata)})


def check_encodable(state: object, header: object) -> None:
    """Refuse what is not a merge state or a wire header (a plain ``ValueError``: the sender's bug)."""
    if not isinstance(state, MergeState):
        raise ValueError(f"state must be a fedfuse MergeState, got {type(state).__name__}")
    if not isinstance(header, UpdateHeader):
        raise ValueError(f"header must be a fedfuse.wire.UpdateHeader, got {type(header).__name__}")


def encode_partial(state: MergeState, *, header: UpdateHeader) -> bytes:
    """One safetensors payload for a partial state (statistics at the state's own precision)."""
    check_encodable(state, header)
    value_dtype = state.strategy.dtype_name
    entries: dict[str, TensorEntry] = {}
    blobs: dict[str, torch.Tensor] = {}
    for key, tensor in state.to_tensors().items():
        entries[key], tensor_blobs = encode_statistic(key, tensor, value_dtype)
        blobs.update(tensor_blobs)
    return pack(partial_document(header, value_dtype, entries, state.metadata()), blobs)


def bad_partial(message: str) -> UpdateRejected:
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
        raise bad_partial(f"partial state counters are not numbers: {exc}") from exc
    if not math.isfinite(total_weight) or total_weight < 0:
        raise bad_partial(f"partial state total weight must be finite and >= 0, got {metadata['total_weight']!r}")
    if num_updates < 0:
        raise bad_partial(f"partial state update count must be >= 0, got {num_updates}")
    return metadata


def parse_partial(document: dict[str, Any]) -> tuple[WireHeader, dict[str, str]]:
    """The parsed header of a partial state and its state metadata (counters checked)."""
    parsed = parse_header(document, PARTIAL_FORMAT, extra_keys={"state"})
    return parsed, _check_state_metadata(parsed)


def state_identity(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The identity (``{"strategy": name, **params}``) of the strategy that made a partial state."""
    try:
        identity = json.loads(metadata["fedfuse_state"])
    except ValueError as exc:
        raise bad_partial(f"partial state identity is not JSON: {exc}") from exc
    if not isinstance(identity, dict) or not isinstance(identity.get("strategy"), str):
        raise bad_partial(f"partial state identity must name its strategy, got {metadata['fedfuse_state']!r}")
    return identity


def _parameter_shapes(parsed: WireHeader, strategy: MergeStrategy) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape, checking its statistics are exactly the strategy's, of shapes that fit it."""
    grouped: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, entry in parsed.entries.items():
        name, separator, stat = key.rpartition(STAT_SEPARATOR)
        if not separator or stat not in strategy.statistics:
            raise bad_partial(f"statistic {key!r} is not one of {strategy.name!r}'s {list(strategy.statistics)}")
        if entry.encoding == "dare" or entry.fisher:
            raise bad_partial(f"statistic {key!r} cannot be DARE-coded or carry a Fisher diagonal")
        grouped.setdefault(name, {})[stat] = entry.shape
    shapes: dict[str, tuple[int, ...]] = {}
    for name, stats in grouped.items():
        missing = sorted(set(strategy.statistics) - set(stats))
        if missing:
            raise bad_partial(f"parameter {name!r} lacks statistics {missing}")
        try:
            shapes[name] = tuple(strategy.parameter_shape(name, stats))
        except ValueError as exc:
            raise bad_partial(str(exc)) from exc
    return shapes


def check_partial(
    parsed: WireHeader, blobs: Mapping[str, torch.Tensor], strategy: MergeStrategy, expect: Expectation
) -> dict[str, tuple[int, ...]]:
    """Check a parsed partial against the receiver's strategy and expectation; returns parameter shapes.

    Only the keys of ``blobs`` are looked at (a lazy mapping of a file's blobs reads nothing here).
    """
    if parsed.value_dtype != strategy.dtype_name:
        raise bad_partial(
            f"partial state is in {parsed.value_dtype}, the strategy accumulates in {strategy.dtype_name}"
        )
    shapes = _parameter_shapes(parsed, strategy)
    check_names_and_shapes(shapes, expect)
    check_blob_keys(parsed, blobs)
    return shapes


def rebuild_state(
    parsed: WireHeader,
    blobs: Mapping[str, torch.Tensor],
    strategy: MergeStrategy,
    metadata: Mapping[str, str],
    names: Iterable[str] | None = None,
) -> MergeState:
    """The merge state of the statistics of ``names`` (default: every parameter), from checked blobs."""
    if names is None:
        keys = list(parsed.entries)
    else:  # a checked partial has every statistic of each of its parameters
        keys = [f"{name}{STAT_SEPARATOR}{stat}" for name in names for stat in strategy.statistics]
    tensors = {}
    for key in keys:
        entry = parsed.entries.get(key)
        if entry is None:
            raise bad_partial(f"partial state has no statistic {key!r}")
        tensor, _ = decode_tensor(key, entry, blobs, parsed.value_dtype)
        tensors[key] = tensor.to_dense() if isinstance(tensor, SparseTensor) else tensor
    try:
        return MergeState.from_tensors(strategy, tensors, metadata)
    except ValueError as exc:
        raise bad_partial(str(exc)) from exc


def _decode(data: bytes, strategy: MergeStrategy, expect: Expectation) -> DecodedPartial:
    document, blobs = unpack(data, expect.max_bytes)
    parsed = parse_header(document, PARTIAL_FORMAT, extra_keys={"state"})
    check_expectation(parsed, expect)
    metadata = _check_state_metadata(parsed)
    check_partial(parsed, blobs, strategy, expect)
    state = rebuild_state(parsed, blobs, strategy, metadata)
    return DecodedPartial(state, parsed.header, memoryview(data).nbytes)


def check_decoder_arguments(strategy: object, expect: object) -> None:
    """Refuse a receiver's wrong argument types (a ``TypeError``: the receiver's bug, not the payload's)."""
    if not isinstance(strategy, MergeStrategy):
        raise TypeError(f"strategy must be a fedfuse MergeStrategy, got {type(strategy).__name__}")
    if not isinstance(expect, Expectation):
        raise TypeError(f"expect must be a fedfuse.wire.Expectation, got {type(expect).__name__}")


def decode_partial(data: bytes, *, strategy: MergeStrategy, expect: Expectation) -> DecodedPartial:
    """Decode and validate a partial state made by the same strategy (raises :class:`UpdateRejected`)."""
    check_decoder_arguments(strategy, expect)
    try:
        return _decode(data, strategy, expect)
    except UpdateRejected:
        raise
    except Exception as exc:
        message = f"could not decode the partial state: {type(exc).__name__}: {exc}"
        raise UpdateRejected("malformed_payload", message) from exc
