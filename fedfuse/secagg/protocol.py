"""SecAgg+ (Bell et al. 2020) as two state machines without Flower: one node's side and the server's.

One round runs four stages, each a message from the server to every node still in and a reply:

1. ``advertise`` — each node makes two X25519 key pairs (``c``: to encrypt shares for a neighbour;
   ``s``: to agree pairwise masks) and a self-mask seed ``b``, and sends both public keys.
2. ``share`` — the server sends each node its neighbours' public keys (a sparse k-regular graph); the node
   splits its ``s`` private key and ``b`` into Shamir shares (threshold t), encrypts each neighbour's pair
   for it and sends the ciphertexts, a commitment to ``b`` and one to each share (so a share handed back
   later can be checked without revealing anything).
3. ``mask`` — the server forwards each node the ciphertexts addressed to it; the node sends its input
   vector x plus PRG(b) plus, for every neighbour j still in, ±PRG(agree(s, s_pk_j)) (+ when its id is
   smaller), all in the ring Z_{2^ring_bits}. The server adds the masked vectors as they arrive: it only
   ever holds their running sum.
4. ``unmask`` — the server names the survivors and the nodes that dropped after ``share``; each node
   returns, for each neighbour, its share of ``b`` (survivor) or of ``s`` (dropped), never both. With t
   valid shares the server rebuilds each survivor's ``b`` (checked against its commitment) and each
   dropped node's ``s`` key (checked against its public key), removes the self masks and the pairwise
   masks the survivors added for dropped neighbours, and is left with Σ x over the survivors only.

Fewer than t survivors, or a secret with fewer than t valid shares, aborts the round
(:class:`SecAggAborted`); a node whose reply is malformed is refused with a reason (:class:`Refusal`)
and treated as dropped, and the round goes on while t remain. Messages are flat dicts of bytes, ints,
strings and lists of them, so the Flower glue carries them as ``ConfigRecord``s unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedfuse.secagg.crypto import KEY_BYTES, KeyPair, agree, commitment, mask, open_sealed, random_seed, seal
from fedfuse.secagg.graph import default_degree, default_threshold, neighbours
from fedfuse.secagg.ring import FixedPoint, ring_difference, ring_sum
from fedfuse.secagg.shamir import SHARE_BYTES, split

STAGES = ("advertise", "share", "mask", "unmask")
Message = dict[str, Any]
"""A stage's message or reply: flat, ConfigRecord-compatible values."""


class SecAggAborted(RuntimeError):
    """The round cannot be unmasked (fewer than t survivors, or a secret with fewer than t valid shares)."""


class MalformedReply(ValueError):
    """A node's reply does not follow the protocol (one-line reason)."""


@dataclass(frozen=True)
class SecAggParams:
    """The protocol's knobs: threshold t, graph degree k, fixed-point bits and clipping range (0 = default)."""

    threshold: int = 0
    degree: int = 0
    bits: int = 0
    """0: the most that keeps the 32-bit ring (32 − ⌈log₂(n + 1)⌉), so the masked vector weighs as fp32 does."""
    clip_range: float = 1024.0

    def resolved(self, num_nodes: int) -> SecAggParams:
        """The knobs for ``num_nodes`` sampled nodes, defaults filled in and every rule checked."""
        if num_nodes < 2:
            raise ValueError(f"secure aggregation needs at least 2 sampled nodes; got {num_nodes}")
        degree = self.degree or default_degree(num_nodes)
        degree = min(degree, num_nodes - 1)
        threshold = self.threshold or default_threshold(degree)
        if not 1 <= threshold <= degree + 1:
            raise ValueError(
                f"secure aggregation threshold must be in [1, {degree + 1}] (the graph degree + the node itself) for "
                f"{num_nodes} nodes; got {threshold}"
            )
        bits = self.bits or 32 - num_nodes.bit_length()
        FixedPoint.for_nodes(bits, self.clip_range, num_nodes)
        return SecAggParams(threshold, degree, bits, self.clip_range)


