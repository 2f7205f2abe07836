"""A tier gateway: trains (or collects) several institutions' updates and forwards one partial state.

The gateway folds each member's update into a merge state exactly as the server would (same update
space, same validation) and sends the state's sufficient statistics. Because every strategy's state
is a monoid, the server's result equals a flat merge of all members; the server never sees the
members' individual updates.
"""

from __future__ import annotations

import torch

from fedfuse.client.local_round import Shard, round_model, run_local_round
from fedfuse.server.strategy import build_merge_strategy
from fedfuse.server.update_space import UpdateSpace
from fedfuse.settings import RunSettings
from fedfuse.training.models import lora_scale, update_shapes
from fedfuse.wire import Expectation, UpdateHeader, encode_partial, fingerprint


def run_gateway_round(
    settings: RunSettings,
    changed: dict[str, torch.Tensor],
    *,
    round_number: int,
    run_id: str,
    shard: Shard,
    members: int,
) -> tuple[bytes, int, float]:
    """Train ``members`` institutions on slices of this node's share.

    Returns the encoded partial state, the members' examples and their example-weighted train loss.
    """
    if members < 2:
        raise ValueError(f"a gateway needs at least 2 members, got {members}")
    _, round_state, _ = round_model(settings, changed)
    base_fingerprint = fingerprint(round_state)
    space = UpdateSpace(settings, update_shapes(settings), lora_scale(settings))
    expect = Expectation(shapes=space.wire_shapes, round=round_number, run_id=run_id, base_fingerprint=base_fingerprint)
    aggregator = space.aggregator(build_merge_strategy(settings), expect, round_number)
    examples, loss = 0, 0.0
    for member in range(members):
        result = run_local_round(
            settings, changed, round_number=round_number, run_id=run_id, shard=shard.member_shard(member, members)
        )
        rejection = aggregator.offer_update(result.payload)
        if rejection is not None:
            raise RuntimeError(f"gateway {shard.node_name}: member {member} update rejected: {rejection.message}")
        examples += result.num_examples
        loss += result.train_loss * result.num_examples
    header = UpdateHeader(
        run_id=run_id,
        round=round_number,
        base_fingerprint=base_fingerprint,
        node_id=shard.node_name,
        num_examples=examples,
        metrics={"members": members},
    )
    return encode_partial(aggregator.state, header=header), examples, loss / max(examples, 1)
