"""Where a simulated round's time goes, and how far it is from its training-compute bound.

Reads a run's ``report.json``: each round record carries the server's phases (broadcast, waiting for
replies, decode+fold, finalize, client evaluation, server evaluation, checkpoint, report) and the
clients' phases summed over the replies (model build, data, training, Fisher, encoding, signing and
the whole handler, ``total``). The **compute bound** of a round is the clients' pure training time
divided by the clients that run at once, plus the server's evaluation: what the round would take if
everything but training and evaluation were free. A round's wall time is the interval between
consecutive round ends, so it also counts the checkpoint and report of the round before.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedfuse.timing import CLIENT_PHASES, SERVER_PHASES


@dataclass(frozen=True)
class RoundBreakdown:
    """One round: wall time, phases, the compute bound and their ratio."""

    round: int
    wall: float
    replies: int
    at_once: int
    server: dict[str, float]
    client_mean: dict[str, float]
    """Mean seconds per replying client of each client phase (and ``total``)."""
    train_sum: float

    @property
    def bound(self) -> float:
        """Σ clients' training seconds / clients at once + server evaluation seconds."""
        return self.train_sum / max(1, self.at_once) + self.server.get("evaluation", 0.0)

    @property
    def ratio(self) -> float:
        """Wall time over the compute bound."""
        return self.wall / self.bound if self.bound > 0 else float("inf")

    @property
    def transport_queue(self) -> float:
        """Mean seconds a reply spent outside the client's handler and the server's work: transport and queueing.

        The round's waiting time spread over its waves of clients, less a client's own handler time.
        """
        waves = max(1, -(-self.replies // max(1, self.at_once)))
        return max(0.0, self.server.get("wait", 0.0) / waves - self.client_mean.get("total", 0.0))


def round_walls(rounds: Sequence[Mapping[str, Any]]) -> list[float]:
    """Each round's wall time: from the end of the round before (the first: its own duration) to its end."""
    if not rounds:
        return []
    ends = [float(rounds[0]["finished_at"]) - float(rounds[0]["seconds"])]
    ends += [float(record["finished_at"]) for record in rounds]
    return [b - a for a, b in itertools.pairwise(ends)]


def breakdown(history: Mapping[str, Any], parallel: int) -> list[RoundBreakdown]:
    """Every round of a run's history, with ``parallel`` clients able to train at once."""
    rounds = history["rounds"]
    rows = []
    for record, wall in zip(rounds, round_walls(rounds), strict=True):
        sums = dict(record.get("client_phases") or {})
        replies = int(sums.pop("replies", 0))
        mean = {name: value / replies for name, value in sums.items()} if replies else {}
        rows.append(
            RoundBreakdown(
                round=int(record["round"]),
                wall=wall,
                replies=replies,
                at_once=min(max(1, replies), parallel),
                server=dict(record.get("phases") or {}),
                client_mean=mean,
                train_sum=float(sums.get("train", 0.0)),
            )
        )
    return rows


def steady(rows: Sequence[RoundBreakdown]) -> list[RoundBreakdown]:
    """Rounds 2.. (round 1 starts the simulation's workers), or all rounds of a one-round run."""
    return list(rows[1:]) or list(rows)


def median_ratio(rows: Sequence[RoundBreakdown]) -> float:
    """Median wall/bound ratio of the steady rounds."""
    return statistics.median(row.ratio for row in steady(rows))


def breakdown_table(rows: Sequence[RoundBreakdown]) -> tuple[list[str], list[list[str]]]:
    """A column per round and a row per figure (seconds); client phases are means per replying client."""
    client = [p for p in (*CLIENT_PHASES, "total") if any(p in row.client_mean for row in rows)]
    server = [p for p in SERVER_PHASES if any(p in row.server for row in rows)]
    figures: list[tuple[str, Callable[[RoundBreakdown], str]]] = [
        ("wall s", lambda row: f"{row.wall:.2f}"),
        ("compute bound s", lambda row: f"{row.bound:.2f}"),
        ("wall / bound", lambda row: f"{row.ratio:.3f}"),
        ("clients replying (at once)", lambda row: f"{row.replies} ({row.at_once})"),
    ]
    figures += [(f"client {p} (mean)", _seconds_of("client_mean", p)) for p in client]
    figures.append(("transport + queue (mean)", lambda row: f"{row.transport_queue:.3f}"))
    figures += [(f"server {p}", _seconds_of("server", p)) for p in server]
    columns = ["", *(f"round {row.round}" for row in rows)]
    return columns, [[name, *(show(row) for row in rows)] for name, show in figures]


def _seconds_of(group: str, phase: str) -> Callable[[RoundBreakdown], str]:
    """Formats one phase's seconds from a row's ``client_mean`` or ``server`` figures."""

    def show(row: RoundBreakdown) -> str:
        figures: dict[str, float] = getattr(row, group)
        return f"{figures.get(phase, 0.0):.3f}"

    return show