@dataclass(frozen=True)
class RoundSetup:
    """What every participant of one secure round is told first: who takes part, the graph, the encoding."""

    run_id: str
    round: int
    nodes: tuple[int, ...]
    neighbours: Mapping[int, tuple[int, ...]]
    threshold: int
    fixed: FixedPoint
    length: int = 0
    """Ring elements in every node's input vector (set once the layout is known, before ``mask``)."""
    degree: int = 0
    graph_seed: int = 0
    """The graph is ``neighbours(nodes, degree, graph_seed)``: nodes rebuild it instead of downloading it."""

    @classmethod
    def plan(cls, run_id: str, round_number: int, nodes: Iterable[int], params: SecAggParams, seed: int) -> RoundSetup:
        """The setup for ``nodes`` (sorted), the graph drawn from ``seed``."""
        ordered = tuple(sorted(int(node) for node in nodes))
        knobs = params.resolved(len(ordered))
        graph = neighbours(ordered, knobs.degree, seed)
        fixed = FixedPoint.for_nodes(knobs.bits, knobs.clip_range, len(ordered))
        return cls(run_id, round_number, ordered, graph, knobs.threshold, fixed, 0, knobs.degree, seed)

    def x(self, node: int) -> int:
        """The node's Shamir x-coordinate (its position among the participants, from 1)."""
        return self.nodes.index(node) + 1

    def context(self, kind: str, *nodes: int) -> bytes:
        """Associated data / key-derivation info binding a secret to this run, round and purpose."""
        return f"fedfuse-secagg-v1|{self.run_id}|{self.round}|{kind}|{'|'.join(map(str, nodes))}".encode()

    def to_config(self) -> Message:
        """As flat config entries (node ids as strings: Flower's ids exceed int64's signed range)."""
        return {
            "run-id": self.run_id,
            "round": self.round,
            "nodes": [str(node) for node in self.nodes],
            "degree": self.degree,
            "graph-seed": self.graph_seed,
            "threshold": self.threshold,
            "bits": self.fixed.bits,
            "clip-range": float(self.fixed.clip_range),
            "ring-bits": self.fixed.ring_bits,
            "length": self.length,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> RoundSetup:
        """Read it back (``ValueError`` naming what is missing or mistyped)."""
        try:
            nodes = tuple(int(node) for node in _strings(config["nodes"]))
            degree, seed = int(str(config["degree"])), int(str(config["graph-seed"]))
            return cls(
                str(config["run-id"]),
                int(str(config["round"])),
                nodes,
                neighbours(nodes, degree, seed),
                int(str(config["threshold"])),
                FixedPoint(int(str(config["bits"])), float(str(config["clip-range"])), int(str(config["ring-bits"]))),
                int(str(config.get("length", 0))),
                degree,
                seed,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"secure-aggregation setup is malformed: {exc}") from None


def canonical(message: Mapping[str, object]) -> bytes:
    """The exact bytes a stage message stands for (what a node signs): sorted keys, bytes as hex."""

    def plain(value: object) -> object:
        if isinstance(value, bytes):
            return {"hex": value.hex()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    return json.dumps({key: plain(value) for key, value in message.items()}, sort_keys=True).encode()


def _strings(value: object) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return [str(item) for item in value]


def _bytes_list(value: object, what: str) -> list[bytes]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, bytes) for item in value):
        raise MalformedReply(f"{what} must be a list of bytes")
    return list(value)


def _field_bytes(message: Mapping[str, object], key: str, length: int | None = None) -> bytes:
    value = message.get(key)
    if not isinstance(value, bytes) or (length is not None and len(value) != length):
        size = f" of {length} bytes" if length is not None else ""
        raise MalformedReply(f"{key!r} must be bytes{size}")
    return value


def _node_list(message: Mapping[str, object], key: str) -> list[int]:
    value = message.get(key, [])
    try:
        return [int(item) for item in _strings(value)]
    except (TypeError, ValueError):
        raise MalformedReply(f"{key!r} must be a list of node ids") from None


def _pack_shares(s_share: bytes, b_share: bytes) -> bytes:
    return s_share + b_share


def _unpack_shares(plain: bytes) -> tuple[bytes, bytes]:
    if len(plain) != 2 * SHARE_BYTES:
        raise MalformedReply(f"a decrypted share pair must be {2 * SHARE_BYTES} bytes, got {len(plain)}")
    return plain[:SHARE_BYTES], plain[SHARE_BYTES:]


