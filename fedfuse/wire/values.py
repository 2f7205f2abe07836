"""Float values to and from uint8 byte blobs (fp32, fp16, bf16; bf16 through torch, numpy lacks it).

Blobs are little-endian, as safetensors stores everything; torch views them without a copy.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from fedfuse.wire.errors import UpdateRejected

UPDATE_VALUE_DTYPES = ("float32", "float16", "bfloat16")
"""Value dtypes :func:`fedfuse.wire.encode_update` accepts: the one declaration (the ``wire-dtype`` setting,
``task_vector_mod`` and the docs read it)."""

VALUE_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in (*UPDATE_VALUE_DTYPES, "float64")}
"""Value dtypes the wire format knows: the update dtypes, and float64 for partial states."""

if sys.byteorder != "little":
    raise ImportError("fedfuse.wire assumes a little-endian machine (as safetensors blobs are)")


def values_to_blob(values: torch.Tensor, dtype_name: str) -> torch.Tensor:
    """The values (any shape, any float dtype, any device) cast to ``dtype_name`` as a flat uint8 CPU tensor."""
    cast = values.detach().reshape(-1).to(device="cpu", dtype=VALUE_DTYPES[dtype_name]).contiguous()
    return cast.view(torch.uint8)


def blob_to_values(blob: torch.Tensor, dtype_name: str, what: str) -> torch.Tensor:
    """View a uint8 blob as a flat tensor of ``dtype_name`` values (no copy); checks the length fits."""
    dtype = VALUE_DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if blob.numel() % itemsize:
        raise UpdateRejected(
            "value_count", f"{what}: {blob.numel()} bytes is not a whole number of {dtype_name} values"
        )
    if blob.numel() == 0:
        return torch.empty(0, dtype=dtype)
    return blob.view(dtype)


_EXPONENT_MASKS = {torch.bfloat16: 0x7F80}
"""Integer masks of the exponent bits for dtypes numpy cannot hold: all ones means Inf or NaN."""


def check_finite(values: torch.Tensor, what: str) -> None:
    """Reject NaN and ±Inf (a single-threaded numpy pass over CPU values, free of OpenMP stalls)."""
    if values.numel() == 0:
        return
    flat = values.detach().reshape(-1).cpu()
    mask = _EXPONENT_MASKS.get(flat.dtype)
    finite = np.isfinite(flat.numpy()) if mask is None else (flat.view(torch.int16).numpy() & mask) != mask
    if not bool(finite.all()):
        raise UpdateRejected("non_finite", f"{what}: {int((~finite).sum())} NaN/Inf value(s)")
