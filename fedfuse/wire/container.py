"""The safetensors envelope shared by updates and partial states: uint8 blobs + a checksummed header.

Layout: one safetensors payload whose tensors are all 1-D uint8 byte blobs and whose
``__metadata__`` has one key, ``"fedfuse"``: the header as canonical JSON (sorted keys, no
whitespace) including ``"crc32"``, a CRC32 (zlib, 8 hex digits) over the canonical JSON of the
other header fields and every blob with its key, in sorted key order. Any corruption of the header
or the data is detected, and equal inputs give byte-identical payloads. Reading checks the size
limit before parsing and turns every safetensors/json failure into :class:`UpdateRejected`.

The same container lives in files too (:mod:`fedfuse.wire.container_file` writes and reads it blob
by blob, so a model-sized partial state never has to fit in memory).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch

from fedfuse.wire.errors import UpdateRejected

HEADER_KEY = "fedfuse"
CRC_FIELD = "crc32"


def canonical_json(document: Mapping[str, Any]) -> str:
    """The one serialization of a header: sorted keys, no whitespace, no NaN/Infinity."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)


def blob_frame(key: str, size: int) -> bytes:
    """What the CRC covers before each blob's bytes: its key and length, as JSON."""
    return json.dumps([key, size]).encode("utf-8")


def checksum(canonical: str, blobs: Mapping[str, torch.Tensor]) -> str:
    """CRC32 (zlib) over the canonical header and every (key, length, bytes) in sorted key order."""
    crc = zlib.crc32(canonical.encode("utf-8"))
    for key in sorted(blobs):
        blob = blobs[key]
        crc = zlib.crc32(blob_frame(key, blob.numel()), crc)
        if blob.numel():
            crc = zlib.crc32(blob.numpy().data, crc)
    return f"{crc:08x}"


def pack(document: Mapping[str, Any], blobs: Mapping[str, torch.Tensor]) -> bytes:
    """One safetensors payload holding ``blobs`` (1-D uint8 CPU tensors) and the checksummed header."""
    signed = {**document, CRC_FIELD: checksum(canonical_json(document), blobs)}
    return safetensors.torch.save(dict(blobs), metadata={HEADER_KEY: canonical_json(signed)})


def preamble(signed: Mapping[str, Any], sizes: Mapping[str, int]) -> bytes:
    """The safetensors preamble :func:`pack` writes for blobs of these sizes (laid out in sorted key order).

    8-byte little-endian length, then the JSON header (``__metadata__`` first, no spaces, padded
    with spaces to a multiple of 8), exactly as ``safetensors.torch.save`` serializes it.
    """
    header: dict[str, Any] = {"__metadata__": {HEADER_KEY: canonical_json(signed)}}
    offset = 0
    for key in sorted(sizes):
        header[key] = {"dtype": "U8", "shape": [sizes[key]], "data_offsets": [offset, offset + sizes[key]]}
        offset += sizes[key]
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def corrupted(message: str) -> UpdateRejected:
    return UpdateRejected("corrupted", message)


def _malformed(message: str) -> UpdateRejected:
    return UpdateRejected("malformed_header", message)


def header_length(prefix: bytes, size: int) -> int:
    """The container header's length from the first 8 bytes; rejects a payload too short to hold it."""
    if size < 8:
        raise UpdateRejected("truncated", f"payload has {size} bytes, fewer than the 8-byte header length")
    length = int.from_bytes(prefix[:8], "little")
    if length > size - 8:
        raise UpdateRejected("truncated", f"container header claims {length} bytes but {size - 8} follow")
    return length


def parse_container(text: bytes, size: int) -> tuple[dict, int]:
    """The container's JSON header and where its data ends; rejects truncation and bad framing."""
    try:
        container = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise corrupted(f"container header is not valid JSON: {exc}") from exc
    if not isinstance(container, dict):
        raise corrupted("container header is not a JSON object")
    end = 0
    for key, info in container.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise corrupted(f"container entry {key!r} has no valid data_offsets")
        end = max(end, offsets[1])
    expected = 8 + len(text) + end
    if expected > size:
        raise UpdateRejected("truncated", f"payload has {size} bytes but its container describes {expected}")
    return container, expected


def _load(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(data)
    except Exception as exc:
        raise corrupted(f"safetensors could not read the payload: {exc}") from exc
    except BaseException as exc:
        if type(exc).__name__ == "PanicException":
            raise corrupted(f"safetensors could not read the payload: {exc}") from None
        raise


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not allowed in a fedfuse header")


def header_document(metadata: Any) -> tuple[dict, str]:
    """The header document (without its CRC field) and the CRC it carries."""
    if not isinstance(metadata, dict) or set(metadata) != {HEADER_KEY} or not isinstance(metadata[HEADER_KEY], str):
        raise _malformed(f"payload metadata must hold exactly one string, {HEADER_KEY!r}")
    try:
        document = json.loads(metadata[HEADER_KEY], parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise _malformed(f"header is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise _malformed("header must be a JSON object")
    crc = document.pop(CRC_FIELD, None)
    if not isinstance(crc, str):
        raise _malformed(f"header has no {CRC_FIELD!r} string")
    return document, crc


def canonical_of(document: Mapping[str, Any]) -> str:
    """:func:`canonical_json` of a received header, as a rejection when it cannot be serialized."""
    try:
        return canonical_json(document)
    except ValueError as exc:
        raise _malformed(f"header cannot be serialized canonically: {exc}") from exc


def wrong_dtype(key: str, dtype: object, shape: tuple[int, ...]) -> UpdateRejected:
    return UpdateRejected("wrong_dtype", f"blob {key!r} is {dtype} of shape {shape}, expected 1-D uint8")


def unpack(data: bytes | bytearray | memoryview, max_bytes: int | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The header document and the byte blobs of a payload, size-, framing-, dtype- and CRC-checked."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UpdateRejected("not_bytes", f"expected bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if max_bytes is not None and size > max_bytes:
        raise UpdateRejected("too_large", f"payload has {size} bytes, more than the limit of {max_bytes}")
    data = data if isinstance(data, bytes) else bytes(data)
    length = header_length(data, size)
    container, end = parse_container(data[8 : 8 + length], size)
    if end < size:
        raise corrupted(f"{size - end} trailing byte(s) after the payload")
    blobs = _load(data)
    document, crc = header_document(container.get("__metadata__"))
    for key, blob in blobs.items():
        if blob.dtype != torch.uint8 or blob.dim() != 1:
            raise wrong_dtype(key, blob.dtype, tuple(blob.shape))
    if checksum(canonical_of(document), blobs) != crc:
        raise corrupted("CRC32 mismatch: the payload was altered or damaged")
    return document, blobs
