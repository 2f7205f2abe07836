"""The round's weights as the server merges against them: in the merge's precision, fingerprinted once.

float64 models are merged in float64 and every other array in float32, then handed back in each array's
own dtype. When a Flower app calls ``aggregate_train`` without telling the strategy the round's weights,
a method whose result does not depend on them merges against zeros of the first reply's shapes
(the reference is *implicit*): the replied weights are then their own task vectors.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from flwr.app import Array, ArrayRecord, Message

from fedfuse.messages import array_record, record_tensors
from fedfuse.wire import fingerprint


def merge_dtype(tensors: Mapping[str, torch.Tensor]) -> str:
    """``"float64"`` when any array is float64 (it is merged at its own precision), else ``"float32"``."""
    return "float64" if any(t.dtype == torch.float64 for t in tensors.values()) else "float32"


def as_original(merged: torch.Tensor, dtype: torch.dtype) -> Array:
    """The merged weights as a Flower Array in the array's own dtype (integer arrays such as counters rounded)."""
    if not dtype.is_floating_point:
        merged = merged.round()
    return Array(merged.to(dtype).contiguous().numpy())


@dataclass(frozen=True)
class RoundReference:
    """The weights a round's task vectors are formed against and its merge is applied to."""

    tensors: dict[str, torch.Tensor]
    """By name, in the merge's precision (float32, or float64 for float64 models)."""
    dtypes: dict[str, torch.dtype]
    """Each array's own dtype, which the merged array is handed back in."""
    fingerprint: str
    record: ArrayRecord | None = None
    """The ArrayRecord the tensors were read from (None when implicit)."""
    implicit: bool = False
    """The round's weights are unknown: zeros stand in for them (reference-free methods only)."""

    @classmethod
    def of(cls, record: ArrayRecord) -> RoundReference:
        """The round's weights from the ArrayRecord that was (or will be) broadcast."""
        state = record_tensors(record)
        return cls._from_state(state, fingerprint(state), record)

    @classmethod
    def at_version(cls, version: str) -> RoundReference:
        """A round whose updates are made against model ``version`` (the server holds the change, not weights)."""
        return cls({}, {}, version)

    @classmethod
    def _from_state(
        cls, state: dict[str, torch.Tensor], print_: str, record: ArrayRecord | None, implicit: bool = False
    ) -> RoundReference:
        dtype = torch.float64 if merge_dtype(state) == "float64" else torch.float32
        tensors = {name: t.to(dtype) for name, t in state.items()}
        return cls(tensors, {name: t.dtype for name, t in state.items()}, print_, record, implicit)

    @classmethod
    def zeros_like_first(
        cls, replies: Iterator[Message], arrays_key: str, ignore_key: str
    ) -> tuple[RoundReference, Iterator[Message]]:
        """Zeros shaped like the first standard reply's arrays, and the replies with the peeked ones put back."""
        peeked: list[Message] = []
        for reply in replies:
            peeked.append(reply)
            if reply.has_error():
                continue
            weights = array_record(reply.content.array_records, arrays_key, ignore=[ignore_key])
            if weights is not None:
                zeros = {name: torch.zeros_like(t) for name, t in record_tensors(weights).items()}
                return cls._from_state(zeros, "", None, implicit=True), itertools.chain(peeked, replies)
        return cls({}, {}, "", None, implicit=True), iter(peeked)

    @property
    def merge_dtype(self) -> torch.dtype:
        """The precision the round merges in."""
        return next(iter(self.tensors.values())).dtype if self.tensors else torch.float32

    def in_merge_dtype(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` in the round's merge precision."""
        return {name: t.to(self.merge_dtype) for name, t in tensors.items()}

    def task_vector(self, trained: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """τ = trained − round weights for same-named, same-shaped arrays (the engine refuses the others)."""
        tau = {}
        for name, tensor in self.in_merge_dtype(trained).items():
            base = self.tensors.get(name)
            tau[name] = tensor - base if base is not None and base.shape == tensor.shape else tensor
        return tau

    def original_tensors(self) -> dict[str, torch.Tensor]:
        """The round's weights in their own dtypes (the same tensors when they are merged at that precision)."""
        return {name: t.to(self.dtypes[name]) for name, t in self.tensors.items()}

    def to_record(self, state: Mapping[str, torch.Tensor]) -> ArrayRecord:
        """Merged weights by name as an ArrayRecord in the reference's names, order and dtypes."""
        return ArrayRecord({name: as_original(state[name], self.dtypes[name]) for name in self.tensors})


def reply_sender(reply: Message, destinations: Mapping[str, int], index: int) -> str:
    """The node a reply answers for (see :func:`fedfuse.messages.reply_node`), or ``reply-<index>``.

    Replies built by hand (Flower's own strategy tests use ``Mock(spec=Message)``) carry no metadata
    worth reading: each is then a sender of its own.
    """
    metadata = reply.metadata
    node = destinations.get(metadata.reply_to_message_id, metadata.src_node_id)
    try:
        return str(int(node))
    except (TypeError, ValueError):
        return f"reply-{index}"
