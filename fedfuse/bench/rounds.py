"""Federated rounds in one process: the ClientApp's local round and the server's round engine, without Flower.

Benchmarks that need many runs (``fedfuse bench robust``) use this instead of Flower's simulation
engine: every client trains with :func:`~fedfuse.client.attacks.simulated_local_round` (the production local
round plus the run's simulated attack, compression and seeds included) and every payload goes through the run's
round policy and server optimizer, exactly as in ``fedfuse simulate``; only the transport (and its start-up
time) is left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fedfuse.client.attacks import simulated_local_round
from fedfuse.client.local_round import Shard
from fedfuse.server.evaluation import ServerEvaluator
from fedfuse.settings import RunSettings
from fedfuse.training.run_model import base_model, global_state, lora_scale, update_shapes
from fedfuse.wire import fingerprint

RUN_ID = "fedfuse-bench"


@dataclass
class RoundsResult:
    """Server accuracy after each round and the round engine's metrics."""

    accuracy: list[float] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)


def run_rounds(
    settings: RunSettings, clients: int, *, on_round: Callable[[int, float], None] | None = None
) -> RoundsResult:
    """``num-server-rounds`` rounds of ``clients`` clients (all sampled), evaluated on the server's split."""
    model, _ = base_model(settings)
    base = {name: tensor.clone() for name, tensor in global_state(model).items()}
    del model
    weights = dict(base)
    space = settings.update_space(update_shapes(settings), lora_scale(settings))
    evaluator = ServerEvaluator(settings)
    optimizer = settings.round_policy.optimizer()  # the run's server optimizer steps on every round's merge
    result = RoundsResult()
    for round_number in range(1, settings.run.num_server_rounds + 1):
        changed = {name: t for name, t in weights.items() if not torch.equal(t, base[name])}
        engine = settings.round_engine(
            space,
            round_number=round_number,
            run_id=RUN_ID,
            base_fingerprint=fingerprint(weights),
            bind_senders=False,
        )
        for partition in range(clients):
            shard = Shard(partition, clients, f"partition-{partition}")
            local = simulated_local_round(settings, changed, round_number=round_number, run_id=RUN_ID, shard=shard)
            engine.offer(local.payload)
        weights = optimizer.apply(engine, weights) or weights
        accuracy = float(evaluator.of_weights(weights)["accuracy"])  # type: ignore[arg-type]
        result.accuracy.append(accuracy)
        result.metrics.append(dict(engine.metrics()))
        if on_round:
            on_round(round_number, accuracy)
    return result
