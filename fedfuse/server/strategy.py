"""fedfuse's own ServerApp strategy: ``FedMerge`` plus seeded, name-ordered sampling, its broadcast and reports.

``FedFuseStrategy`` is :class:`~fedfuse.server.fedmerge.FedMerge` — the same streaming ``start``, the same
round policy (built from the run settings), the same folding of replies as they arrive — with what a
fedfuse run adds: nodes are asked their stable names once and sampled by a seeded draw in name order (so a
resumed run samples and sums as an uninterrupted one), every message carries the run id, round and
model version, replies must be fedfuse payloads, and each client's training and evaluation figures are
kept for the report.

The strategy holds the run's *change* to the base model (:class:`~fedfuse.rounds.ModelChange`), never
the base weights. Each round's merged change is sent in its smallest form (LoRA factors for a linear
merge, dense or truncated SVD otherwise, :class:`~fedfuse.rounds.Broadcaster`) and applied in place;
each node is sent what brings it to the round's version (:class:`~fedfuse.rounds.VersionLog`): nothing,
the deltas it missed, or the whole change. No weights travel through the round loop: its ArrayRecord
is empty and the ServerApp reads the change from :attr:`FedFuseStrategy.model`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedfuse.messages import (
    CONFIG_RECORD,
    SYNC_CONFIG_RECORD,
    SYNC_RECORD,
    EvaluateReply,
    NodeName,
    RoundInstruction,
    sync_records,
)
from fedfuse.rejections import Rejected, Rejection
from fedfuse.rounds import Broadcaster, Contribution, ModelChange, RoundEngine, Sync, UpdateSpace, VersionLog
from fedfuse.security import Registry
from fedfuse.server.coefficient_round import CoefficientPlan
from fedfuse.server.fedmerge import FedMerge
from fedfuse.server.report_clients import train_record
from fedfuse.server.round_state import RoundReference
from fedfuse.server.streaming import stream_replies, wait_for_nodes
from fedfuse.settings import RunSettings, build_merge_strategy

RESYNC_REASONS = ("version_mismatch", "client_error", "node_unavailable", "timed_out")
"""Refusals after which the server no longer knows the node's model version: it is sent the whole change next."""
EVALUATION_METRICS = ("accuracy", "loss", "perplexity")
"""What a client's evaluate reply reports, averaged by examples over clients."""
IDENTIFY_TIMEOUT = 120.0
"""Seconds to wait for nodes to say their names (a node that does not goes by its Flower id)."""
ReplyCallback = Callable[[int, int], None]


