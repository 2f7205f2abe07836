"""Task vectors: the change of a tuned model against a base, and applying one back with a scale."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedfuse.algebra.names import name_mismatch
from fedfuse.algebra.sparse import SparseTensor, Update


def _check_same_keys(tuned: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> None:
    problem = name_mismatch(base, tuned, missing="missing from the tuned model", extra="not in the base model")
    if problem:
        raise ValueError(f"state dicts do not match ({problem})")


def task_vector(tuned: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """τ = θ_tuned − θ_base for every floating tensor, computed in fp32.

    Non-floating tensors (integer buffers such as position ids) carry no task vector and are
    skipped. Names and shapes must match; the error names the first offending tensor.
    """
    _check_same_keys(tuned, base)
    out: dict[str, torch.Tensor] = {}
    for name, base_tensor in base.items():
        tuned_tensor = tuned[name]
        if tuned_tensor.shape != base_tensor.shape:
            raise ValueError(
                f"tensor {name!r}: shape {tuple(tuned_tensor.shape)} in the tuned model "
                f"but {tuple(base_tensor.shape)} in the base"
            )
        if not base_tensor.is_floating_point():
            continue
        if not tuned_tensor.is_floating_point():
            raise ValueError(f"tensor {name!r}: floating in the base but {tuned_tensor.dtype} in the tuned model")
        out[name] = tuned_tensor.to(torch.float32) - base_tensor.to(torch.float32)
    return out


def apply_task_vector(
    base: Mapping[str, torch.Tensor], tau: Update, lam: float = 1.0, *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """θ = θ_base + λ·τ, in fp32 (fp64 weights in fp64), cast back to each base tensor's dtype (or to ``dtype``).

    Tensors absent from ``tau`` are copied from the base unchanged; a name in ``tau`` that the
    base lacks, or a shape mismatch, is an error.
    """
    unknown = sorted(set(tau) - set(base))
    if unknown:
        raise ValueError(f"task vector names tensors the base lacks: {', '.join(unknown[:5])}")
    out: dict[str, torch.Tensor] = {}
    for name, base_tensor in base.items():
        delta = tau.get(name)
        if delta is None:
            out[name] = base_tensor.clone()
            continue
        if delta.shape != base_tensor.shape:
            raise ValueError(
                f"tensor {name!r}: task vector shape {tuple(delta.shape)} but base shape {tuple(base_tensor.shape)}"
            )
        merged = base_tensor.to(torch.promote_types(base_tensor.dtype, torch.float32)).clone()
        if isinstance(delta, SparseTensor):
            flat = merged.view(-1)
            flat.index_add_(0, delta.indices.to(flat.device), delta.values.to(flat), alpha=lam)
        else:
            merged.add_(delta.to(merged), alpha=lam)
        out[name] = merged.to(dtype or base_tensor.dtype)
    return out
