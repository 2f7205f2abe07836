"""The server's side of SecAgg+: what each stage asks, what it accepts, and the unmasked sum.

The :class:`Aggregator` never holds one node's input: masked vectors are added to a running ring sum as
they arrive (:meth:`Aggregator.on_masked`), and only that sum is unmasked at the end. Nodes are named by
their transport ids (Flower node ids). See :mod:`fedfuse.secagg.protocol` for the stages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedfuse.secagg.crypto import KEY_BYTES, KeyPair, agree, commitment, mask
from fedfuse.secagg.protocol import (
    MalformedReply,
    Message,
    RoundSetup,
    SecAggAborted,
    _bytes_list,
    _field_bytes,
    _node_list,
    pairwise_mask,
    replace_length,
    share_commitment,
)
from fedfuse.secagg.ring import ring_difference, ring_sum
from fedfuse.secagg.shamir import SHARE_BYTES, combine

COMMITMENT_BYTES = 32


@dataclass(frozen=True)
class Refusal:
    """A node's reply that broke the protocol: the node, and why (one line)."""

    node: int
    stage: str
    message: str


@dataclass(frozen=True)
class SecureSum:
    """The round's result: Σ x over the survivors, as ring elements, and who is in it."""

    total: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    """Nodes that sent shares but no (valid) masked input: their masks were removed, their input is not in."""


