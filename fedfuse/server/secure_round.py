"""A training round under SecAgg+: the four stages as Flower messages, then one secure sum folded.

The round's train messages (sampled and configured as usual) carry the ``advertise`` stage: each node
trains, computes its own merge statistics and answers with its public keys, the statistics' public layout
and its name. Three more exchanges follow (``share``, ``mask``, ``unmask``; :mod:`fedfuse.secagg.protocol`),
each a ``train`` message carrying only a ``"fedfuse.secagg"`` ConfigRecord; replies are streamed. The
:class:`~fedfuse.secagg.aggregator.Aggregator` keeps only the running sum of masked inputs; its unmasked
result becomes one merge state (:class:`~fedfuse.rounds.secure_sum.StatisticsLayout`) that the round
engine folds with ``fold_secure_sum``. When the run signs updates, every stage reply is signed and checked.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedfuse.algebra import derive_seed
from fedfuse.messages import (
    SECAGG_CLEAR_METRICS,
    SECAGG_RECORD,
    SIGNATURE_RECORD,
    instruction_destinations,
    read_secagg,
    reply_error_reason,
    reply_node,
    short_reason,
)
from fedfuse.rejections import Rejected
from fedfuse.rounds import RoundEngine, UpdateSpace
from fedfuse.rounds.secure_sum import StatisticsLayout, round_supports, support_digest
from fedfuse.secagg.aggregator import Aggregator
from fedfuse.secagg.protocol import RoundSetup, SecAggAborted, SecAggParams, canonical
from fedfuse.security import UpdateSignature
from fedfuse.server.streaming import stream_replies

if TYPE_CHECKING:
    from fedfuse.server.fedmerge import FedMerge


def config_bytes(record: Mapping[str, Any]) -> int:
    """Bytes a stage record carries (its bytes values; strings and numbers are small)."""
    total = 0
    for value in record.values():
        items = value if isinstance(value, list) else [value]
        total += sum(len(item) if isinstance(item, (bytes, str)) else 8 for item in items)
    return total


@dataclass
class SecureRound:
    """One secure training round of ``strategy`` (a FedMerge) through ``engine``."""

    strategy: FedMerge
    engine: RoundEngine
    space: UpdateSpace
    grid: Grid
    timeout: float
    server_round: int
    params: SecAggParams
    base_fingerprint: str = ""
    names: dict[int, str] = field(default_factory=dict)
    clear: dict[int, dict[str, int | float | str]] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0

    def run(self, messages: list[Message]) -> dict[str, float | int]:
        """Run the four stages from the round's train messages; fold the secure sum (or abort, folding nothing)."""
        nodes = [int(message.metadata.dst_node_id) for message in messages]
        try:
            setup = RoundSetup.plan(
                self.strategy._run_id, self.server_round, nodes, self.params,
                seed=derive_seed(self.strategy.seed, self.server_round, None, "secagg-graph"),
            )  # fmt: skip
        except ValueError as exc:
            self.engine.reject(None, "secagg_aborted", str(exc))
            return {"secagg-aborted": 1}
        aggregator = Aggregator(setup)
        layouts = self._advertise(aggregator, messages)
        try:
            layout = self._agree(aggregator, layouts)
            self._exchange(aggregator, "share", aggregator.share_requests(), aggregator.on_share)
            self._exchange(aggregator, "mask", aggregator.mask_requests(layout.length), aggregator.on_masked)
            self._exchange(aggregator, "unmask", aggregator.unmask_requests(), aggregator.on_unmask)
            result = aggregator.result()
            supports = self._supports()
            state, clipped = layout.to_state(self.engine.strategy, result.total, aggregator.setup.fixed, supports)
        except SecAggAborted as exc:
            log(WARNING, "round %s: secure aggregation aborted: %s", self.server_round, exc)
            self.engine.reject(None, "secagg_aborted", str(exc))
            return {"secagg-aborted": 1, **self._bytes()}
        survivors = {self._name(node): self.clear.get(node, {}) for node in result.survivors}
        self.engine.fold_secure_sum(state, survivors, nbytes=self.bytes_up)
        return {
            "secagg-survivors": len(result.survivors),
            "secagg-dropped": len(result.dropped),
            "secagg-clipped-values": clipped,
            "secagg-error-bound": aggregator.setup.fixed.error_bound(len(result.survivors)),
            "secagg-values": layout.length,
            "secagg-threshold": setup.threshold,
            "secagg-degree": max((len(p) for p in setup.neighbours.values()), default=0),
            **self._bytes(),
        }

    def _bytes(self) -> dict[str, int]:
        return {"secagg-bytes-up": self.bytes_up, "secagg-bytes-down": self.bytes_down}

    def _name(self, node: int) -> str:
        return self.names.get(node) or self.strategy._label(str(node))

    def statistics_spec(self) -> dict[str, Any]:
        """What a node needs to compute its statistics as the server would: the method and the round policy."""
        policy = self.strategy.policy
        return {
            "strategy": json.dumps(self.engine.strategy.identity(), sort_keys=True),
            "weighting": policy.weighting,
            "clip-norm": float(policy.clip_norm),
            "max-num-examples": int(policy.max_num_examples),
        }

    def _advertise(self, aggregator: Aggregator, messages: list[Message]) -> dict[int, str]:
        """Stage 1 rides on the train messages: train, compute statistics, advertise keys and layout."""
        config = ConfigRecord({"stage": "advertise", **aggregator.setup.to_config(), **self.statistics_spec()})
        for message in messages:
            message.content[SECAGG_RECORD] = config
        self.bytes_down += config_bytes(config) * len(messages)
        layouts: dict[int, str] = {}
        for node, record in self._replies(messages, "advertise"):
            if aggregator.on_advertise(node, record) is not None:
                self._refused(aggregator)
                continue
            layouts[node] = str(record.get("layout", ""))
            self.clear[node] = {k: record[k] for k in SECAGG_CLEAR_METRICS if isinstance(record.get(k), (int, float))}
            self.names[node] = str(record.get("node", "") or node)
            self.clear[node]["institution"] = self.names[node]
        return layouts

    def _agree(self, aggregator: Aggregator, layouts: Mapping[int, str]) -> StatisticsLayout:
        """The statistics layout most nodes sent, checked against the round's method and shapes; others dropped."""
        if not layouts:
            raise SecAggAborted("no node advertised keys")
        text, _ = Counter(layouts.values()).most_common(1)[0]
        try:
            layout = StatisticsLayout.from_description(text)
            layout.check(self.engine.strategy, self.space.merge_shapes)
            self._check_supports(layout)
        except ValueError as exc:
            for node in layouts:
                aggregator.exclude(node, "advertise", f"its statistics do not fit this round: {exc}")
            self._refused(aggregator)
            raise SecAggAborted(f"the nodes' statistics do not fit this round: {exc}") from None
        for node, other in layouts.items():
            if other != text:
                aggregator.exclude(node, "advertise", "its statistics are laid out unlike the other nodes'")
        self._refused(aggregator)
        return layout

    def _supports(self) -> dict[str, Any]:
        space = self.space
        return round_supports(space.sparsifier, space.seed, self.server_round, space.merge_shapes)

    def _check_supports(self, layout: StatisticsLayout) -> None:
        supports = self._supports()
        for entry in layout.entries:
            if entry.kept < 0:
                continue
            support = supports.get(entry.parameter)
            if support is None or support_digest(support) != entry.digest:
                raise ValueError(f"{entry.parameter!r} was sent on another support than this round's DARE mask")

    def _exchange(
        self, aggregator: Aggregator, stage: str, requests: Mapping[int, Any], accept: Callable[[int, Any], object]
    ) -> None:
        """Send one stage's requests; hand each reply to ``accept`` (the aggregator's method for the stage)."""
        messages = []
        for node, request in requests.items():
            stage_record = ConfigRecord({"stage": stage, **request})
            self.bytes_down += config_bytes(stage_record)
            content = RecordDict({SECAGG_RECORD: stage_record})
            messages.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN))
        for node, record in self._replies(messages, stage):
            accept(node, record)
        self._refused(aggregator)

    def _replies(self, messages: list[Message], stage: str) -> Iterator[tuple[int, dict[str, Any]]]:
        """Each valid stage reply as (node, record); errors, missing and unsigned replies are rejected."""
        replied: set[int] = set()
        destinations: dict[str, int] = {}
        for reply in stream_replies(self.grid, messages, timeout=self.timeout):
            if reply.metadata.reply_to_message_id not in destinations:  # ids exist once the grid pushed them
                destinations = instruction_destinations(messages)
            node = reply_node(reply, destinations)  # a SuperLink-made error names the node it answers for
            replied.add(node)
            record = self._record(reply, node, stage)
            if record is not None:
                yield node, record
        for message in messages:
            node = int(message.metadata.dst_node_id)
            if node not in replied:
                self.engine.reject(self._name(node), "timed_out", f"no {stage!r} reply within {self.timeout:g} s")

    def _record(self, reply: Message, node: int, stage: str) -> dict[str, Any] | None:
        """The reply's stage fields (its masked vector as bytes), or None after recording why it is refused."""
        if reply.has_error():
            self.engine.reject(self._name(node), reply_error_reason(reply), short_reason(reply.error.reason))
            return None
        try:
            values = read_secagg(reply.content)
        except ValueError as exc:
            self.engine.reject(self._name(node), "secagg_protocol", f"{stage}: {exc}")
            return None
        if values is None or values.get("stage") != stage:
            self.engine.reject(self._name(node), "secagg_protocol", f"reply carries no {stage!r} stage record")
            return None
        self.bytes_up += config_bytes(values)
        try:
            self._verify(reply, node, reply.content.config_records[SECAGG_RECORD])
        except Rejected as exc:
            self.engine.reject(self._name(node), exc.reason, str(exc))
            return None
        return values

    def _verify(self, reply: Message, node: int, record: Mapping[str, Any]) -> None:
        """With a signer registry: the reply's ConfigRecord (which binds a masked vector by its SHA-256) must be
        signed by the institution the node named."""
        registry = self.strategy.registry
        if registry is None:
            return
        signed = reply.content.config_records.get(SIGNATURE_RECORD)
        signature = UpdateSignature.from_config(signed) if signed is not None else None
        signer = registry.verify(
            signature, run_id=self.strategy._run_id, round_number=self.server_round,
            base_fingerprint=self.base_fingerprint, payload=canonical(record),
        )  # fmt: skip
        claimed = str(record.get("node", "") or self.names.get(node, ""))
        if claimed and signer != claimed:
            raise Rejected("signer_mismatch", f"stage reply names node {claimed} but {signer} signed it")
        self.names.setdefault(node, signer)
        self.engine.signatures_verified += 1

    def _refused(self, aggregator: Aggregator) -> None:
        """Move the aggregator's new refusals into the round's rejections."""
        for refusal in aggregator.refusals:
            self.engine.reject(self._name(refusal.node), "secagg_protocol", f"{refusal.stage}: {refusal.message}")
        aggregator.refusals.clear()
