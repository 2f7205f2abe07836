"""An in-process Flower Grid for driving fedfuse's server strategy without training or Ray.

Its nodes say their names and answer ``train`` with a seeded update; a test can make one node's
reply the SuperLink's own error instead (a node that stopped sending heartbeats).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import SimpleNamespace

import torch
from flwr.app import Message, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from fedfuse.messages import CONFIG_RECORD, SYNC_CONFIG_RECORD, SYNC_RECORD, NodeName, TrainReply, sync_records
from fedfuse.rounds import Sync
from fedfuse.wire import UpdateHeader, encode_update


def train_content(config, version: str = "v:base") -> RecordDict:
    """A train message's content for a node at the run's base: the instruction and a sync to ``version``."""
    arrays, sync_config = sync_records(Sync(version, state={}))
    return RecordDict({SYNC_RECORD: arrays, SYNC_CONFIG_RECORD: sync_config, CONFIG_RECORD: config})


class InProcessGrid(ABC):
    """What Flower's Grid does on push and pull, in process: each pushed message is answered at once by ``_reply``."""

    nodes: tuple[int, ...] | list[int]
    pending: dict[str, Message]
    pushed: int

    @abstractmethod
    def _reply(self, message: Message) -> Message | None:
        """The node's answer to ``message``, or None when it never answers."""

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            self.pushed += 1
            ids.append(f"message-{self.pushed}")
            message.metadata.__dict__["_message_id"] = ids[-1]  # what Flower's in-memory Grid does on push
            reply = self._reply(message)
            if reply is not None:  # a node that never answers: the server's deadline passes
                self.pending[ids[-1]] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.pending.pop(i) for i in message_ids if i in self.pending]


class SeededGrid(InProcessGrid):
    """An in-process Grid: nodes say their names and answer ``train`` with a seeded update (no training)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], nodes: tuple[int, ...] = (11, 12, 13), tiers=None) -> None:
        self.shapes, self.nodes, self.tiers = shapes, nodes, tiers or {}
        self.pending: dict[str, Message] = {}
        self.pushed = 0
        self.unavailable: set[int] = set()
        """Nodes whose train messages the SuperLink answers with NODE_UNAVAILABLE (missed heartbeats)."""

    def _reply(self, message: Message) -> Message:
        node = int(message.metadata.dst_node_id)
        if node in self.unavailable and not NodeName.is_query(message):
            return create_message_error_unavailable_res_message(message.metadata, "node_unavail")
        if NodeName.is_query(message):
            return NodeName(f"institution-{node}").reply_to(message)
        config = message.content.config_records[CONFIG_RECORD]
        round_number = int(config["server-round"])
        generator = torch.Generator().manual_seed(1000 * node + round_number)
        tau = {name: 0.05 * torch.randn(shape, generator=generator) for name, shape in self.shapes.items()}
        header = UpdateHeader(
            run_id=str(config["run-id"]),
            round=round_number,
            base_fingerprint=str(config["base-fingerprint"]),
            node_id=str(node),
            num_examples=node,
            metrics={"train-loss": 1.0},
            tier=self.tiers.get(node, ""),
        )
        return TrainReply("update", encode_update(tau, header=header)).reply_to(message)


class LoopbackGrid:
    """The two things ``configure_train`` asks of a grid: connected node ids and the run."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.run = SimpleNamespace(run_id=1)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)
