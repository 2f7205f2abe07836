"""Why a payload was not merged: one vocabulary for the wire decoder, signatures and the round engine.

Every refusal anywhere in a round has a short, stable ``reason`` slug (for counting in metrics and
reports) and a human-readable message. The slugs live here once, grouped by who decides them;
:class:`Rejected` is the one exception type (the wire's ``UpdateRejected`` and the signature check's
``SignatureRejected`` are its subclasses) and :class:`Rejection` the one record a round keeps.
No imports from the rest of fedfuse: every layer can use it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

WIRE_REASONS: dict[str, str] = {
    "not_bytes": "the payload is not a bytes-like object",
    "too_large": "the payload is larger than Expectation.max_bytes (checked before parsing)",
    "truncated": "the payload ends before the data its container header describes",
    "corrupted": "the container is malformed, has trailing bytes, or its CRC32 does not match",
    "malformed_header": "the fedfuse header is not valid JSON or has missing, unknown or mistyped fields",
    "unsupported_version": "the header names a format or format version this decoder does not know",
    "run_mismatch": "the update was made for another run",
    "round_mismatch": "the update was made for another round",
    "fingerprint_mismatch": "the update was made against other base weights",
    "bad_num_examples": "num_examples is not an integer in [0, MAX_NUM_EXAMPLES]",
    "missing_tensor": "an expected tensor (or one of its byte blobs) is absent",
    "unexpected_tensor": "a tensor (or a byte blob) that was not expected is present",
    "wrong_shape": "a tensor's shape differs from the expected one",
    "wrong_dtype": "a byte blob is not uint8, or a value dtype is not one the format knows",
    "value_count": "the number of values does not match the tensor's shape or support",
    "malformed_indices": "a delta-index varint is longer than 10 bytes, exceeds 64 bits or is cut off",
    "index_out_of_range": "an index is not below the tensor's number of entries",
    "duplicate_indices": "an index appears twice (a zero gap in the delta code)",
    "unsorted_indices": "indices are not strictly increasing (the delta sum wrapped around)",
    "bitmap_padding": "a bitmap has bits set past the tensor's last entry, or the wrong length",
    "dare_count_mismatch": "the number of DARE values differs from the mask regenerated from its seed",
    "sparsifier_mismatch": "the update was shrunk otherwise than the run's sparsifier (kind or DARE density)",
    "non_finite": "a value or Fisher entry is NaN or infinite",
    "negative_fisher": "the Fisher diagonal has negative entries",
    "bad_gram": "a Gram matrix has a negative diagonal entry (not XᵀX)",
    "bad_partial": "a partial state does not fit the strategy (identity, statistics or counters)",
    "malformed_payload": "decoding failed in an unforeseen way (reported, never a crash)",
}
"""Decided by :mod:`fedfuse.wire` while decoding and validating a payload."""

SIGNATURE_REASONS: dict[str, str] = {
    "unsigned": "the run requires signed updates and this one carries no (complete) signature",
    "unknown_signer": "the signing institution is not in the signer registry",
    "bad_signature": "the signature does not match the payload (tampered in transit, or a wrong key)",
    "replayed": "the signature holds for another run, round or base (a replayed or stale update)",
    "signer_mismatch": "the payload names another node than the institution that signed it",
}
"""Decided by :mod:`fedfuse.security` against the coordinator's registry of public keys."""

ROUND_REASONS: dict[str, str] = {
    "client_error": "the client reported an error instead of a reply (it crashed or refused)",
    "node_unavailable": "Flower's SuperLink answered for the node: it stopped sending heartbeats (lost or killed)",
    "no_payload": "the reply carries neither an update nor a partial state",
    "duplicate_node": "the node (or gateway) already contributed this round, under any tier",
    "zero_weight": "the update's weight is zero (it reported no training examples)",
    "incompatible_update": "the update does not fit the strategy or the update space (e.g. no Fisher diagonal)",
    "sender_mismatch": "an unsigned payload names another node than the transport peer that sent it",
    "timed_out": "the node sent no reply before the round's deadline (run config timeout); a late reply is dropped",
    "version_mismatch": "the node holds another model version than the round's broadcast applies to (re-synced next)",
    "secagg_protocol": "a node's secure-aggregation reply broke the protocol (keys, shares, layout or masked input)",
    "secagg_aborted": "secure aggregation could not unmask the round (under t survivors or shares): nothing merged",
}
"""Decided by the round engine (:mod:`fedfuse.rounds`) and the server around it."""

REASONS: dict[str, str] = {**WIRE_REASONS, **SIGNATURE_REASONS, **ROUND_REASONS}
"""Every rejection reason slug, with what it means (the one registry)."""


class Rejected(ValueError):
    """A payload was refused; ``reason`` is a slug of :data:`REASONS`, ``detail`` the human explanation."""

    allowed: ClassVar[dict[str, str]] = REASONS

    def __init__(self, reason: str, message: str) -> None:
        if reason not in self.allowed:
            raise ValueError(f"unknown rejection reason {reason!r} for {type(self).__name__}")
        super().__init__(message)
        self.reason = reason
        self.detail = message


@dataclass(frozen=True)
class Rejection:
    """One refused payload as a round records it: who sent it (if known), why, and the message."""

    node: str | None
    reason: str
    message: str

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown rejection reason {self.reason!r}")

    def as_record(self) -> dict[str, str | None]:
        """As a plain dict for reports and JSON (keys node, reason, message)."""
        return {"node": self.node, "reason": self.reason, "message": self.message}


def counts_by_reason(rejections: Iterable[Rejection]) -> dict[str, int]:
    """How many rejections per reason, sorted by reason (metrics report them as ``rejected.<reason>``)."""
    return dict(sorted(Counter(r.reason for r in rejections).items()))
