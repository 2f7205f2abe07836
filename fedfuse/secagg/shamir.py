"""Shamir secret sharing over the prime field of p = 2^521 − 1, for the mask secrets of SecAgg+.

A node splits its self-mask seed and its masking private key among its neighbours so that any `threshold`
of them let the server remove the masks of a node that dropped out (or of a survivor's self-mask), and
fewer learn nothing. The secret is the big-endian integer of its bytes (≤ 64 bytes, so < p).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = 2**521 - 1
"""A Mersenne prime: every secret of at most 64 bytes is a field element."""
SHARE_BYTES = 66
"""Bytes of one share: a field element, big-endian (521 bits)."""
MAX_SECRET_BYTES = 64


def split(secret: bytes, threshold: int, holders: Sequence[int]) -> dict[int, bytes]:
    """Shamir shares of `secret` for each holder x (distinct ints >= 1): any `threshold` reconstruct it."""
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"shamir secrets hold at most {MAX_SECRET_BYTES} bytes, got {len(secret)}")
    _check_holders(holders)
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= len(holders):
        raise ValueError(f"shamir threshold must be in [1, {len(holders)} holders], got {threshold!r}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big") for x in holders}


def combine(shares: Mapping[int, bytes], threshold: int, secret_bytes: int) -> bytes:
    """The secret from the first `threshold` shares (sorted by x): Lagrange interpolation at 0."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"shamir threshold must be an int >= 1, got {threshold!r}")
    if not 1 <= secret_bytes <= MAX_SECRET_BYTES:
        raise ValueError(f"shamir secret_bytes must be in [1, {MAX_SECRET_BYTES}], got {secret_bytes}")
    if len(shares) < threshold:
        raise ValueError(f"shamir needs {threshold} shares to reconstruct, got {len(shares)}")
    _check_holders(list(shares))
    points = {x: _share_value(x, share) for x, share in shares.items()}
    chosen = sorted(points)[:threshold]
    secret = sum(points[x] * _lagrange_at_zero(x, chosen) for x in chosen) % PRIME
    if secret >= 256**secret_bytes:
        raise ValueError(f"shamir shares reconstruct a value that does not fit {secret_bytes} bytes: a share is wrong")
    return secret.to_bytes(secret_bytes, "big")


def _evaluate(coefficients: list[int], x: int) -> int:
    """The polynomial Σ cᵢ xⁱ mod p (Horner)."""
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % PRIME
    return result


def _lagrange_at_zero(x: int, xs: list[int]) -> int:
    """The Lagrange basis polynomial of point x over xs, evaluated at 0, mod p."""
    numerator, denominator = 1, 1
    for other in xs:
        if other != x:
            numerator = numerator * other % PRIME
            denominator = denominator * (other - x) % PRIME
    return numerator * pow(denominator, -1, PRIME) % PRIME


def _share_value(x: int, share: bytes) -> int:
    """The field element of one share, refusing a wrong length or a value >= p."""
    if len(share) != SHARE_BYTES:
        raise ValueError(f"shamir share of holder {x} has {len(share)} bytes, expected {SHARE_BYTES}")
    value = int.from_bytes(share, "big")
    if value >= PRIME:
        raise ValueError(f"shamir share of holder {x} is not a field element (>= 2^521 - 1)")
    return value


def _check_holders(holders: Sequence[int]) -> None:
    """Holders are distinct ints in [1, p): distinct nonzero field points."""
    for x in holders:
        if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x < PRIME:
            raise ValueError(f"shamir holders must be ints >= 1, got {x!r}")
    if len(set(holders)) != len(holders):
        raise ValueError("shamir holders must be distinct")