class FedFuseStrategy(FedMerge):
    """Streaming fedfuse merging as a Flower strategy: ``FedMerge`` under the run's settings.

    Parameters
    ----------
    settings : RunSettings
        The run's settings (strategy name, sampling fractions, round policy, ...).
    space : UpdateSpace
        How decoded updates become merge inputs (full weights, exact LoRA ΔW, or factors).
    run_id : str
        Run identifier every update must carry.
    change : ModelChange
        The run's change to the base model and its version (zero at the base version; a checkpoint's
        when resuming).
    registry : Registry, optional
        Institutions' update-signing keys; when given, only updates signed for this run and round by
        a registered institution are folded (the others are rejected with the reason).
    on_reply : callable, optional
        Called with (replies received, replies expected) as each reply is folded (progress bars).
    run_key : str
        Names the run across resumes (default: ``run_id``); nodes key the residuals they keep on disk by it.
    """

    evaluates_initial_model_on_clients: ClassVar[bool] = True
    logs_progress: ClassVar[bool] = False
    accepts_standard_replies: ClassVar[bool] = False

    def __init__(
        self,
        settings: RunSettings,
        space: UpdateSpace,
        run_id: str,
        change: ModelChange,
        on_reply: ReplyCallback | None = None,
        registry: Registry | None = None,
        run_key: str = "",
    ) -> None:
        super().__init__(
            build_merge_strategy(settings),
            fraction_train=settings.run.fraction_train,
            min_train_nodes=settings.run.min_train_nodes,
            registry=registry,
            policy=settings.round_policy,
            coefficients=CoefficientPlan.from_settings(settings),
        )
        # set after FedAvg's constructor, which would warn about 0.0 (a fedfuse run's report says it instead)
        self.fraction_evaluate = settings.run.fraction_evaluate
        self.settings = settings
        self.space = space
        self.sparsifier = space.sparsifier
        self.run_id = self._run_id = run_id
        self.run_key = run_key or run_id
        self.versions = VersionLog(change)
        self._downlink: dict[int, int] = {}
        """Bytes of model sync sent to each node this round (training and evaluation messages)."""
        self.broadcaster = Broadcaster(settings.compression.broadcast_policy)
        self.on_reply = on_reply
        self._expected = 0
        self._available = 0
        self.train_sample_rate = 1.0
        """Clients sampled to train in the last round over those connected (what DP accounting needs)."""

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

    @property
    def model(self) -> ModelChange:
        """The run's change to the base model and its version (what checkpoints and evaluation read)."""
        return self.versions.change

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes; send each what brings it to the round's model version, the round, run id and version."""
        self._reference = RoundReference.at_version(self.versions.version)
        nodes = self._sample(grid, server_round, self.settings.run.fraction_train)
        self._expected = len(nodes)
        self.train_sample_rate = len(nodes) / max(1, self._available)
        instruction = RoundInstruction(server_round, self.run_id, self.versions.version, self.run_key)
        self._downlink = {}
        self._instructions = self._messages(nodes, instruction.to_config(config), "train")
        return self._instructions

    def _messages(self, nodes: list[int], config: ConfigRecord, message_type: str) -> list[Message]:
        """One message per node with the model sync it needs (the same records shared by nodes that need the same)."""
        records: dict[tuple[str, ...], tuple[ArrayRecord, ConfigRecord]] = {}
        messages = []
        for node in nodes:
            sync = self.versions.sync_for(node)
            key = _sync_key(sync)
            if key not in records:
                records[key] = sync_records(sync)
            self._downlink[node] = self._downlink.get(node, 0) + sync.nbytes
            arrays, sync_config = records[key]
            content = RecordDict({SYNC_RECORD: arrays, SYNC_CONFIG_RECORD: sync_config, CONFIG_RECORD: config})
            messages.append(Message(content=content, dst_node_id=node, message_type=message_type))
        self.last_broadcast["bytes_per_node"] = max(self._downlink.values(), default=0)
        return messages

    def _round_reference(
        self, arrays: ArrayRecord | None, replies: Iterator[Message]
    ) -> tuple[RoundReference, Iterator[Message]]:
        """Updates are made against the round's model version (the strategy holds the change, not weights)."""
        if self._reference is None:
            self._reference = RoundReference.at_version(self.versions.version)
        return self._reference, replies

    def _merged_arrays(self, engine: RoundEngine, reference: RoundReference) -> ArrayRecord | None:
        """Send the round's change in its smallest form and apply exactly what is sent to the run's change."""
        change = self._round_change(engine)
        if change is None:
            return None
        delta, error = self.broadcaster.delta(change)
        step = self.versions.advance(delta)
        self.last_broadcast = {
            "mode": self.broadcaster.policy.mode,
            "delta_bytes": delta.nbytes,
            "factored": sum(1 for t in delta.tensors.values() if not isinstance(t, torch.Tensor)),
            "relative_error": error,
            "version": step.target,
            "bytes_per_node": max(self._downlink.values(), default=0),
        }
        return ArrayRecord()

    def _stage_identity(self) -> tuple[str, str]:
        """Coefficient stages name the run key and the round's model version (what the nodes hold on disk)."""
        return self.run_key, self.versions.version

    def _fold(self, engine: RoundEngine, reply: Message, sender: str, reference: RoundReference) -> Rejection | None:
        rejection = super()._fold(engine, reply, sender, reference)
        if rejection is not None and rejection.reason in RESYNC_REASONS and sender.isdigit():
            self.versions.forget(int(sender))
        return rejection

    def aggregate_secure(
        self, server_round: int, messages: list[Message], grid: Grid, timeout: float
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """A secure round (FedMerge's); nodes that failed or vanished during it are re-synced whole next time."""
        outcome = super().aggregate_secure(server_round, messages, grid, timeout)
        ids = {name: node for node, name in self._names.items()}
        for rejection in self.last_rejections:
            node = rejection.node or ""
            if rejection.reason in RESYNC_REASONS and (node in ids or node.isdigit()):
                self.versions.forget(ids.get(node) or int(node))
        return outcome

    def _reject_missing(self, engine: RoundEngine, replied: set[str]) -> None:
        for message in self._instructions:
            if str(message.metadata.dst_node_id) not in replied:
                self.versions.forget(int(message.metadata.dst_node_id))
        super()._reject_missing(engine, replied)

    def _space(self, reference: RoundReference) -> UpdateSpace:
        return self.space

    def _on_reply(self, received: int) -> None:
        if self.on_reply:
            self.on_reply(received, self._expected)

    def _record_clients(self, engine: RoundEngine) -> None:
        for contribution in engine.contributions.values():
            self._client_record(self._display_name(contribution), train_record(contribution))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask a sample of nodes (``fraction-evaluate``) to evaluate the new model version on local data."""
        if self.settings.run.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(grid, server_round, self.settings.run.fraction_evaluate)
        instruction = RoundInstruction(server_round, self.run_id, self.versions.version, self.run_key)
        return self._messages(nodes, instruction.to_config(config), "evaluate")

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
            if reply.has_error():
                self.versions.forget(int(reply.metadata.src_node_id))
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


def _sync_key(sync: Sync) -> tuple[str, ...]:
    """Syncs to the same version from the same starting point carry the same arrays."""
    if sync.state is not None:
        return ("state", sync.version)
    return ("steps", sync.version, *(step.source for step in sync.steps))
