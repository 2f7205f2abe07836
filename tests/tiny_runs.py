"""The run settings of every tiny simulated federation in the tests: 2 local steps of 8 short rows, LoRA rank 2.

Tests spread this and add what they are about (rounds, strategy, output folder, …).
"""

from __future__ import annotations

TINY_RUN: dict[str, object] = {
    "local-steps": 2,
    "batch-size": 8,
    "max-length": 16,
    "lora-rank": 2,
    "eval-examples": 32,
    "client-eval-examples": 8,
    "fraction-evaluate": 0.0,
}
"""Training and evaluation small enough for CI; federated evaluation off."""


SEEDED_RUN: dict[str, object] = {
    "task": "classify",
    "labels": "cardiac,respiratory,musculoskeletal",
    "lora-rank": 2,
    "max-length": 16,
    "fraction-evaluate": 0.0,
    "num-server-rounds": 2,
    "timeout": 30.0,
}
"""Two server rounds of the built-in three-label task on the in-process seeded grid (no Ray)."""
