"""The one round loop: Flower's ``Strategy.start``, except that training replies are folded as they arrive.

``FedMerge.start`` (and so fedfuse's own ServerApp strategy, its subclass) runs rounds here: configure
and push the round's training messages, hand the replies one by one to ``aggregate_train`` (a generator
over the grid, pulled in push order so a repeated or resumed run sums in the same order), then federated
and server-side evaluation. Each finished round is described to ``on_round`` (weights, metrics, timings,
rejections) before the next starts: fedfuse's ServerApp checkpoints and reports there.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from fedfuse.rejections import Rejection
from fedfuse.server.streaming import stream_replies
from fedfuse.timing import Phases

if TYPE_CHECKING:
    from fedfuse.server.fedmerge import FedMerge

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass(frozen=True)
class RoundOutcome:
    """What one finished round hands ``on_round``: its new weights, metrics, refusals and timings."""

    round: int
    arrays: ArrayRecord
    train: dict[str, Any]
    """The round's train metrics: the engine's counts (``accepted``, ``rejected.<reason>``, ...) and the replies'."""
    client_eval: dict[str, Any]
    server_eval: dict[str, Any]
    rejections: list[Rejection]
    clients: dict[str, dict[str, Any]]
    """What each client reported (training and evaluation), by its name."""
    downlink_bytes: int
    """Bytes of the arrays sent to nodes this round: training and evaluation messages."""
    seconds: float
    phases: dict[str, float]
    client_phases: dict[str, float]
    broadcast: dict[str, Any] = field(default_factory=dict)
    """How the round's change is sent to nodes (fedfuse's own app; empty for FedMerge's dense weights)."""
    diagnostics: dict[str, Any] = field(default_factory=dict)
    """The round's mergeability diagnostics (empty when none: a secure round, or turned off)."""
    coefficients: dict[str, Any] = field(default_factory=dict)
    """The round's learned merge coefficients (``coefficient-learning``; empty when off)."""
    lambda_search: dict[str, Any] = field(default_factory=dict)
    """The round's λ search (``lambda-candidates``): candidates, weighted losses, the λ chosen; empty when off."""


@dataclass(frozen=True)
class InitialEvaluation:
    """The clients' evaluation of the initial model (round 0, when the server has no test set)."""

    client_eval: dict[str, Any]
    clients: dict[str, dict[str, Any]]


RoundCallback = Callable[[RoundOutcome], None]
InitialCallback = Callable[[InitialEvaluation], None]


@dataclass
class LoopConfig:
    """What ``start`` was called with, for every round of the loop."""

    grid: Grid
    timeout: float
    train_config: ConfigRecord = field(default_factory=ConfigRecord)
    evaluate_config: ConfigRecord = field(default_factory=ConfigRecord)
    evaluate_fn: EvaluateFn | None = None
    on_round: RoundCallback | None = None
    on_initial: InitialCallback | None = None


def run_rounds(
    strategy: FedMerge, loop: LoopConfig, initial_arrays: ArrayRecord, first_round: int, num_rounds: int
) -> Result:
    """Rounds ``first_round``..``num_rounds`` (round 0's evaluation first when starting afresh)."""
    started = time.time()
    result = Result()
    arrays = initial_arrays
    if first_round == 1:
        evaluate_initial(strategy, loop, arrays, result)
    for server_round in range(first_round, num_rounds + 1):
        strategy.log_progress("[ROUND %s/%s]", server_round, num_rounds)
        arrays = run_round(strategy, loop, server_round, arrays, result)
    strategy.log_progress("Strategy execution finished in %.2fs", time.time() - started)
    for line in io.StringIO(str(result)):
        strategy.log_progress("\t%s", line.rstrip("\n"))
    return result


