"""Encode one client update (task vector + optional Fisher diagonal and Gram matrices) to bytes, and back.

Decoded values keep their wire dtype (fp32, fp16 or bf16): no silent widening, half the memory for
16-bit payloads, and every strategy accepts any float dtype (it accumulates at its own precision).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedfuse.algebra import UpdateTensor
from fedfuse.wire.container import pack, unpack
from fedfuse.wire.errors import UpdateRejected
from fedfuse.wire.header import (
    UPDATE_FORMAT,
    Expectation,
    TensorEntry,
    UpdateHeader,
    WireHeader,
    check_expectation,
    check_names_and_shapes,
    check_sparsifier,
    header_document,
    parse_header,
)
from fedfuse.wire.tensors import blob_keys, decode_gram, decode_tensor, encode_tensor
from fedfuse.wire.values import UPDATE_VALUE_DTYPES


@dataclass(frozen=True)
class DecodedUpdate:
    """A validated update: tensors (dense or sparse, values in ``value_dtype``), Fisher, header, Grams.

    ``fisher`` maps a name to its Fisher diagonal in the same form as the tensor (a SparseTensor
    sharing the update's indices, or a dense tensor), or is None when the sender sent none; pass it
    straight to ``state.add(update.tensors, weight, update.fisher)``. ``entries`` says how each
    tensor travelled (dense/bitmap/delta/dare, nnz); ``nbytes`` is the payload size. ``grams`` maps
    2-D tensors to the float32 in × in Gram matrix of their inputs (RegMean), empty when none was sent.
    """

    tensors: dict[str, UpdateTensor]
    fisher: dict[str, UpdateTensor] | None
    header: UpdateHeader
    value_dtype: str
    entries: dict[str, TensorEntry]
    nbytes: int
    grams: dict[str, torch.Tensor] = field(default_factory=dict)


def encode_update(
    tensors: Mapping[str, UpdateTensor],
    *,
    header: UpdateHeader,
    value_dtype: str = "float32",
    fisher: Mapping[str, UpdateTensor] | None = None,
    grams: Mapping[str, torch.Tensor] | None = None,
) -> bytes:
    """One safetensors payload for an update.

    Dense tensors go dense; a SparseTensor goes as its kept values plus the smaller of a bitmap
    and delta-coded indices, or — when it carries ``dare_seed`` — values only (its indices must be
    those :func:`fedfuse.algebra.dare_indices` regenerates, as :func:`fedfuse.algebra.dare_drop`
    makes them). ``fisher`` (optional) holds the Fisher diagonal of some or all tensors, dense or
    on the same support; only its values on the support are sent, in ``value_dtype`` too. ``grams``
    (optional) maps 2-D tensors to the in × in Gram matrix of their inputs, sent in float32.
    """
    if not isinstance(header, UpdateHeader):
        raise ValueError(f"header must be a fedfuse.wire.UpdateHeader, got {type(header).__name__}")
    if value_dtype not in UPDATE_VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {list(UPDATE_VALUE_DTYPES)}, got {value_dtype!r}")
    fisher = dict(fisher or {})
    unknown = sorted(set(fisher) - set(tensors))
    if unknown:
        raise ValueError(f"Fisher diagonal names tensors the update lacks: {', '.join(unknown[:5])}")
    grams = dict(grams or {})
    unknown = sorted(set(grams) - set(tensors))
    if unknown:
        raise ValueError(f"Gram matrices name tensors the update lacks: {', '.join(unknown[:5])}")
    entries: dict[str, TensorEntry] = {}
    blobs: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise ValueError(f"tensor names must be strings, got {name!r}")
        entries[name], tensor_blobs = encode_tensor(name, tensor, value_dtype, fisher.get(name), grams.get(name))
        blobs.update(tensor_blobs)
    return pack(header_document(UPDATE_FORMAT, header, value_dtype, entries), blobs)


def check_blob_keys(parsed: WireHeader, blobs: Mapping[str, torch.Tensor]) -> None:
    """Every blob the header implies is present, and no other."""
    expected = {key for name, entry in parsed.entries.items() for key in blob_keys(name, entry)}
    missing = sorted(expected - set(blobs))
    if missing:
        raise UpdateRejected("missing_tensor", f"payload lacks blob(s) {', '.join(map(repr, missing[:5]))}")
    extra = sorted(set(blobs) - expected)
    if extra:
        raise UpdateRejected("unexpected_tensor", f"payload has unexpected blob(s) {', '.join(map(repr, extra[:5]))}")


def _decode(data: bytes, expect: Expectation) -> DecodedUpdate:
    document, blobs = unpack(data, expect.max_bytes)
    parsed = parse_header(document, UPDATE_FORMAT)
    check_expectation(parsed, expect)
    check_names_and_shapes({name: entry.shape for name, entry in parsed.entries.items()}, expect)
    check_sparsifier(parsed, expect)
    check_blob_keys(parsed, blobs)
    tensors: dict[str, UpdateTensor] = {}
    fisher: dict[str, UpdateTensor] = {}
    for name, entry in parsed.entries.items():
        tensor, tensor_fisher = decode_tensor(name, entry, blobs, parsed.value_dtype)
        tensors[name] = tensor
        if tensor_fisher is not None:
            fisher[name] = tensor_fisher
    has_fisher = any(entry.fisher for entry in parsed.entries.values())
    grams = {name: decode_gram(name, entry, blobs) for name, entry in parsed.entries.items() if entry.gram}
    nbytes = memoryview(data).nbytes
    return DecodedUpdate(
        tensors, fisher if has_fisher else None, parsed.header, parsed.value_dtype, parsed.entries, nbytes, grams
    )


def decode_update(data: bytes, *, expect: Expectation) -> DecodedUpdate:
    """Decode and validate an update; any problem raises :class:`UpdateRejected` (never anything else).

    Checks, in order: size (before parsing), framing, CRC32, header fields and version, run,
    round and base fingerprint, tensor names and shapes against ``expect``, the sparsifier (when
    ``expect`` names one), blob dtypes, index
    validity (bounds, order, duplicates, bitmap padding, varint form), value counts (DARE: against
    the regenerated mask), finite values, non-negative Fisher, Gram matrices (size, finite, non-negative diagonal).
    """
    if not isinstance(expect, Expectation):
        raise TypeError(f"expect must be a fedfuse.wire.Expectation, got {type(expect).__name__}")
    try:
        return _decode(data, expect)
    except UpdateRejected:
        raise
    except Exception as exc:
        message = f"could not decode the payload: {type(exc).__name__}: {exc}"
        raise UpdateRejected("malformed_payload", message) from exc
