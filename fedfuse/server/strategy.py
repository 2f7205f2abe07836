"""A Flower strategy that folds fedfuse updates into any fedfuse merge strategy as they arrive.

``FedFuseStrategy`` subclasses ``flwr.serverapp.strategy.Strategy``: ``configure_train`` samples nodes
and sends them the round's weights; ``aggregate_train`` consumes replies *one at a time* (``start``
feeds it a generator over ``grid.pull_messages``), so the server holds one merge state per tier and
never the list of replies. Invalid updates are rejected with a reason, counted in the round's
metrics, and the round goes on. Nodes that report a ``tier`` are merged per tier first and the tier
states combined (exact: the statistics are a monoid); gateway nodes may reply with a partial state.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedfuse.algebra import apply_task_vector
from fedfuse.messages import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    METRICS_RECORD,
    PARTIAL_RECORD,
    SIGNATURE_RECORD,
    UPDATE_RECORD,
    payload_of,
)
from fedfuse.security import Registry, SignatureRejected, UpdateSignature
from fedfuse.server.aggregator import RoundAggregator
from fedfuse.server.streaming import stream_replies, wait_for_nodes
from fedfuse.server.update_space import UpdateSpace
from fedfuse.settings import RunSettings
from fedfuse.strategies import MergeStrategy, get_strategy, strategy_class
from fedfuse.wire import Expectation, fingerprint

RoundCallback = Callable[[dict[str, Any]], None]
EVALUATION_METRICS = ("accuracy", "loss", "perplexity")
"""What a client's evaluate reply reports, averaged by examples over clients."""
ReplyCallback = Callable[[int, int], None]


def build_merge_strategy(settings: RunSettings) -> MergeStrategy:
    """The fedfuse merge strategy the settings name, with λ, device and (if it takes one) the vote rule."""
    params: dict[str, Any] = {"lam": settings.lam, "device": settings.device}
    if "vote" in inspect.signature(strategy_class(settings.strategy)).parameters:
        params["vote"] = settings.vote
    return get_strategy(settings.strategy, **params)


def _reply_rejection(reply: Message, reason: str, message: str) -> dict[str, str | None]:
    """A rejection decided before the payload was decoded, named by the sending node's Flower id."""
    return {"node": str(reply.metadata.src_node_id), "reason": reason, "message": message}


