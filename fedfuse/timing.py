"""Where a round's time goes: wall seconds summed per named phase (client and server both keep one).

A client reports its phases (model build, data, training, Fisher, Gram matrices, encoding, signing) next to its
update; the server keeps its own (broadcast, waiting, decode+fold, finalize, client evaluation,
server evaluation, checkpoint, report) in each round's record, so ``fedfuse bench overhead`` can say where the time
went and how far a round is from its training-compute bound. Diagnostics only: nothing steers a
merge by them. Imports nothing from fedfuse.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

CLIENT_PHASES = ("build", "data", "train", "fisher", "gram", "encode", "sign")
"""A client's phases, in the order they run (``total`` is the whole train handler)."""
SERVER_PHASES = ("broadcast", "wait", "decode_fold", "finalize", "client_eval", "evaluation", "checkpoint", "report")
"""The server's phases of one round, in the order they run."""


class Phases:
    """Wall seconds per phase, summed over every ``with phases("name"):`` block."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the block and add it to phase ``name`` (also when it raises)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to phase ``name``."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def as_dict(self, digits: int = 4) -> dict[str, float]:
        """The phases (rounded), in insertion order."""
        return {name: round(value, digits) for name, value in self.seconds.items()}


def reported_phases(values: Mapping[str, object]) -> dict[str, float]:
    """The finite, non-negative float entries of a client's timing record (anything else is dropped)."""
    clean: dict[str, float] = {}
    for name, value in values.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
            clean[str(name)] = float(value)
    return clean
