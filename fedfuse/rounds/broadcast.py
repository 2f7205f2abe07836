"""What the server sends nodes after a round: the round's change to the model, in its smallest form.

Every node already holds the run's model (the base plus the changes broadcast so far), so a round's
broadcast is only the change the merge made. A linear merge of exact LoRA updates is exactly a product
of stacked factors (:mod:`fedfuse.strategies.factored`), sent as B and A (``factors``; the node applies
W ← W + B·A). Other merges give a full-rank matrix, sent dense (exact) or, by choice, as its rank-R
truncated SVD (``svd``) whose residual the server keeps and adds to the next round's change (server-side
error feedback, so nothing is lost, only delayed). ``broadcast-dtype`` rounds what is sent (bfloat16,
float16); the server applies exactly what it sent, so it and every node hold the same model.

Applying a change is one function, :func:`apply_delta`, on the server and on every node: a factored
matrix is formed in float64 and rounded once to float32 (:meth:`LowRank.dense`), then added as a dense
one is, so the same round sent as factors or dense lands on the same bits, and a different BLAS blocking
or thread count (other CPUs, a GPU) gives the same float32 bits except in rare ties (≤ 1 ulp, cleared by
any dense re-sync).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from fedfuse.algebra.low_rank import LowRank, factors_are_smaller, frobenius_norm, truncate

BroadcastMode = Literal["auto", "dense", "factors", "svd"]
BROADCAST_MODES = ("auto", "dense", "factors", "svd")
BROADCAST_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FACTOR_B, FACTOR_A = "@B", "@A"
"""Suffixes of a factored matrix's two arrays on the wire (``<name>@B``, ``<name>@A``)."""

DeltaTensor = torch.Tensor | LowRank


