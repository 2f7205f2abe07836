"""A Flower strategy that folds fedfuse updates into any fedfuse merge strategy as they arrive.

``FedFuseStrategy`` subclasses ``flwr.serverapp.strategy.Strategy``: ``configure_train`` samples nodes
and sends them the round's weights; ``aggregate_train`` hands replies *one at a time* (``start``
feeds it a generator over ``grid.pull_messages``) to the round's :class:`~fedfuse.rounds.RoundEngine`,
which checks, folds and drops each, so the server holds one merge state and never the list of
replies. Refused replies are recorded with a reason from :mod:`fedfuse.rejections`, counted in the
round's metrics, and the round goes on. This class is Flower glue only: parsing replies
(:mod:`fedfuse.messages`), sampling, broadcasting and the round loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedfuse.messages import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    EvaluateReply,
    NodeName,
    RoundInstruction,
    TrainReply,
    instruction_destinations,
    reply_node,
)
from fedfuse.rejections import Rejected, Rejection
from fedfuse.rounds import Contribution, RoundEngine, ServerOptimizer, UpdateSpace
from fedfuse.security import Registry
from fedfuse.server.report_clients import train_record
from fedfuse.server.streaming import stream_replies, wait_for_nodes
from fedfuse.settings import RunSettings, build_merge_strategy
from fedfuse.timing import Phases
from fedfuse.wire import fingerprint

RoundCallback = Callable[[dict[str, Any]], None]
EVALUATION_METRICS = ("accuracy", "loss", "perplexity")
"""What a client's evaluate reply reports, averaged by examples over clients."""
IDENTIFY_TIMEOUT = 120.0
"""Seconds to wait for nodes to say their names (a node that does not goes by its Flower id)."""
ReplyCallback = Callable[[int, int], None]


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
    run_key : str
        Names the run across resumes (default: ``run_id``); nodes key the residuals they keep on disk by it.
    """

    def __init__(
        self,
        settings: RunSettings,
        space: UpdateSpace,
        run_id: str,
        base_state: dict[str, torch.Tensor],
        on_reply: ReplyCallback | None = None,
        registry: Registry | None = None,
        run_key: str = "",
    ) -> None:
        self.settings = settings
        self.run_key = run_key or run_id
        self.base_state = base_state
        self.registry = registry
        self.space = space
        self.run_id = run_id
        self.on_reply = on_reply
        self.merge = build_merge_strategy(settings)
        self.optimizer = ServerOptimizer.for_run(settings)  # steps on each round's merge; the ServerApp checkpoints it
        self._round_state: dict[str, torch.Tensor] = {}
        self._round_fingerprint = ""
        self._expected = 0
        self._names: dict[int, str] = {}
        self._instructions: list[Message] = []
        self._available = 0
        self.train_sample_rate = 1.0
        """Clients sampled to train in the last round over those connected (what DP accounting needs)."""
        self.last_rejections: list[dict[str, str | None]] = []
        self.last_clients: dict[str, dict[str, Any]] = {}
        self.last_phases = Phases()
        """The last round's decode+fold and finalize seconds (``start`` adds the other server phases)."""
        self.last_client_phases: dict[str, float] = {}
        """The last round's client phase seconds summed over the replies that reported them, plus ``replies``."""

    def _sample(self, grid: Grid, server_round: int, fraction: float) -> list[int]:
        """A seeded sample of the connected nodes, ordered by their names (stable across resumes)."""
        nodes = wait_for_nodes(grid, self.settings.run.min_train_nodes, self.settings.run.timeout)
        if not nodes:
            return []
        names = self._names_of(grid, nodes)
        nodes = sorted(nodes, key=lambda node: (names[node], node))
        wanted = math.ceil(round(fraction * len(nodes), 9))  # 0.28 × 25 is 7.000000000000001 in floats: 7, not 8
        count = min(len(nodes), max(self.settings.run.min_train_nodes, wanted))
        self._available = len(nodes)
        rng = np.random.default_rng([self.settings.run.seed, server_round])
        chosen = rng.choice(len(nodes), size=count, replace=False)
        return [int(nodes[i]) for i in sorted(chosen)]

    def _names_of(self, grid: Grid, nodes: list[int]) -> dict[int, str]:
        """Each node's stable name, asked once per node (a node that does not answer goes by its id)."""
        unknown = [node for node in nodes if node not in self._names]
        if unknown:
            queries = [NodeName.query(node) for node in unknown]
            for reply in stream_replies(grid, queries, timeout=min(self.settings.run.timeout, IDENTIFY_TIMEOUT)):
                answer = NodeName.from_message(reply)
                if answer is not None:
                    self._names[int(reply.metadata.src_node_id)] = answer.name
            for node in unknown:
                self._names.setdefault(node, str(node))
        return self._names

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send each the round's changed weights, round number, run id and weights fingerprint."""
        self._round_state = dict(arrays.to_torch_state_dict())
        self._round_fingerprint = fingerprint(self._round_state)
        nodes = self._sample(grid, server_round, self.settings.run.fraction_train)
        self._expected = len(nodes)
        self.train_sample_rate = len(nodes) / max(1, self._available)
        instruction = RoundInstruction(server_round, self.run_id, self._round_fingerprint, self.run_key)
        content = RecordDict(
            {ARRAYS_RECORD: self._broadcast(self._round_state), CONFIG_RECORD: instruction.to_config(config)}
        )
        self._instructions = [Message(content=content, dst_node_id=node, message_type="train") for node in nodes]
        return self._instructions

    def _broadcast(self, state: dict[str, torch.Tensor]) -> ArrayRecord:
        """The parameters of ``state`` that differ from the base model (every node already has the base)."""
        return ArrayRecord({name: t for name, t in state.items() if not torch.equal(t, self.base_state[name])})

    def _engine(self, server_round: int) -> RoundEngine:
        """The round's engine: what payloads must match, and the signature check when updates are signed."""
        return RoundEngine.for_run(
            self.settings,
            self.space,
            round_number=server_round,
            run_id=self.run_id,
            base_fingerprint=self._round_fingerprint,
            expected_updates=self._expected,
            check_signature=None
            if self.registry is None
            else self.registry.round_check(
                run_id=self.run_id, round_number=server_round, base_fingerprint=self._round_fingerprint
            ),
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Offer each reply to the round engine as it comes, then apply the merge to the round's weights."""
        engine = self._engine(server_round)
        self.last_clients = {}
        self.last_phases = phases = Phases()
        self.last_client_phases = {}
        replied: set[int] = set()
        destinations = instruction_destinations(self._instructions)
        for received, reply in enumerate(replies, start=1):
            if self.on_reply:
                self.on_reply(received, self._expected)
            node = reply_node(reply, destinations)
            sender = str(node)
            replied.add(node)
            rejection: Rejection | None
            with phases("decode_fold"):
                try:
                    parsed = TrainReply.from_message(reply)
                except Rejected as exc:
                    rejection = engine.reject(self._names.get(node, sender), exc.reason, str(exc))
                else:
                    self._count_client_phases(parsed.timing)
                    rejection = engine.offer(
                        parsed.payload, kind=parsed.kind, sender=sender, signature=parsed.signature
                    )
            if rejection is not None:
                log(
                    WARNING,
                    "round %s: rejected a reply from %s (%s): %s",
                    server_round,
                    rejection.node or sender,
                    rejection.reason,
                    rejection.message,
                )
        for node in (int(message.metadata.dst_node_id) for message in self._instructions):
            if node not in replied:
                engine.reject(
                    self._names.get(node, str(node)),
                    "timed_out",
                    f"no reply within the round's deadline of {self.settings.run.timeout:g} s",
                )
        self.last_rejections = [rejection.as_record() for rejection in engine.rejections]
        for contribution in engine.contributions.values():
            self._client_record(self._display_name(contribution), train_record(contribution))
        metrics = engine.metrics()
        with phases("finalize"):
            new_state = self.optimizer.apply(engine, self._round_state)
        if new_state is None:
            log(WARNING, "round %s: no update accepted; the global model stays as it was", server_round)
            return None, MetricRecord(metrics)
        return ArrayRecord(new_state), MetricRecord(metrics)

    def _count_client_phases(self, timing: Mapping[str, float]) -> None:
        """Add one reply's phase seconds to the round's sums (replies without timings are not counted)."""
        if not timing:
            return
        sums = self.last_client_phases
        for name, seconds in timing.items():
            sums[name] = sums.get(name, 0.0) + seconds
        sums["replies"] = sums.get("replies", 0.0) + 1

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask a sample of nodes (``fraction-evaluate``) to evaluate the new weights on local data."""
        if self.settings.run.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(grid, server_round, self.settings.run.fraction_evaluate)
        changed = self._broadcast(dict(arrays.to_torch_state_dict()))
        content = RecordDict({ARRAYS_RECORD: changed, CONFIG_RECORD: RoundInstruction(server_round).to_config(config)})
        return [Message(content=content, dst_node_id=node, message_type="evaluate") for node in nodes]

    def _display_name(self, contribution: Contribution) -> str:
        """The name a contribution has in the report: its institution (as it says), or its node id."""
        label = str(contribution.metrics.get("institution", "") or contribution.node)
        if label != contribution.node and label in self.last_clients:  # two nodes say the same name
            return f"{label} (node {contribution.node})"
        return label

    def _client_record(self, node: str, values: dict[str, Any]) -> None:
        """Remember what one client reported this round, for the report's per-client table."""
        record = self.last_clients.setdefault(node, {})
        record.update({key: value for key, value in values.items() if value is not None})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' local evaluation (accuracy, loss, perplexity), kept per client too."""
        total = 0.0
        sums: dict[str, float] = {}
        for reply in replies:
            try:
                parsed = EvaluateReply.from_message(reply)
            except Rejected as exc:
                log(WARNING, "round %s: no evaluation from node %s: %s", server_round, reply.metadata.src_node_id, exc)
                continue
            weight = float(parsed.num_examples)
            values = {key: parsed.metrics[key] for key in EVALUATION_METRICS if key in parsed.metrics}
            data = (
                {} if parsed.data_sha256 is None else {"data_rows": parsed.data_rows, "data_sha256": parsed.data_sha256}
            )
            self._client_record(parsed.node, {"eval_examples": parsed.num_examples, **data, **values})
            total += weight
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + weight * value
        if total == 0:
            return None
        return MetricRecord({**{key: value / total for key, value in sums.items()}, "num-examples": total})

    def _initial_federated_evaluation(
        self,
        grid: Grid,
        arrays: ArrayRecord,
        config: ConfigRecord,
        timeout: float,
        result: Result,
        on_initial: RoundCallback | None,
    ) -> None:
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
        log(INFO, "\t├── merge: %s (%s), server %s", s.merge.strategy, self.merge.params(), self.optimizer.describe())
        log(
            INFO,
            "\t├── update space: %s, sparsifier %s d=%s",
            self.space.kind,
            s.compression.sparsifier,
            s.compression.density,
        )
        log(INFO, "\t└── fraction train/evaluate: %s / %s", s.run.fraction_train, s.run.fraction_evaluate)

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
            phases = Phases()
            with phases("broadcast"):
                messages = list(self.configure_train(server_round, arrays, train_config, grid))
                downlink = sum(len(a.data) for m in messages for a in m.content.array_records[ARRAYS_RECORD].values())
            replies = stream_replies(grid, messages, timeout=timeout, ordered=True)
            del messages
            with phases("wait"):
                new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            for name, seconds in self.last_phases.seconds.items():
                phases.add(name, seconds)
                phases.add("wait", -seconds)
            if new_arrays is not None:
                arrays = new_arrays
                result.arrays = arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            with phases("client_eval"):
                evaluate_messages = list(self.configure_evaluate(server_round, arrays, evaluate_config, grid))
                client_eval = None
                if evaluate_messages:
                    client_eval = self.aggregate_evaluate(
                        server_round, stream_replies(grid, evaluate_messages, timeout=timeout)
                    )
                    if client_eval is not None:
                        result.evaluate_metrics_clientapp[server_round] = client_eval
            with phases("evaluation"):
                server_eval = evaluate_fn(server_round, arrays) if evaluate_fn else None
            if server_eval is not None:
                result.evaluate_metrics_serverapp[server_round] = server_eval
            if on_round:
                on_round(
                    {
                        "round": server_round,
                        "arrays": arrays,
                        "train": dict(train_metrics or {}),
                        "client_eval": dict(client_eval or {}),
                        "server_eval": dict(server_eval or {}),
                        "rejections": list(self.last_rejections),
                        "clients": {node: dict(record) for node, record in sorted(self.last_clients.items())},
                        "downlink_bytes": downlink,
                        "seconds": time.perf_counter() - started,
                        "phases": phases.as_dict(),
                        "client_phases": {name: round(value, 4) for name, value in self.last_client_phases.items()},
                    }
                )
        return result