def evaluate_initial(strategy: FedMerge, loop: LoopConfig, arrays: ArrayRecord, result: Result) -> None:
    """Round 0: the server evaluates the initial model; without server evaluation, the clients may."""
    initial = loop.evaluate_fn(0, arrays) if loop.evaluate_fn else None
    if initial is not None:
        result.evaluate_metrics_serverapp[0] = initial
        return
    if not strategy.evaluates_initial_model_on_clients:
        return
    messages = list(strategy.configure_evaluate(0, arrays, loop.evaluate_config, loop.grid))
    if not messages:
        return
    strategy.last_clients = {}
    metrics = strategy.aggregate_evaluate(0, stream_replies(loop.grid, messages, timeout=loop.timeout))
    if metrics is not None:
        result.evaluate_metrics_clientapp[0] = metrics
    if loop.on_initial:
        loop.on_initial(InitialEvaluation(dict(metrics or {}), dict(sorted(strategy.last_clients.items()))))


def run_round(
    strategy: FedMerge, loop: LoopConfig, server_round: int, arrays: ArrayRecord, result: Result
) -> ArrayRecord:
    """One round: train (replies folded as they arrive), evaluate; returns the round's new weights."""
    started = time.perf_counter()
    phases = Phases()
    with phases("broadcast"):
        messages = list(strategy.configure_train(server_round, arrays, loop.train_config, loop.grid))
        downlink = message_bytes(messages)
    with phases("wait"):
        if strategy.policy.secure_aggregation is not None:
            new_arrays, train_metrics = strategy.aggregate_secure(server_round, messages, loop.grid, loop.timeout)
        elif strategy.coefficients is not None:
            new_arrays, train_metrics = strategy.aggregate_coefficients(server_round, messages, loop.grid, loop.timeout)
        else:
            replies = stream_replies(loop.grid, messages, timeout=loop.timeout, ordered=True)
            new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
    del messages
    for name, seconds in strategy.last_phases.seconds.items():  # decode+fold and finalize happened while waiting
        phases.add(name, seconds)
        phases.add("wait", -seconds)
    if new_arrays is not None:
        arrays = result.arrays = new_arrays
    if train_metrics is not None:
        result.train_metrics_clientapp[server_round] = train_metrics
    with phases("client_eval"):
        client_eval, evaluate_downlink = _evaluate_clients(strategy, loop, server_round, arrays, result)
    downlink += evaluate_downlink
    with phases("evaluation"):
        server_eval = loop.evaluate_fn(server_round, arrays) if loop.evaluate_fn else None
    if server_eval is not None:
        result.evaluate_metrics_serverapp[server_round] = server_eval
    if loop.on_round:
        loop.on_round(
            RoundOutcome(
                round=server_round,
                arrays=arrays,
                train=dict(train_metrics or {}),
                client_eval=dict(client_eval or {}),
                server_eval=dict(server_eval or {}),
                rejections=list(strategy.last_rejections),
                clients={node: dict(record) for node, record in sorted(strategy.last_clients.items())},
                downlink_bytes=downlink,
                seconds=time.perf_counter() - started,
                phases=phases.as_dict(),
                client_phases={name: round(value, 4) for name, value in strategy.last_client_phases.items()},
                broadcast=dict(strategy.last_broadcast),
                diagnostics=dict(strategy.last_diagnostics),
                coefficients=dict(strategy.last_coefficients),
                lambda_search=dict(strategy.last_lambda),
            )
        )
    return arrays


def _evaluate_clients(
    strategy: FedMerge, loop: LoopConfig, server_round: int, arrays: ArrayRecord, result: Result
) -> tuple[MetricRecord | None, int]:
    """Federated evaluation of the round's new weights (None when no node evaluates), and the bytes it sent."""
    messages = list(strategy.configure_evaluate(server_round, arrays, loop.evaluate_config, loop.grid))
    if not messages:
        return None, 0
    sent = message_bytes(messages)
    client_eval = strategy.aggregate_evaluate(server_round, stream_replies(loop.grid, messages, timeout=loop.timeout))
    if client_eval is not None:
        result.evaluate_metrics_clientapp[server_round] = client_eval
    return client_eval, sent


def message_bytes(messages: Iterable[Message]) -> int:
    """Bytes of the arrays ``messages`` carry (what the round sends down)."""
    return sum(len(a.data) for m in messages for record in m.content.array_records.values() for a in record.values())


def log_info(message: str, *args: object) -> None:
    """Flower's log at INFO (what Flower's own strategies print while they run)."""
    log(INFO, message, *args)