@dataclass(frozen=True)
class BroadcastPolicy:
    """How each round's change travels to the nodes (run config ``broadcast``, ``-rank``, ``-dtype``).

    Parameters
    ----------
    mode : {"auto", "dense", "factors", "svd"}
        ``auto``: factors wherever the merge is low-rank and they are smaller, dense elsewhere;
        ``dense``: every matrix dense; ``factors``: as auto, for runs that must never send a dense matrix
        of a low-rank merge (settings refuse it for merges that are not low-rank); ``svd``: every matrix
        as its rank-``rank`` truncated SVD, the residual kept for the next round.
    rank : int
        R of ``svd``.
    dtype : {"float32", "bfloat16", "float16"}
        The precision of what is sent (the server accumulates in float32 regardless).
    """

    mode: str = "auto"
    rank: int = 16
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.mode not in BROADCAST_MODES:
            raise ValueError(f"broadcast must be one of {', '.join(BROADCAST_MODES)}; got {self.mode!r}")
        if self.dtype not in BROADCAST_DTYPES:
            raise ValueError(f"broadcast-dtype must be one of {', '.join(BROADCAST_DTYPES)}; got {self.dtype!r}")
        if self.rank < 1:
            raise ValueError(f"broadcast-rank must be >= 1, got {self.rank}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype of the arrays sent."""
        return BROADCAST_DTYPES[self.dtype]


@dataclass(frozen=True)
class Delta:
    """One round's change to the model as it travels: by parameter name, dense or as factors."""

    tensors: Mapping[str, DeltaTensor]

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays sent."""
        return sum(array.numel() * array.element_size() for array in self.arrays().values())

    def arrays(self) -> dict[str, torch.Tensor]:
        """The arrays that travel: a dense change under its name, a factored one as ``<name>@B`` and ``<name>@A``."""
        out: dict[str, torch.Tensor] = {}
        for name, tensor in self.tensors.items():
            if isinstance(tensor, LowRank):
                out[name + FACTOR_B], out[name + FACTOR_A] = tensor.b, tensor.a
            else:
                out[name] = tensor
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, torch.Tensor]) -> Delta:
        """Read back :meth:`arrays` (a factor without its partner is an error)."""
        tensors: dict[str, DeltaTensor] = {}
        for name, array in arrays.items():
            if name.endswith(FACTOR_A):
                continue
            if name.endswith(FACTOR_B):
                base = name.removesuffix(FACTOR_B)
                partner = arrays.get(base + FACTOR_A)
                if partner is None:
                    raise ValueError(f"broadcast factor {name!r} arrived without {base + FACTOR_A!r}")
                tensors[base] = LowRank(array, partner)
            else:
                tensors[name] = array
        unpaired = [n for n in arrays if n.endswith(FACTOR_A) and n.removesuffix(FACTOR_A) not in tensors]
        if unpaired:
            raise ValueError(f"broadcast factor {unpaired[0]!r} arrived without its B")
        return cls(tensors)


def apply_delta(change: MutableMapping[str, torch.Tensor], delta: Delta) -> None:
    """Add ``delta`` to ``change`` in place (float32 sums; factors formed in float64): the one way a change lands.

    A name ``change`` lacks starts from zero; a shape that does not fit is an error (nothing is changed).
    """
    for name, tensor in delta.tensors.items():
        known = change.get(name)
        if known is not None and tuple(known.shape) != tuple(tensor.shape):
            raise ValueError(
                f"broadcast changes {name!r} of shape {tuple(tensor.shape)}, the model's is {tuple(known.shape)}"
            )
    for name, tensor in delta.tensors.items():
        wide = (tensor.dense() if isinstance(tensor, LowRank) else tensor).to(torch.float64)
        known = change.get(name)
        if known is None:
            change[name] = wide.to(torch.float32)
        else:
            known.copy_((known.to(torch.float64) + wide.to(known.device)).to(torch.float32))


@dataclass
class Broadcaster:
    """Turns each round's merged change into the :class:`Delta` sent, keeping the SVD residual between rounds."""

    policy: BroadcastPolicy = field(default_factory=BroadcastPolicy)
    residual: dict[str, torch.Tensor] = field(default_factory=dict)
    """What ``svd`` left out so far, added to the next round's change (float32)."""

    def delta(self, merged: Mapping[str, DeltaTensor]) -> tuple[Delta, float]:
        """The delta to send for ``merged`` and its relative error ‖merged + residual − sent‖ / ‖merged + residual‖."""
        sent: dict[str, DeltaTensor] = {}
        lossy = self.policy.mode == "svd" or self.policy.torch_dtype != torch.float32
        wanted_sq = error_sq = 0.0
        for name, tensor in merged.items():  # one matrix at a time: temporaries stay one matrix large
            target = self._with_residual(name, tensor)
            sent[name], lost = self._form(target)
            if not lossy:  # nothing is lost, so no norm is needed (a high-rank one costs O(R²·(in + out)))
                continue
            wanted_sq += _norm_sq(target)
            if lost is None:
                continue
            error_sq += float(torch.linalg.vector_norm(lost)) ** 2
            if self.policy.mode == "svd":
                self.residual[name] = lost
        relative = math.sqrt(error_sq / wanted_sq) if wanted_sq > 0 else 0.0
        return Delta(sent), relative

    def _with_residual(self, name: str, tensor: DeltaTensor) -> DeltaTensor:
        """The round's change of ``name`` plus what earlier SVD broadcasts left out of it."""
        kept = self.residual.pop(name, None)
        if kept is None:
            return tensor
        dense = tensor.dense() if isinstance(tensor, LowRank) else tensor.float()
        return dense.add_(kept) if dense is not tensor else dense + kept

    def _form(self, target: DeltaTensor) -> tuple[DeltaTensor, torch.Tensor | None]:
        """How one change travels (in the broadcast dtype), and what that leaves out (None: nothing)."""
        dtype, mode = self.policy.torch_dtype, self.policy.mode
        if isinstance(target, LowRank) and (
            mode in ("auto", "factors") or (mode == "svd" and target.rank <= self.policy.rank)
        ):
            sent = target.to(dtype)
            return sent, None if dtype == target.b.dtype else target.dense() - sent.dense()
        dense = target.dense() if isinstance(target, LowRank) else target
        if mode == "svd" and dense.ndim == 2 and factors_are_smaller(dense.shape, self.policy.rank):
            truncation = truncate(dense, self.policy.rank)
            factors = truncation.factors.to(dtype)
            lost = truncation.residual if dtype == torch.float32 else dense.float() - factors.dense()
            return factors, lost
        sent_dense = dense.to(dtype)
        return sent_dense, None if sent_dense.dtype == dense.dtype else dense.float() - sent_dense.float()


def _norm_sq(tensor: DeltaTensor) -> float:
    return frobenius_norm(tensor) ** 2 if isinstance(tensor, LowRank) else float(torch.linalg.vector_norm(tensor)) ** 2
