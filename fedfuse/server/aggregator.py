"""One round on the server: decode each payload, validate it, fold it, drop it.

The aggregator holds a single merge state whatever the number of clients, so server memory stays
flat when replies are folded as they arrive. A bad payload — undecodable, for another round or base,
the wrong shapes, non-finite, a second reply from the same node, or not fit for the strategy — is
rejected with a reason and a readable message, and the round goes on with the state untouched.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from fedfuse.strategies import MergeStrategy
from fedfuse.wire import (
    DecodedUpdate,
    Expectation,
    UpdateRejected,
    decode_partial,
    decode_update,
)

UpdateTransform = Callable[[DecodedUpdate], tuple[dict, dict | None]]
"""Maps a decoded update to the (tensors, fisher) the strategy folds, e.g. LoRA factors → ΔW."""

Weighting = Literal["num_examples", "uniform"]


@dataclass(frozen=True)
class Rejection:
    """Why one payload was not folded: ``reason`` is a short slug for counting, ``message`` is for humans."""

    node_id: str | None
    reason: str
    message: str


class RoundAggregator:
    """Fold client updates and gateway partial states of one round into one merge state.

    Parameters
    ----------
    strategy : MergeStrategy
        The merge method; its state is the only thing kept between payloads.
    expect : Expectation
        What every payload must match (tensor shapes, run, round, base fingerprint, size limit).
    weighting : {"num_examples", "uniform"}
        An update's weight: its number of examples (FedAvg's convention) or 1.
    transform : callable, optional
        Turns a decoded update into the tensors the strategy merges (default: as decoded). A
        ``ValueError`` from it rejects the update as ``incompatible_update``.
    partial_shapes : mapping, optional
        Shapes of the merged tensors, when a transform makes them differ from the updates' (a
        gateway's partial state holds statistics of the merged tensors, e.g. LoRA ΔW).
    """

    def __init__(
        self,
        strategy: MergeStrategy,
        expect: Expectation,
        *,
        weighting: Weighting = "num_examples",
        transform: UpdateTransform | None = None,
        partial_shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        if weighting not in ("num_examples", "uniform"):
            raise ValueError(f"weighting must be 'num_examples' or 'uniform', got {weighting!r}")
        self.strategy = strategy
        self.expect = expect
        self.weighting = weighting
        self.transform = transform
        self.partial_expect = expect if partial_shapes is None else dataclasses.replace(expect, shapes=partial_shapes)
        self.state = strategy.new_state()
        self.accepted_nodes: list[str] = []
        self.rejections: list[Rejection] = []
        self.bytes_received = 0

    def _count_received(self, payload: object) -> None:
        if isinstance(payload, (bytes, bytearray, memoryview)):
            self.bytes_received += len(payload)

    def _reject(self, node_id: str | None, reason: str, message: str) -> Rejection:
        rejection = Rejection(node_id, reason, message)
        self.rejections.append(rejection)
        return rejection

    def _admit(self, node_id: str, sender: str | None, role: str, what: str) -> Rejection | None:
        """Refuse a payload whose named sender is not its signer, or whose sender already contributed."""
        if sender is not None and node_id != sender:
            return self._reject(node_id, "signer_mismatch", f"payload names {role} {node_id} but {sender} signed it")
        if node_id in self.accepted_nodes:
            return self._reject(node_id, "duplicate_node", f"{role} {node_id} already sent {what} this round")
        return None

    def offer_update(self, payload: bytes, *, sender: str | None = None) -> Rejection | None:
        """Decode, validate and fold one client update; return the rejection, or None if folded.

        ``sender`` (the verified signer, when updates are signed) must be the node the payload names.
        """
        self._count_received(payload)
        try:
            update = decode_update(payload, expect=self.expect)
        except UpdateRejected as exc:
            return self._reject(None, exc.reason, str(exc))
        node_id = str(update.header.node_id)
        refused = self._admit(node_id, sender, "node", "an update")
        if refused is not None:
            return refused
        weight = float(update.header.num_examples) if self.weighting == "num_examples" else 1.0
        if weight <= 0:
            return self._reject(node_id, "zero_weight", f"node {node_id} reported {update.header.num_examples} examples")
        try:
            tensors, fisher = self.transform(update) if self.transform else (update.tensors, update.fisher)
            self.state.add(tensors, weight=weight, fisher=fisher)
        except ValueError as exc:
            return self._reject(node_id, "incompatible_update", f"node {node_id}: {exc}")
        self.accepted_nodes.append(node_id)
        return None

    def offer_partial(self, payload: bytes, *, sender: str | None = None) -> Rejection | None:
        """Decode, validate and fold a gateway's partial state; return the rejection, or None if folded."""
        self._count_received(payload)
        try:
            partial = decode_partial(payload, strategy=self.strategy, expect=self.partial_expect)
        except UpdateRejected as exc:
            return self._reject(None, exc.reason, str(exc))
        node_id = str(partial.header.node_id)
        refused = self._admit(node_id, sender, "gateway", "a state")
        if refused is not None:
            return refused
        try:
            self.state.combine(partial.state)
        except ValueError as exc:
            return self._reject(node_id, "incompatible_update", f"gateway {node_id}: {exc}")
        self.accepted_nodes.append(node_id)
        return None

    def finalize(self) -> dict[str, torch.Tensor]:
        """The merged task vector of every accepted payload (raises if none was accepted).

        Ends the round: statistics are freed as results appear, so the peak stays at one state.
        """
        if not self.accepted_nodes:
            reasons = ", ".join(sorted({r.reason for r in self.rejections})) or "no payloads"
            raise ValueError(f"no update was accepted this round ({reasons})")
        return self.state.finalize(release=True)

    def metrics(self) -> dict[str, int]:
        """Counts for the round's report: accepted, rejected, rejected per reason, bytes received."""
        counts = Counter(r.reason for r in self.rejections)
        return {
            "accepted": len(self.accepted_nodes),
            "rejected": len(self.rejections),
            "bytes_received": self.bytes_received,
            **{f"rejected.{reason}": n for reason, n in sorted(counts.items())},
        }
