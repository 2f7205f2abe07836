"""Send messages and yield replies one by one as they arrive, so the caller can fold and drop each.

Flower's ``Grid.send_and_receive`` returns only when every reply is in, holding them all; this
generator pushes the messages, then polls ``pull_messages`` for the ones still pending. With
``ordered=True`` it yields replies in the order the messages were pushed, pulling only the next
one expected: later replies wait in the SuperLink, not in the server, so memory is still one reply,
and a floating-point merge sums in the same order whenever the run is repeated or resumed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid


def stream_replies(
    grid: Grid, messages: Iterable[Message], *, timeout: float, poll_interval: float = 0.1, ordered: bool = False
) -> Iterator[Message]:
    """Push ``messages`` and yield each reply when it arrives, until all are in or ``timeout`` passes.

    ``ordered``: yield in push order (a late reply holds back the later ones until it arrives or the
    time-out passes; then whatever else arrived is still yielded, in order).
    """
    pushed = [message_id for message_id in grid.push_messages(messages) if message_id]
    deadline = time.monotonic() + timeout
    if ordered:
        yield from _in_order(grid, pushed, deadline, poll_interval)
        return
    pending = set(pushed)
    while pending and time.monotonic() < deadline:
        arrived = False
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            arrived = True
            yield reply
        if not arrived:
            time.sleep(poll_interval)


def _in_order(grid: Grid, message_ids: list[str], deadline: float, poll_interval: float) -> Iterator[Message]:
    waiting = list(reversed(message_ids))
    while waiting and time.monotonic() < deadline:
        replies = list(grid.pull_messages([waiting[-1]]))
        if replies:
            waiting.pop()
            yield replies[0]
        else:
            time.sleep(poll_interval)
    for message_id in reversed(waiting):  # past the deadline: the replies that did arrive, one by one
        yield from grid.pull_messages([message_id])


def wait_for_nodes(grid: Grid, count: int, timeout: float, poll_interval: float = 0.2) -> list[int]:
    """The connected node ids, once at least ``count`` are connected (or whatever is there at ``timeout``)."""
    deadline = time.monotonic() + timeout
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < count and time.monotonic() < deadline:
        time.sleep(poll_interval)
        nodes = sorted(grid.get_node_ids())
    return nodes