def share_commitment(setup: RoundSetup, owner: int, holder: int, kind: str, share: bytes) -> bytes:
    """Commitment to one share (bound to its owner, holder and kind), checked when the share comes back."""
    return commitment(setup.context(f"share-{kind}", owner, holder) + share)


def pairwise_mask(setup: RoundSetup, secret: bytes, node: int, peer: int) -> np.ndarray:
    """The mask ``node`` adds (+, when its id is smaller) or subtracts for ``peer``; ``peer`` does the opposite."""
    values = mask(secret, setup.length, setup.fixed.dtype, purpose=setup.context("pair", *sorted((node, peer))))
    return values if node < peer else ring_difference(np.zeros_like(values), values)


@dataclass
class NodeSession:
    """One node's side of one secure round; :meth:`to_state` / :meth:`from_state` keep it between messages."""

    setup: RoundSetup
    node: int
    c_key: KeyPair = field(default_factory=KeyPair.generate)
    s_key: KeyPair = field(default_factory=KeyPair.generate)
    self_seed: bytes = field(default_factory=random_seed)
    peers_s_public: dict[int, bytes] = field(default_factory=dict)
    peers_c_public: dict[int, bytes] = field(default_factory=dict)
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    """Shares this node holds for each neighbour and itself: (share of the s key, share of b)."""

    def advertise(self) -> Message:
        """Stage 1: both public keys."""
        return {"c-public": self.c_key.public, "s-public": self.s_key.public}

    def share(self, request: Mapping[str, object]) -> Message:
        """Stage 2: encrypted shares of the s key and b for every neighbour that advertised."""
        peers = _node_list(request, "peers")
        c_keys = _bytes_list(request.get("c-public"), "c-public")
        s_keys = _bytes_list(request.get("s-public"), "s-public")
        if len(peers) != len(c_keys) or len(peers) != len(s_keys):
            raise MalformedReply("peers, c-public and s-public must have the same length")
        mine = set(self.setup.neighbours.get(self.node, ()))
        if not set(peers) <= mine:
            raise MalformedReply("the server named peers that are not this node's neighbours")
        if len(peers) + 1 < self.setup.threshold:
            raise SecAggAborted(
                f"only {len(peers)} neighbours advertised keys; the threshold is {self.setup.threshold}"
            )
        self.peers_c_public = dict(zip(peers, c_keys, strict=True))
        self.peers_s_public = dict(zip(peers, s_keys, strict=True))
        xs = {peer: self.setup.x(peer) for peer in peers}
        own = self.setup.x(self.node)  # the node holds a share of its own secrets too (as Flower's SecAgg+ does)
        s_shares = split(self.s_key.private, self.setup.threshold, [*xs.values(), own])
        b_shares = split(self.self_seed, self.setup.threshold, [*xs.values(), own])
        self.held[self.node] = (s_shares[own], b_shares[own])
        sealed, s_commit, b_commit = [], [], []
        for peer, x in xs.items():
            key = agree(
                self.c_key.private, self.peers_c_public[peer], self.setup.context("c", *sorted((self.node, peer)))
            )
            plain = _pack_shares(s_shares[x], b_shares[x])
            sealed.append(seal(key, plain, self.setup.context("seal", self.node, peer)))
            s_commit.append(share_commitment(self.setup, self.node, peer, "s", s_shares[x]))
            b_commit.append(share_commitment(self.setup, self.node, peer, "b", b_shares[x]))
        return {
            "peers": [str(peer) for peer in xs],
            "sealed": sealed,
            "s-commitments": s_commit,
            "b-commitments": b_commit,
            "b-commitment": commitment(self.setup.context("b", self.node) + self.self_seed),
            "own-s-commitment": share_commitment(self.setup, self.node, self.node, "s", s_shares[own]),
            "own-b-commitment": share_commitment(self.setup, self.node, self.node, "b", b_shares[own]),
        }

    def masked_input(self, request: Mapping[str, object], vector: np.ndarray) -> Message:
        """Stage 3: open the neighbours' shares and send x + PRG(b) ± pairwise masks (ring elements)."""
        setup = replace_length(self.setup, int(str(request.get("length", self.setup.length))))
        self.setup = setup
        if vector.dtype != setup.fixed.dtype or vector.shape != (setup.length,):
            raise ValueError(
                f"input vector must be {setup.length} values of {np.dtype(setup.fixed.dtype).name}; "
                f"got {vector.shape} {vector.dtype}"
            )
        senders = _node_list(request, "senders")
        sealed = _bytes_list(request.get("sealed"), "sealed")
        if len(senders) != len(sealed):
            raise MalformedReply("senders and sealed must have the same length")
        unreadable = []
        for sender, box in zip(senders, sealed, strict=True):
            try:
                self.held[sender] = self._open(sender, box)
            except (ValueError, KeyError):
                unreadable.append(str(sender))
        live = _node_list(request, "live")
        masked = ring_sum(vector, mask(self.self_seed, setup.length, setup.fixed.dtype, purpose=setup.context("self")))
        for peer in live:
            if peer not in self.peers_s_public:
                raise MalformedReply(f"live peer {peer} never advertised keys to this node")
            secret = agree(
                self.s_key.private, self.peers_s_public[peer], setup.context("s", *sorted((self.node, peer)))
            )
            masked = ring_sum(masked, pairwise_mask(setup, secret, self.node, peer))
        return {"masked": masked.tobytes(), "unreadable": unreadable}

    def _open(self, sender: int, box: bytes) -> tuple[bytes, bytes]:
        key = agree(
            self.c_key.private, self.peers_c_public[sender], self.setup.context("c", *sorted((self.node, sender)))
        )
        return _unpack_shares(open_sealed(key, box, self.setup.context("seal", sender, self.node)))

    def unmask(self, request: Mapping[str, object]) -> Message:
        """Stage 4: b-shares of surviving neighbours, s-shares of dropped ones; never both for one node."""
        survivors = set(_node_list(request, "survivors"))
        dropped = set(_node_list(request, "dropped"))
        if survivors & dropped or self.node in dropped:
            raise MalformedReply("the server named nodes both surviving and dropped (it would learn their input)")
        if len(survivors) < self.setup.threshold:
            raise SecAggAborted(f"only {len(survivors)} survivors; the threshold is {self.setup.threshold}")
        revealed = [
            (str(owner), "b", b_share) if owner in survivors else (str(owner), "s", s_share)
            for owner, (s_share, b_share) in sorted(self.held.items())
            if owner in survivors or owner in dropped
        ]
        return {
            "owners": [owner for owner, _, _ in revealed],
            "kinds": [kind for _, kind, _ in revealed],
            "shares": [share for _, _, share in revealed],
        }

    def to_state(self) -> Message:
        """What the node keeps between stages (in Flower's ``Context.state``): its secrets and held shares."""
        return {
            "setup": json.dumps(self.setup.to_config()),
            "node": str(self.node),
            "c-private": self.c_key.private,
            "s-private": self.s_key.private,
            "self-seed": self.self_seed,
            "peers": [str(peer) for peer in self.peers_s_public],
            "peers-c": [self.peers_c_public[peer] for peer in self.peers_s_public],
            "peers-s": list(self.peers_s_public.values()),
            "held-owners": [str(owner) for owner in self.held],
            "held": [s + b for s, b in self.held.values()],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, object]) -> NodeSession:
        """Rebuild the session :meth:`to_state` wrote."""
        peers = _node_list(state, "peers")
        owners = _node_list(state, "held-owners")
        return cls(
            RoundSetup.from_config(json.loads(str(state["setup"]))),
            int(str(state["node"])),
            KeyPair.from_private(_field_bytes(state, "c-private", KEY_BYTES)),
            KeyPair.from_private(_field_bytes(state, "s-private", KEY_BYTES)),
            _field_bytes(state, "self-seed", KEY_BYTES),
            dict(zip(peers, _bytes_list(state["peers-s"], "peers-s"), strict=True)),
            dict(zip(peers, _bytes_list(state["peers-c"], "peers-c"), strict=True)),
            {
                owner: _unpack_shares(pair)
                for owner, pair in zip(owners, _bytes_list(state["held"], "held"), strict=True)
            },
        )


def replace_length(setup: RoundSetup, length: int) -> RoundSetup:
    """The setup with the input vectors' length fixed."""
    if length < 1:
        raise MalformedReply(f"input length must be positive; got {length}")
    return dataclasses.replace(setup, length=length)
