"""Gaussian noise for differential privacy, added in place to dense tensors or to a sparse tensor's support."""

from __future__ import annotations

from dataclasses import replace
from typing import overload

import torch

from fedfuse.algebra.sparse import SparseTensor, UpdateTensor


@overload
def add_gaussian_noise(tensor: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor: ...
@overload
def add_gaussian_noise(tensor: SparseTensor, std: float, generator: torch.Generator) -> SparseTensor: ...
def add_gaussian_noise(tensor: UpdateTensor, std: float, generator: torch.Generator) -> UpdateTensor:
    """``tensor`` + N(0, std²) on every entry it carries (a sparse tensor: on its support only).

    Noise is drawn in float64 and added in the tensor's dtype; ``std`` = 0 returns the tensor unchanged.
    """
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    if std == 0:
        return tensor
    values = tensor.values if isinstance(tensor, SparseTensor) else tensor
    noise = torch.randn(values.shape, generator=generator, dtype=torch.float64) * std
    noisy = values + noise.to(device=values.device, dtype=values.dtype)
    return replace(tensor, values=noisy) if isinstance(tensor, SparseTensor) else noisy
