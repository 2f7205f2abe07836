"""One tensor to and from its byte blobs: dense values, or kept values + packed indices, or DARE values.

Blob keys: ``"v:<name>"`` values, ``"i:<name>"`` packed indices (bitmap/delta only) and
``"f:<name>"`` the Fisher diagonal on the same support (values only), ``"g:<name>"`` the float32
in × in Gram matrix of a 2-D tensor's inputs (RegMean). A DARE tensor sends no indices: the decoder
regenerates them with :func:`fedfuse.algebra.dare_indices`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from fedfuse.algebra import SparseTensor, UpdateTensor, dare_indices
from fedfuse.algebra.regmean import check_gram
from fedfuse.algebra.sparse import fisher_on_support
from fedfuse.wire.errors import UpdateRejected
from fedfuse.wire.header import TensorEntry
from fedfuse.wire.indices import bitmap_size, check_indices, decode_indices, encode_indices
from fedfuse.wire.values import blob_to_values, check_finite, values_to_blob


def values_key(name: str) -> str:
    return f"v:{name}"


def indices_key(name: str) -> str:
    return f"i:{name}"


def fisher_key(name: str) -> str:
    return f"f:{name}"


def gram_key(name: str) -> str:
    return f"g:{name}"


def blob_keys(name: str, entry: TensorEntry) -> list[str]:
    """The blobs a tensor with this entry must have (and no others)."""
    keys = [values_key(name)]
    if entry.encoding in ("bitmap", "delta"):
        keys.append(indices_key(name))
    if entry.fisher:
        keys.append(fisher_key(name))
    if entry.gram:
        keys.append(gram_key(name))
    return keys


def encode_tensor(
    name: str,
    tensor: UpdateTensor,
    value_dtype: str,
    fisher: UpdateTensor | None = None,
    gram: torch.Tensor | None = None,
) -> tuple[TensorEntry, dict[str, torch.Tensor]]:
    """The header entry and blobs of one tensor (dense stays dense; DARE sends seed, not indices).

    ``gram`` (2-D tensors only) is sent dense in float32, whatever ``value_dtype``: its entries are
    sums of squares that overflow 16-bit floats.
    """
    has_fisher = fisher is not None
    blobs: dict[str, torch.Tensor] = {}
    shape = tuple(int(d) for d in tensor.shape)
    if isinstance(tensor, SparseTensor):
        if not tensor.values.is_floating_point():
            raise ValueError(f"tensor {name!r}: values must be floating point, got {tensor.values.dtype}")
        if tensor.dare_seed is not None:
            seed, density = tensor.dare_seed, tensor.dare_density
            if not isinstance(seed, int) or not 0 <= seed < 2**64:
                raise ValueError(f"tensor {name!r}: DARE seed must be an int in [0, 2**64), got {seed!r}")
            if density is None or not 0 < density <= 1:
                raise ValueError(f"tensor {name!r}: DARE density must be in (0, 1], got {density!r}")
            entry = TensorEntry(shape, "dare", tensor.nnz, seed, float(density), has_fisher)
        else:
            indices = tensor.indices.detach().cpu().numpy()
            check_indices(indices, tensor.numel, f"tensor {name!r}")
            encoding, packed = encode_indices(indices, tensor.numel)
            blobs[indices_key(name)] = torch.from_numpy(packed)
            entry = TensorEntry(shape, encoding, tensor.nnz, fisher=has_fisher)
        values = tensor.values
    elif isinstance(tensor, torch.Tensor):
        if not tensor.is_floating_point():
            raise ValueError(f"tensor {name!r}: update tensors must be floating point, got {tensor.dtype}")
        entry = TensorEntry(shape, "dense", tensor.numel(), fisher=has_fisher)
        values = tensor
    else:
        raise ValueError(f"tensor {name!r}: expected a torch.Tensor or SparseTensor, got {type(tensor).__name__}")
    blobs[values_key(name)] = values_to_blob(values, value_dtype)
    if fisher is not None:
        blobs[fisher_key(name)] = values_to_blob(fisher_on_support(name, fisher, tensor), value_dtype)
    if gram is not None:
        check_gram(name, gram, tensor)
        blobs[gram_key(name)] = values_to_blob(gram.detach().reshape(-1).cpu(), "float32")
        entry = dataclasses.replace(entry, gram=True)
    return entry, blobs


def decode_gram(name: str, entry: TensorEntry, blobs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The in × in float32 Gram matrix sent with a 2-D tensor, validated (count, finite, diagonal ≥ 0)."""
    what = f"tensor {name!r} Gram matrix"
    size = entry.shape[-1]
    values = blob_to_values(blobs[gram_key(name)], "float32", what)
    if values.numel() != size * size:
        raise UpdateRejected("value_count", f"{what}: {values.numel()} values for a {size} × {size} matrix")
    check_finite(values, what)
    gram = values.reshape(size, size)
    if size and float(torch.diagonal(gram).min()) < 0:
        raise UpdateRejected("bad_gram", f"{what} has a negative diagonal entry (not XᵀX)")
    return gram