@dataclass
class Aggregator:
    """One secure round on the server (see the module docstring)."""

    setup: RoundSetup
    c_public: dict[int, bytes] = field(default_factory=dict)
    s_public: dict[int, bytes] = field(default_factory=dict)
    sealed: dict[int, dict[int, bytes]] = field(default_factory=dict)
    """recipient → sender → ciphertext of the sender's share pair for the recipient."""
    commitments: dict[tuple[int, int, str], bytes] = field(default_factory=dict)
    b_commitments: dict[int, bytes] = field(default_factory=dict)
    shared: list[int] = field(default_factory=list)
    masked: list[int] = field(default_factory=list)
    total: np.ndarray | None = None
    shares: dict[tuple[int, str], dict[int, bytes]] = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)

    def refuse(self, node: int, stage: str, message: str) -> Refusal:
        """Record a node's broken reply; it is treated as dropped from this stage on."""
        refusal = Refusal(node, stage, message)
        self.refusals.append(refusal)
        return refusal

    def exclude(self, node: int, stage: str, message: str) -> Refusal:
        """Drop a node that advertised before anyone is told its keys (e.g. its statistics do not fit)."""
        self.c_public.pop(node, None)
        self.s_public.pop(node, None)
        return self.refuse(node, stage, message)

    def _peers(self, node: int, among: Mapping[int, object] | list[int]) -> list[int]:
        return [peer for peer in self.setup.neighbours.get(node, ()) if peer in among]

    def on_advertise(self, node: int, reply: Mapping[str, object]) -> Refusal | None:
        """Stage 1's reply: the node's two public keys."""
        if node not in self.setup.nodes or node in self.c_public:
            return self.refuse(node, "advertise", "not a participant of this round, or advertised twice")
        try:
            c_key, s_key = _field_bytes(reply, "c-public", KEY_BYTES), _field_bytes(reply, "s-public", KEY_BYTES)
        except MalformedReply as exc:
            return self.refuse(node, "advertise", str(exc))
        self.c_public[node], self.s_public[node] = c_key, s_key
        return None

    def share_requests(self) -> dict[int, Message]:
        """Stage 2's message to each node that advertised: its advertised neighbours' keys."""
        requests: dict[int, Message] = {}
        for node in self.c_public:
            peers = self._peers(node, self.c_public)
            requests[node] = {
                "peers": [str(peer) for peer in peers],
                "c-public": [self.c_public[peer] for peer in peers],
                "s-public": [self.s_public[peer] for peer in peers],
            }
        return requests

    def on_share(self, node: int, reply: Mapping[str, object]) -> Refusal | None:
        """Stage 2's reply: one ciphertext and two share commitments per advertised neighbour, b's commitment."""
        if node not in self.c_public or node in self.shared:
            return self.refuse(node, "share", "did not advertise keys, or shared twice")
        try:
            peers = _node_list(reply, "peers")
            if peers != self._peers(node, self.c_public):
                raise MalformedReply("shares must go to exactly the advertised neighbours, in order")
            sealed = _bytes_list(reply.get("sealed"), "sealed")
            s_commit = _bytes_list(reply.get("s-commitments"), "s-commitments")
            b_commit = _bytes_list(reply.get("b-commitments"), "b-commitments")
            b_seed_commit = _field_bytes(reply, "b-commitment", COMMITMENT_BYTES)
            own = (_field_bytes(reply, "own-s-commitment", COMMITMENT_BYTES),
                   _field_bytes(reply, "own-b-commitment", COMMITMENT_BYTES))  # fmt: skip
            if not len(sealed) == len(s_commit) == len(b_commit) == len(peers):
                raise MalformedReply("one ciphertext and two commitments per neighbour")
            if any(len(c) != COMMITMENT_BYTES for c in s_commit + b_commit):
                raise MalformedReply(f"commitments must be {COMMITMENT_BYTES} bytes")
        except MalformedReply as exc:
            return self.refuse(node, "share", str(exc))
        for peer, box, s_c, b_c in zip(peers, sealed, s_commit, b_commit, strict=True):
            self.sealed.setdefault(peer, {})[node] = box
            self.commitments[(node, peer, "s")], self.commitments[(node, peer, "b")] = s_c, b_c
        self.b_commitments[node] = b_seed_commit
        self.commitments[(node, node, "s")], self.commitments[(node, node, "b")] = own
        self.shared.append(node)
        return None

    def mask_requests(self, length: int) -> dict[int, Message]:
        """Stage 3's message to each node that shared: the ciphertexts addressed to it, its live peers, the length."""
        self.setup = replace_length(self.setup, length)
        requests: dict[int, Message] = {}
        for node in self.shared:
            live = self._peers(node, self.shared)
            boxes = self.sealed.get(node, {})
            senders = [peer for peer in live if peer in boxes]
            requests[node] = {
                "senders": [str(peer) for peer in senders],
                "sealed": [boxes[peer] for peer in senders],
                "live": [str(peer) for peer in live],
                "length": length,
            }
        return requests

    def on_masked(self, node: int, reply: Mapping[str, object]) -> Refusal | None:
        """Stage 3's reply: the masked input, added to the running sum at once (never kept on its own)."""
        if node not in self.shared or node in self.masked:
            return self.refuse(node, "mask", "did not share, or sent its masked input twice")
        dtype = np.dtype(self.setup.fixed.dtype)
        expected = self.setup.length * dtype.itemsize
        data = reply.get("masked")
        if not isinstance(data, bytes) or len(data) != expected:
            size = len(data) if isinstance(data, bytes) else type(data).__name__
            return self.refuse(
                node, "mask", f"masked input must be {expected} bytes ({self.setup.length} values); got {size}"
            )
        vector = np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype)
        self.total = vector if self.total is None else ring_sum(self.total, vector)
        self.masked.append(node)
        return None

    def unmask_requests(self) -> dict[int, Message]:
        """Stage 4's message to each survivor: who survived and who dropped (raises when fewer than t survive)."""
        survivors = self.masked
        if len(survivors) < self.setup.threshold:
            raise SecAggAborted(
                f"only {len(survivors)} nodes sent a valid masked input; the threshold is {self.setup.threshold}: "
                "nothing can be unmasked and nothing is merged"
            )
        message: Message = {
            "survivors": [str(node) for node in survivors],
            "dropped": [str(node) for node in self.dropped],
        }
        return {node: dict(message) for node in survivors}

    @property
    def dropped(self) -> list[int]:
        """Nodes that shared keys but sent no valid masked input."""
        return [node for node in self.shared if node not in self.masked]

    def on_unmask(self, node: int, reply: Mapping[str, object]) -> Refusal | None:
        """Stage 4's reply: shares, each checked against its commitment (a bad one refuses all of the node's)."""
        if node not in self.masked:
            return self.refuse(node, "unmask", "was not asked to unmask")
        try:
            owners = _node_list(reply, "owners")
            kinds = [str(kind) for kind in reply.get("kinds", [])]  # type: ignore[attr-defined]
            shares = _bytes_list(reply.get("shares"), "shares")
            if not len(owners) == len(kinds) == len(shares):
                raise MalformedReply("owners, kinds and shares must have the same length")
            checked = [self._checked_share(node, *item) for item in zip(owners, kinds, shares, strict=True)]
        except (MalformedReply, TypeError) as exc:
            return self.refuse(node, "unmask", f"shares rejected: {exc}")
        x = self.setup.x(node)
        for owner, kind, share in checked:
            self.shares.setdefault((owner, kind), {})[x] = share
        return None

    def _checked_share(self, holder: int, owner: int, kind: str, share: bytes) -> tuple[int, str, bytes]:
        expected_kind = "b" if owner in self.masked else "s" if owner in self.dropped else ""
        if kind != expected_kind:
            raise MalformedReply(f"a {kind!r} share of node {owner} was not asked for")
        known = self.commitments.get((owner, holder, kind))
        if (
            known is None
            or len(share) != SHARE_BYTES
            or share_commitment(self.setup, owner, holder, kind, share) != known
        ):
            raise MalformedReply(f"the {kind!r} share of node {owner} does not match its commitment")
        return owner, kind, share

    def result(self) -> SecureSum:
        """Remove every mask: Σ x over the survivors (raises :class:`SecAggAborted` when a secret lacks t shares)."""
        if self.total is None:
            raise SecAggAborted("no masked input arrived")
        total = self.total
        for owner in self.masked:
            seed = self._secret(owner, "b")
            if commitment(self.setup.context("b", owner) + seed) != self.b_commitments[owner]:
                raise SecAggAborted(f"node {owner}'s self-mask seed does not match its commitment")
            own = mask(seed, self.setup.length, self.setup.fixed.dtype, purpose=self.setup.context("self"))
            total = ring_difference(total, own)
        for owner in self.dropped:
            key = KeyPair.from_private(self._secret(owner, "s"))
            if key.public != self.s_public[owner]:
                raise SecAggAborted(f"node {owner}'s rebuilt mask key does not match its public key")
            for peer in self._peers(owner, self.masked):
                secret = agree(key.private, self.s_public[peer], self.setup.context("s", *sorted((owner, peer))))
                total = ring_difference(total, pairwise_mask(self.setup, secret, peer, owner))
        return SecureSum(total, tuple(self.masked), tuple(self.dropped))

    def _secret(self, owner: int, kind: str) -> bytes:
        shares = self.shares.get((owner, kind), {})
        if len(shares) < self.setup.threshold:
            raise SecAggAborted(
                f"only {len(shares)} valid shares of node {owner}'s {'self-mask seed' if kind == 'b' else 'mask key'}; "
                f"the threshold is {self.setup.threshold}: nothing is merged"
            )
        return combine(shares, self.setup.threshold, KEY_BYTES)
