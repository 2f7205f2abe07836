"""Send messages and yield replies one by one as they arrive, so the caller can fold and drop each.

Flower's ``Grid.send_and_receive`` returns only when every reply is in, holding them all; this
generator pushes the messages, then polls ``pull_messages`` for the ones still pending.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid


def stream_replies(
    grid: Grid, messages: Iterable[Message], *, timeout: float, poll_interval: float = 0.1
) -> Iterator[Message]:
    """Push ``messages`` and yield each reply when it arrives, until all are in or ``timeout`` passes."""
    pending = {message_id for message_id in grid.push_messages(messages) if message_id}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        arrived = False
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            arrived = True
            yield reply
        if not arrived:
            time.sleep(poll_interval)


def wait_for_nodes(grid: Grid, count: int, timeout: float, poll_interval: float = 0.2) -> list[int]:
    """The connected node ids, once at least ``count`` are connected (or whatever is there at ``timeout``)."""
    deadline = time.monotonic() + timeout
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < count and time.monotonic() < deadline:
        time.sleep(poll_interval)
        nodes = sorted(grid.get_node_ids())
    return nodes