def _support(name: str, entry: TensorEntry, blobs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    what = f"tensor {name!r}"
    if entry.encoding == "dare":
        assert entry.density is not None and entry.seed is not None  # parse_header guarantees both for DARE
        indices = dare_indices(entry.numel, entry.density, entry.seed)
        if indices.numel() != entry.nnz:
            raise UpdateRejected(
                "dare_count_mismatch",
                f"{what}: {entry.nnz} DARE values but the mask regenerated from seed {entry.seed} "
                f"keeps {indices.numel()}",
            )
        return indices
    assert entry.encoding in ("bitmap", "delta")  # dense tensors never reach here
    positions = decode_indices(entry.encoding, blobs[indices_key(name)].numpy(), entry.numel, what)
    if positions.size != entry.nnz:
        raise UpdateRejected("value_count", f"{what}: {positions.size} indices but {entry.nnz} values")
    return torch.from_numpy(positions)


def decode_tensor(
    name: str, entry: TensorEntry, blobs: Mapping[str, torch.Tensor], value_dtype: str
) -> tuple[UpdateTensor, UpdateTensor | None]:
    """The tensor (values in ``value_dtype``) and its Fisher diagonal (same form), fully validated."""
    what = f"tensor {name!r}"
    values = blob_to_values(blobs[values_key(name)], value_dtype, what)
    if values.numel() != entry.nnz:
        raise UpdateRejected("value_count", f"{what}: {values.numel()} values but the header says {entry.nnz}")
    if entry.encoding == "dense" and entry.nnz != entry.numel:
        raise UpdateRejected("value_count", f"{what}: dense with {entry.nnz} values for {entry.numel} entries")
    check_finite(values, what)
    fisher_values = None
    if entry.fisher:
        fisher_values = blob_to_values(blobs[fisher_key(name)], value_dtype, f"{what} Fisher")
        if fisher_values.numel() != entry.nnz:
            raise UpdateRejected(
                "value_count", f"{what}: {fisher_values.numel()} Fisher values but {entry.nnz} update values"
            )
        check_finite(fisher_values, f"{what} Fisher")
        if bool((fisher_values < 0).any()):
            raise UpdateRejected("negative_fisher", f"{what}: the Fisher diagonal has negative entries")
    if entry.encoding == "dense":
        dense_fisher = None if fisher_values is None else fisher_values.reshape(entry.shape)
        return values.reshape(entry.shape), dense_fisher
    indices = _support(name, entry, blobs)
    seed, density = (entry.seed, entry.density) if entry.encoding == "dare" else (None, None)
    tensor = SparseTensor(indices, values, torch.Size(entry.shape), dare_seed=seed, dare_density=density)
    fisher = None if fisher_values is None else SparseTensor(indices, fisher_values, torch.Size(entry.shape))
    return tensor, fisher


def compact(tensor: torch.Tensor) -> UpdateTensor:
    """A dense tensor as a SparseTensor of its nonzeros when that is smaller on the wire, else unchanged."""
    flat = tensor.detach().reshape(-1).cpu()
    indices = flat.nonzero().squeeze(1)
    itemsize = flat.element_size()
    if indices.numel() * itemsize + bitmap_size(flat.numel()) >= flat.numel() * itemsize:
        return tensor
    return SparseTensor(indices, flat[indices], tensor.shape)