class FedFuseStrategy(Strategy):
    """Streaming fedfuse merging as a Flower strategy.

    Parameters
    ----------
    settings : RunSettings
        The run's settings (strategy name, sampling fractions, LoRA aggregation, ...).
    space : UpdateSpace
        How decoded updates become merge inputs (full weights, exact LoRA ΔW, or factors).
    run_id : str
        Run identifier every update must carry.
    base_state : dict of str to Tensor
        The base model's parameters, which every client already holds: only parameters that differ
        from it are broadcast (for LoRA runs, the merged target modules and the head).
    registry : Registry, optional
        Institutions' update-signing keys; when given, only updates signed for this run and round by
        a registered institution are folded (the others are rejected with the reason).
    on_reply : callable, optional
        Called with (replies received, replies expected) as each reply is folded (progress bars).
    """

    def __init__(
        self,
        settings: RunSettings,
        space: UpdateSpace,
        run_id: str,
        base_state: dict[str, torch.Tensor],
        on_reply: ReplyCallback | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.settings = settings
        self.base_state = base_state
        self.registry = registry
        self.space = space
        self.run_id = run_id
        self.on_reply = on_reply
        self.merge = build_merge_strategy(settings)
        self._round_state: dict[str, torch.Tensor] = {}
        self._round_fingerprint = ""
        self._expected = 0
        self.last_rejections: list[dict[str, str | None]] = []
        self.last_clients: dict[str, dict[str, Any]] = {}

    def _sample(self, grid: Grid, server_round: int, fraction: float) -> list[int]:
        nodes = wait_for_nodes(grid, self.settings.min_train_nodes, self.settings.timeout)
        if not nodes:
            return []
        count = min(len(nodes), max(self.settings.min_train_nodes, math.ceil(fraction * len(nodes))))
        rng = np.random.default_rng([self.settings.seed, server_round])
        chosen = rng.choice(len(nodes), size=count, replace=False)
        return sorted(int(nodes[i]) for i in chosen)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send each the round's changed weights, round number, run id and weights fingerprint."""
        self._round_state = dict(arrays.to_torch_state_dict())
        self._round_fingerprint = fingerprint(self._round_state)
        nodes = self._sample(grid, server_round, self.settings.fraction_train)
        self._expected = len(nodes)
        round_config = ConfigRecord(
            {**dict(config), "round": server_round, "run-id": self.run_id, "base-fingerprint": self._round_fingerprint}
        )
        content = RecordDict({ARRAYS_RECORD: self._broadcast(self._round_state), CONFIG_RECORD: round_config})
        return [Message(content=content, dst_node_id=node, message_type="train") for node in nodes]

    def _broadcast(self, state: dict[str, torch.Tensor]) -> ArrayRecord:
        """The parameters of ``state`` that differ from the base model (every node already has the base)."""
        return ArrayRecord({name: t for name, t in state.items() if not torch.equal(t, self.base_state[name])})

    def _aggregator(self, server_round: int) -> RoundAggregator:
        expect = Expectation(
            shapes=self.space.wire_shapes,
            round=server_round,
            run_id=self.run_id,
            base_fingerprint=self._round_fingerprint,
        )
        return self.space.aggregator(self.merge, expect, server_round)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fold each reply as it comes, then finalize the merge and apply it to the round's weights."""
        tiers: dict[str, RoundAggregator] = {}
        self.last_clients = {}
        client_errors: list[dict[str, str | None]] = []
        train_loss = examples = 0.0
        received = verified = 0
        for reply in replies:
            received += 1
            if self.on_reply:
                self.on_reply(received, self._expected)
            if reply.has_error():
                client_errors.append(_reply_rejection(reply, "client_error", reply.error.reason))
                continue
            content = reply.content
            tier = ""
            if CONFIG_RECORD in content.config_records:
                tier = str(content.config_records[CONFIG_RECORD].get("tier", ""))
            if tier not in tiers:
                tiers[tier] = self._aggregator(server_round)
            aggregator = tiers[tier]
            partial = payload_of(content, PARTIAL_RECORD)
            payload = partial if partial is not None else payload_of(content, UPDATE_RECORD)
            if payload is None:
                client_errors.append(
                    _reply_rejection(reply, "no_payload", "reply carries neither an update nor a partial state")
                )
                continue
            sender = None
            if self.registry is not None:
                try:
                    sender = self._verify(content, server_round, payload)
                except SignatureRejected as exc:
                    client_errors.append(_reply_rejection(reply, exc.reason, str(exc)))
                    log(WARNING, "round %s: rejected update: %s", server_round, exc)
                    continue
                verified += 1
            if partial is not None:
                rejection = aggregator.offer_partial(payload, sender=sender)
            else:
                rejection = aggregator.offer_update(payload, sender=sender)
            if rejection is not None:
                log(WARNING, "round %s: rejected update from %s: %s", server_round, rejection.node_id or "?",
                    rejection.message)
                continue
            if METRICS_RECORD in content.metric_records:
                metrics = content.metric_records[METRICS_RECORD]
                weight = float(metrics.get("num-examples", 0))
                if "train-loss" in metrics:
                    train_loss += weight * float(metrics["train-loss"])
                    examples += weight
                self._client_record(content, {
                    "num_examples": int(weight), "train_loss": metrics.get("train-loss"),
                    "train_seconds": metrics.get("train-seconds"),
                })
        rejections = client_errors + [
            {"node": r.node_id, "reason": r.reason, "message": r.message}
            for aggregator in tiers.values() for r in aggregator.rejections
        ]
        self.last_rejections = rejections
        counts: dict[str, int] = {}
        for rejection in rejections:
            counts[str(rejection["reason"])] = counts.get(str(rejection["reason"]), 0) + 1
        accepted = sum(len(a.accepted_nodes) for a in tiers.values())
        metrics = {
            "accepted": accepted,
            "rejected": len(rejections),
            "uplink-bytes": sum(a.bytes_received for a in tiers.values()),
            "tiers": len(tiers),
            "signatures-verified": verified,
            **{f"rejected.{reason}": n for reason, n in sorted(counts.items())},
        }
        if examples:
            metrics["train-loss"] = train_loss / examples
        if accepted == 0:
            log(WARNING, "round %s: no update accepted; the global model stays as it was", server_round)
            return None, MetricRecord(metrics)
        states = [a.state for a in tiers.values() if a.accepted_nodes]
        state = states[0]
        for other in states[1:]:
            state.combine(other)
        merged = state.finalize(release=True)
        tau = self.space.task_vector({name: t.cpu() for name, t in merged.items()})
        new_state = apply_task_vector(self._round_state, tau)
        return ArrayRecord(new_state), MetricRecord(metrics)

    def _verify(self, content: RecordDict, server_round: int, payload: bytes) -> str:
        record = content.config_records.get(SIGNATURE_RECORD)
        signed = None if record is None else UpdateSignature.from_config(record)
        return self.registry.verify(
            signed, run_id=self.run_id, round_number=server_round, base_fingerprint=self._round_fingerprint,
            payload=payload,
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask a sample of nodes (``fraction-evaluate``) to evaluate the new weights on local data."""
        if self.settings.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(grid, server_round, self.settings.fraction_evaluate)
        changed = self._broadcast(dict(arrays.to_torch_state_dict()))
        content = RecordDict({ARRAYS_RECORD: changed, CONFIG_RECORD: ConfigRecord({**dict(config), "round": server_round})})
        return [Message(content=content, dst_node_id=node, message_type="evaluate") for node in nodes]

    def _client_record(self, content: RecordDict, values: dict[str, Any]) -> None:
        """Remember one client's reply for the report: its node name, data fingerprint and ``values``."""
        config = content.config_records.get(CONFIG_RECORD) or {}
        node = str(config.get("node", "")) or "?"
        record = self.last_clients.setdefault(node, {})
        if "data-sha256" in config:
            record["data_rows"] = int(config.get("data-rows", 0))
            record["data_sha256"] = str(config["data-sha256"])
        record.update({key: value for key, value in values.items() if value is not None})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' local evaluation (accuracy, loss, perplexity), kept per client too."""
        total = 0.0
        sums: dict[str, float] = {}
        for reply in replies:
            if reply.has_error() or METRICS_RECORD not in reply.content.metric_records:
                continue
            metrics = reply.content.metric_records[METRICS_RECORD]
            weight = float(metrics.get("num-examples", 0))
            values = {key: float(metrics[key]) for key in EVALUATION_METRICS if key in metrics}
            self._client_record(reply.content, {"eval_examples": int(weight), **values})
            total += weight
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + weight * value
        if total == 0:
            return None
        return MetricRecord({**{key: value / total for key, value in sums.items()}, "num-examples": total})

    def _initial_federated_evaluation(self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, timeout: float,
                                      result: Result, on_initial: RoundCallback | None) -> None:
        """Round 0 of federated evaluation: the clients evaluate the initial model on their local data."""
        messages = list(self.configure_evaluate(0, arrays, config, grid))
        if not messages:
            return
        self.last_clients = {}
        metrics = self.aggregate_evaluate(0, stream_replies(grid, messages, timeout=timeout))
        if metrics is not None:
            result.evaluate_metrics_clientapp[0] = metrics
        if on_initial:
            on_initial({"client_eval": dict(metrics or {}), "clients": dict(sorted(self.last_clients.items()))})

    def summary(self) -> None:
        """Log the configuration."""
        s = self.settings
        log(INFO, "\t├── merge strategy: %s (%s)", s.strategy, self.merge.params())
        log(INFO, "\t├── update space: %s, sparsifier %s d=%s", self.space.kind, s.sparsifier, s.density)
        log(INFO, "\t└── fraction train/evaluate: %s / %s", s.fraction_train, s.fraction_evaluate)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
        on_round: RoundCallback | None = None,
        on_initial: RoundCallback | None = None,
    ) -> Result:
        """Run rounds ``first_round``..``num_rounds`` like ``Strategy.start``, folding replies as they arrive.

        ``on_round`` receives each finished round's record (metrics, timings, the new weights as
        ``"arrays"``) before the next starts: the ServerApp checkpoints and reports there. Without
        server-side evaluation the clients evaluate the initial model too (round 0), and
        ``on_initial`` receives that federated evaluation.
        """
        self.summary()
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        result = Result()
        arrays = initial_arrays
        if first_round == 1:
            initial = evaluate_fn(0, arrays) if evaluate_fn else None
            if initial is not None:
                result.evaluate_metrics_serverapp[0] = initial
            else:
                self._initial_federated_evaluation(grid, arrays, evaluate_config, timeout, result, on_initial)
        for server_round in range(first_round, num_rounds + 1):
            started = time.perf_counter()
            messages = list(self.configure_train(server_round, arrays, train_config, grid))
            downlink = sum(len(a.data) for m in messages for a in m.content.array_records[ARRAYS_RECORD].values())
            replies = stream_replies(grid, messages, timeout=timeout)
            del messages
            new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = new_arrays
                result.arrays = arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            evaluate_messages = list(self.configure_evaluate(server_round, arrays, evaluate_config, grid))
            client_eval = None
            if evaluate_messages:
                client_eval = self.aggregate_evaluate(
                    server_round, stream_replies(grid, evaluate_messages, timeout=timeout)
                )
                if client_eval is not None:
                    result.evaluate_metrics_clientapp[server_round] = client_eval
            server_eval = evaluate_fn(server_round, arrays) if evaluate_fn else None
            if server_eval is not None:
                result.evaluate_metrics_serverapp[server_round] = server_eval
            if on_round:
                on_round({
                    "round": server_round,
                    "arrays": arrays,
                    "train": dict(train_metrics or {}),
                    "client_eval": dict(client_eval or {}),
                    "server_eval": dict(server_eval or {}),
                    "rejections": list(self.last_rejections),
                    "clients": {node: dict(record) for node, record in sorted(self.last_clients.items())},
                    "downlink_bytes": downlink,
                    "seconds": time.perf_counter() - started,
                })
        return result
