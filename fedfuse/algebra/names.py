"""Readable reports of two sets of tensor names that should be equal."""

from __future__ import annotations

from collections.abc import Iterable


def name_mismatch(expected: Iterable[str], actual: Iterable[str], *, missing: str, extra: str) -> str | None:
    """``"<missing>: a, b; <extra>: c"`` (five names each at most), or None when the sets are equal."""
    expected, actual = set(expected), set(actual)
    parts = []
    lacking = sorted(expected - actual)
    surplus = sorted(actual - expected)
    if lacking:
        parts.append(f"{missing}: {', '.join(lacking[:5])}")
    if surplus:
        parts.append(f"{extra}: {', '.join(surplus[:5])}")
    return "; ".join(parts) or None
