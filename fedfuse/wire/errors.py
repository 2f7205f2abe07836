"""The one exception the wire layer raises on bad input, with a short machine-readable reason."""

from __future__ import annotations

REASONS: dict[str, str] = {
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
    "non_finite": "a value or Fisher entry is NaN or infinite",
    "negative_fisher": "the Fisher diagonal has negative entries",
    "bad_partial": "a partial state does not fit the strategy (identity, statistics or counters)",
    "malformed_payload": "decoding failed in an unforeseen way (reported, never a crash)",
}
"""Every rejection reason slug, with what it means."""


class UpdateRejected(ValueError):
    """A payload failed decoding or validation; ``reason`` is one of :data:`REASONS`.

    The server records ``reason`` (stable, short, for counting) and ``str(exc)`` (for humans)
    and goes on with the round.
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(f"update rejected ({reason}): {message}")
        self.reason = reason
        self.detail = message
