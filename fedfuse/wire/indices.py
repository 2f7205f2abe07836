"""Packing sorted flat indices: a bitmap (``np.packbits``) or LEB128 varints of the gaps.

Both directions are vectorized with numpy (a handful of whole-array passes, never a Python loop
per index). The encoder picks whichever is smaller: the bitmap costs ⌈n/8⌉ bytes whatever the
support, the delta code about one byte per kept entry while gaps stay below 128.

Delta code: gaps g₀ = i₀, gₖ = iₖ − iₖ₋₁, each a canonical unsigned LEB128 varint (7 bits per
byte, low bits first, high bit = "more bytes follow", at most 10 bytes). A zero gap after the first
means a duplicated index; a sum that wraps around 2⁶⁴ means unsorted input.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from fedfuse.wire.errors import UpdateRejected

IndexEncoding = Literal["bitmap", "delta"]

MAX_VARINT_BYTES = 10
"""A 64-bit value needs at most ⌈64/7⌉ = 10 LEB128 bytes."""


def check_indices(indices: np.ndarray, numel: int, what: str) -> None:
    """Encoder-side check (plain ``ValueError``): indices are sorted, unique and in ``[0, numel)``."""
    if indices.size == 0:
        return
    if indices[0] < 0 or indices[-1] >= numel:
        raise ValueError(f"{what}: indices must lie in [0, {numel}), got {indices.min()}..{indices.max()}")
    if indices.size > 1 and not bool((np.diff(indices) > 0).all()):
        raise ValueError(f"{what}: indices must be sorted and unique")


def bitmap_size(numel: int) -> int:
    """Bytes of a packed bitmap over ``numel`` entries."""
    return (numel + 7) // 8


def pack_bitmap(indices: np.ndarray, numel: int) -> np.ndarray:
    """One bit per entry, most significant bit first (``np.packbits``); padding bits are 0."""
    mask = np.zeros(bitmap_size(numel) * 8, dtype=bool)
    mask[indices] = True
    return np.packbits(mask)


def unpack_bitmap(blob: np.ndarray, numel: int, what: str) -> np.ndarray:
    """Flat int64 indices of the set bits; rejects a wrong length or set padding bits."""
    expected = bitmap_size(numel)
    if blob.size != expected:
        raise UpdateRejected("bitmap_padding", f"{what}: bitmap has {blob.size} bytes, expected {expected}")
    padding = expected * 8 - numel
    if padding and int(blob[-1]) & ((1 << padding) - 1):
        raise UpdateRejected("bitmap_padding", f"{what}: bitmap has bits set past entry {numel}")
    bits = np.unpackbits(blob, count=numel).view(bool)
    return np.flatnonzero(bits).astype(np.int64, copy=False)


def varint_sizes(values: np.ndarray) -> np.ndarray:
    """LEB128 byte count of each uint64 value (1 for 0)."""
    sizes = np.ones(values.size, dtype=np.int64)
    if values.size == 0:
        return sizes
    largest = int(values.max())
    for k in range(1, MAX_VARINT_BYTES):
        threshold = 1 << (7 * k)
        if largest < threshold:
            break
        sizes += values >= np.uint64(threshold)
    return sizes


def encode_varints(values: np.ndarray, sizes: np.ndarray | None = None) -> np.ndarray:
    """Canonical LEB128 bytes of uint64 ``values``, concatenated."""
    values = values.astype(np.uint64, copy=False)
    if sizes is None:
        sizes = varint_sizes(values)
    total = int(sizes.sum())
    if total == values.size:
        return values.astype(np.uint8)
    out = np.empty(total, dtype=np.uint8)
    starts = np.cumsum(sizes) - sizes
    out[starts] = (values & np.uint64(0x7F)).astype(np.uint8) | np.where(sizes > 1, 0x80, 0).astype(np.uint8)
    longer = np.flatnonzero(sizes > 1)
    for j in range(1, int(sizes.max())):
        longer = longer[sizes[longer] > j]
        chunk = ((values[longer] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        more = np.where(sizes[longer] > j + 1, 0x80, 0).astype(np.uint8)
        out[starts[longer] + j] = chunk | more
    return out


def decode_varints(blob: np.ndarray, what: str) -> np.ndarray:
    """uint64 values of concatenated canonical LEB128 varints; rejects malformed streams."""
    if blob.size == 0:
        return np.zeros(0, dtype=np.uint64)
    more = blob >= 0x80
    if not bool(more.any()):
        return blob.astype(np.uint64)
    if bool(more[-1]):
        raise UpdateRejected("malformed_indices", f"{what}: the last varint is cut off")
    ends = np.flatnonzero(~more)
    lengths = np.diff(ends, prepend=-1)
    if int(lengths.max()) > MAX_VARINT_BYTES:
        raise UpdateRejected("malformed_indices", f"{what}: a varint is longer than {MAX_VARINT_BYTES} bytes")
    multi = ends[lengths > 1]
    if bool((blob[multi] == 0).any()):
        raise UpdateRejected("malformed_indices", f"{what}: a varint is not in its shortest form")
    starts = ends - lengths + 1
    position = np.arange(blob.size, dtype=np.int64) - np.repeat(starts, lengths)
    if int(lengths.max()) == MAX_VARINT_BYTES and bool((blob[position == MAX_VARINT_BYTES - 1] > 1).any()):
        raise UpdateRejected("malformed_indices", f"{what}: a varint exceeds 64 bits")
    parts = (blob & 0x7F).astype(np.uint64) << (position * 7).astype(np.uint64)
    return np.add.reduceat(parts, starts)


def gaps_of(indices: np.ndarray) -> np.ndarray:
    """Delta gaps (first index, then differences) as uint64."""
    return np.diff(indices, prepend=np.int64(0)).astype(np.uint64)


def delta_decode(blob: np.ndarray, numel: int, what: str) -> np.ndarray:
    """Flat int64 indices from their varint gaps, checked unique, sorted and below ``numel``."""
    gaps = decode_varints(blob, what)
    if gaps.size == 0:
        return np.zeros(0, dtype=np.int64)
    if gaps.size > 1 and bool((gaps[1:] == 0).any()):
        raise UpdateRejected("duplicate_indices", f"{what}: an index is repeated")
    indices = np.cumsum(gaps, dtype=np.uint64)
    if gaps.size > 1 and bool((indices[1:] <= indices[:-1]).any()):
        raise UpdateRejected("unsorted_indices", f"{what}: indices are not increasing (the gap sum wrapped)")
    if int(indices[-1]) >= numel:
        raise UpdateRejected(
            "index_out_of_range", f"{what}: index {int(indices[-1])} is out of range for {numel} entries"
        )
    return indices.astype(np.int64)


def encode_indices(indices: np.ndarray, numel: int) -> tuple[IndexEncoding, np.ndarray]:
    """The smaller of the delta code and the bitmap (delta on a tie) for sorted unique ``indices``."""
    gaps = gaps_of(indices)
    sizes = varint_sizes(gaps)
    if int(sizes.sum()) <= bitmap_size(numel):
        return "delta", encode_varints(gaps, sizes)
    return "bitmap", pack_bitmap(indices, numel)


def decode_indices(encoding: IndexEncoding, blob: np.ndarray, numel: int, what: str) -> np.ndarray:
    """Inverse of :func:`encode_indices`."""
    if encoding == "bitmap":
        return unpack_bitmap(blob, numel, what)
    return delta_decode(blob, numel, what)
