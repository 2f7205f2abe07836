"""Seeds for DARE masks, derived from (run seed, round, node, tensor name) so any machine regenerates them."""

from __future__ import annotations

import hashlib


def derive_seed(run_seed: int, round_number: int, node_id: int | str | None, tensor_name: str) -> int:
    """A 63-bit generator seed for one tensor's DARE mask.

    ``node_id=None`` is the "round" scope: every client of the round draws the same mask, which
    keeps sparse updates aligned (needed for secure aggregation). The derivation is a BLAKE2b
    hash of the four parts, so it is stable across Python versions and machines.
    """
    scope = "round" if node_id is None else f"node={node_id}"
    text = f"fedfuse-dare|seed={run_seed}|round={round_number}|{scope}|tensor={tensor_name}"
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
