"""A sparse tensor as sorted flat indices plus values, and the helpers that add it into dense state."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparseTensor:
    """A tensor of ``shape`` that is zero except at ``indices`` (flat, sorted, unique, int64).

    ``dare_seed``/``dare_density`` are set when the support came from a seeded DARE mask: the
    indices can then be regenerated from the seed alone, so the wire format sends no indices.
    """

    indices: torch.Tensor
    values: torch.Tensor
    shape: torch.Size
    dare_seed: int | None = None
    dare_density: float | None = None

    def __post_init__(self) -> None:
        if self.indices.dim() != 1 or self.values.dim() != 1:
            raise ValueError("SparseTensor indices and values must be 1-D")
        if self.indices.numel() != self.values.numel():
            raise ValueError(f"SparseTensor has {self.indices.numel()} indices but {self.values.numel()} values")
        if self.indices.dtype != torch.int64:
            raise ValueError(f"SparseTensor indices must be int64, got {self.indices.dtype}")
        shape = torch.Size(self.shape)
        object.__setattr__(self, "shape", shape)
        if self.indices.numel() > 1 and not bool((self.indices[1:] > self.indices[:-1]).all()):
            raise ValueError("SparseTensor indices must be sorted and unique")
        if self.indices.numel() and (int(self.indices[0]) < 0 or int(self.indices[-1]) >= shape.numel()):
            raise ValueError(
                f"SparseTensor index out of range for shape {tuple(shape)}: "
                f"[{int(self.indices[0])}, {int(self.indices[-1])}] not within [0, {shape.numel()})"
            )

    @property
    def numel(self) -> int:
        """Number of entries of the dense tensor this represents."""
        return self.shape.numel()

    @property
    def nnz(self) -> int:
        """Number of stored (kept) entries."""
        return self.values.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def to_dense(self) -> torch.Tensor:
        """The dense tensor (allocates ``numel`` entries: for tests and small tensors)."""
        dense = torch.zeros(self.numel, dtype=self.values.dtype, device=self.values.device)
        dense[self.indices.to(dense.device)] = self.values
        return dense.reshape(self.shape)


UpdateTensor = torch.Tensor | SparseTensor
"""One tensor of an update: dense, or sparse (kept entries only)."""

Update = Mapping[str, UpdateTensor]
"""A task vector keyed by parameter name, each tensor dense or sparse."""


def to_dense(tensor: UpdateTensor) -> torch.Tensor:
    """Dense view of an update tensor (a no-op for dense tensors)."""
    return tensor.to_dense() if isinstance(tensor, SparseTensor) else tensor


def fisher_on_support(name: str, fisher: UpdateTensor, tensor: UpdateTensor) -> torch.Tensor:
    """The Fisher diagonal's values on the entries ``tensor`` keeps: flat, in the update's order.

    A dense Fisher with a dense update is a flat view; with a sparse update it is gathered at the
    update's indices; a sparse Fisher must share the update's indices and gives its values. Raises
    ``ValueError`` naming tensor ``name`` when the shapes or supports differ, or when a dense Fisher
    is not floating point. Used by the wire encoder and by the merge state, so both agree.
    """
    if tuple(fisher.shape) != tuple(tensor.shape):
        raise ValueError(f"tensor {name!r}: Fisher shape {tuple(fisher.shape)} but update shape {tuple(tensor.shape)}")
    if isinstance(fisher, SparseTensor):
        same_support = isinstance(tensor, SparseTensor) and torch.equal(
            fisher.indices.to(tensor.indices.device), tensor.indices
        )
        if not same_support:
            raise ValueError(f"tensor {name!r}: a sparse Fisher diagonal must share the update's indices")
        return fisher.values
    if not isinstance(fisher, torch.Tensor) or not fisher.is_floating_point():
        raise ValueError(f"tensor {name!r}: the Fisher diagonal must be a floating tensor or a SparseTensor")
    flat = fisher.reshape(-1)
    if isinstance(tensor, SparseTensor):
        flat = flat[tensor.indices.to(flat.device)]
    return flat
