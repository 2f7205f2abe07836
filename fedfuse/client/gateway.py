"""A tier gateway: trains (or collects) several institutions' updates and forwards one partial state.

The gateway folds each member's update through a :class:`~fedfuse.rounds.RoundEngine` exactly as the
server would (same update space, same validation) and sends the engine's sufficient statistics.
Because every strategy's state is a monoid, the server's result equals a flat merge of all members;
the server never sees the members' individual updates. Each member keeps its own error-feedback
residual, as it would as a plain client.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedfuse.client.error_feedback import ErrorFeedback
from fedfuse.client.local_round import Shard, finite_metrics, round_model, run_local_round
from fedfuse.settings import RunSettings
from fedfuse.training.run_model import lora_scale, update_shapes
from fedfuse.wire import UpdateHeader, fingerprint


@dataclass(frozen=True)
class GatewayResult:
    """The encoded partial state and what the gateway's members did."""

    payload: bytes
    num_examples: int
    train_loss: float


def run_gateway_round(
    settings: RunSettings,
    changed: dict[str, torch.Tensor],
    *,
    round_number: int,
    run_id: str,
    shard: Shard,
    members: int,
    tier: str = "",
    error_feedback: Sequence[ErrorFeedback | None] | None = None,
    model_version: str = "",
) -> GatewayResult:
    """Train ``members`` institutions on slices of this node's share and merge them into one partial state.

    ``error_feedback`` holds one residual store per member (None entries: no feedback for that member).
    """
    if not settings.merge.spec.capabilities.mergeable:
        raise ValueError(
            f"gateway {shard.node_name}: strategy {settings.merge.strategy!r} is not a monoid, "
            "so its members' updates cannot be forwarded as one partial state; run them as plain clients"
        )
    if members < 2:
        raise ValueError(f"a gateway needs at least 2 members, got {members}")
    feedback = list(error_feedback) if error_feedback is not None else [None] * members
    if len(feedback) != members:
        raise ValueError(f"a gateway with {members} members needs {members} error-feedback stores, got {len(feedback)}")
    if model_version:
        base_fingerprint = model_version
    else:
        _, round_state, _ = round_model(settings, changed)
        base_fingerprint = fingerprint(round_state)
    engine = settings.round_engine(
        settings.update_space(update_shapes(settings), lora_scale(settings)),
        round_number=round_number,
        run_id=run_id,
        base_fingerprint=base_fingerprint,
        bind_senders=False,
        gateway=True,
    )
    examples, loss, loss_examples = 0, 0.0, 0
    for member in range(members):
        result = run_local_round(
            settings,
            changed,
            round_number=round_number,
            run_id=run_id,
            shard=shard.member_shard(member, members),
            error_feedback=feedback[member],
            model_version=base_fingerprint,
        )
        rejection = engine.offer(result.payload)
        if rejection is not None:
            raise RuntimeError(f"gateway {shard.node_name}: member {member} update rejected: {rejection.message}")
        examples += result.num_examples
        if math.isfinite(result.train_loss):  # a member whose batches held no supervised token reports none
            loss += result.train_loss * result.num_examples
            loss_examples += result.num_examples
    train_loss = loss / loss_examples if loss_examples else math.nan
    header = UpdateHeader(
        run_id=run_id,
        round=round_number,
        base_fingerprint=base_fingerprint,
        node_id=shard.header_node,
        num_examples=examples,
        metrics={**finite_metrics({"members": members, "train-loss": train_loss}), "institution": shard.node_name},
        tier=tier,
    )
    return GatewayResult(engine.encode_partial(header), examples, train_loss)
