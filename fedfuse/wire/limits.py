"""The largest well-formed payload for a set of expected tensors: the server's default size cap.

A receiver refuses anything larger before parsing it (``Expectation.max_bytes``), so an oversized
payload costs no allocation. The bound is generous — dense values at the widest dtype the payload
kind allows, plus a bitmap, plus header room — so no honest payload reaches it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

HEADER_ROOM = 256 * 1024
"""Bytes allowed for the container, the JSON header and the client's metrics, whatever the tensors."""

PER_TENSOR_ROOM = 1024
"""Header and blob-table bytes allowed per tensor (its name, shape, encoding, offsets)."""


def max_update_bytes(shapes: Mapping[str, tuple[int, ...]], *, fisher: bool = True, gram: bool = False) -> int:
    """The largest update payload for ``shapes``: float32 values (and a Fisher diagonal), a bitmap, headers.

    ``gram``: each 2-D tensor may also carry a float32 in × in Gram matrix (RegMean).
    """
    values_per_entry = 4 * (2 if fisher else 1)
    return (
        HEADER_ROOM
        + sum(
            math.prod(shape) * values_per_entry + math.prod(shape) // 8 + 1 + PER_TENSOR_ROOM
            for shape in shapes.values()
        )
        + (_gram_bytes(shapes, 4) if gram else 0)
    )


def max_partial_bytes(shapes: Mapping[str, tuple[int, ...]], statistics: int, *, gram: bool = False) -> int:
    """The largest partial-state payload: ``statistics`` float64 tensors per parameter, headers.

    ``gram``: each 2-D parameter may also have a float64 in × in statistic (RegMean's Σ G̃).
    """
    per_parameter = max(1, statistics)
    return (
        HEADER_ROOM
        + sum(per_parameter * (math.prod(shape) * 8 + PER_TENSOR_ROOM) for shape in shapes.values())
        + (_gram_bytes(shapes, 8) if gram else 0)
    )


def _gram_bytes(shapes: Mapping[str, tuple[int, ...]], itemsize: int) -> int:
    return sum(shape[-1] ** 2 * itemsize + PER_TENSOR_ROOM for shape in shapes.values() if len(shape) == 2)
