"""An in-process Flower Grid whose nodes run a real mod chain and train handler (no Ray, no processes).

Each node keeps its own ``Context`` across messages, as a SuperNode does; ``silent`` makes a node stop
answering from a given secure-aggregation stage on (as if killed), so the server's deadline passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace

from flwr.app import Context, Message, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from seeded_grid import InProcessGrid

from fedfuse.messages import SECAGG_RECORD

Handler = Callable[[Message, Context], Message]


class ModGrid(InProcessGrid):
    """Nodes answer pushed messages at once with ``mods`` around ``handler`` (Flower's mod order)."""

    def __init__(self, nodes: Sequence[int], handler: Handler, mods: Sequence = (), node_config=None) -> None:
        self.nodes = list(nodes)
        self.run = SimpleNamespace(run_id=1)
        self.handler, self.mods = handler, list(mods)
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config=dict((node_config or {}).get(node, {})),
                          state=RecordDict(), run_config={})
            for node in self.nodes
        }  # fmt: skip
        self.pending: dict[str, Message] = {}
        self.pushed = 0
        self.silent: dict[int, str] = {}
        """node → the stage from which it no longer answers ("advertise", "share", "mask", "unmask")."""
        self.unavailable: dict[int, str] = {}
        """node → the stage from which the SuperLink answers for it: NODE_UNAVAILABLE (missed heartbeats)."""
        self.stages: list[str] = []
        self.tamper: Callable[[int, Message], Message] | None = None

    def _reply(self, message: Message) -> Message | None:
        node = int(message.metadata.dst_node_id)
        record = message.content.config_records.get(SECAGG_RECORD)
        stage = str(record["stage"]) if record is not None else ""
        if stage:
            self.stages.append(stage)
        order = ["advertise", "share", "mask", "unmask"]
        if node in self.silent and stage and order.index(stage) >= order.index(self.silent[node]):
            return None
        if node in self.unavailable and stage and order.index(stage) >= order.index(self.unavailable[node]):
            return create_message_error_unavailable_res_message(message.metadata, "node_unavail")
        call = self.handler
        for mod in reversed(self.mods):
            call = (lambda m, inner: lambda msg, ctx: m(msg, ctx, inner))(mod, call)
        reply = call(message, self.contexts[node])
        reply.metadata.__dict__["_src_node_id"] = node
        if self.tamper is not None:
            reply = self.tamper(node, reply)
        return reply
