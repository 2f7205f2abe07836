"""One client's round without Flower: train on the local share, form the task vector, shrink it, encode it.

Full mode sends τ = θ_local − θ_round, sparsified on the client (with error feedback when enabled)
and optionally with a diagonal Fisher. LoRA mode sends each module's A and B factors and the head's
task vector dense (they are small); the server forms ΔW = s·B·A and sparsifies there, so TIES and
DARE act on ΔW.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedfuse.algebra import Sparsifier, dare_seed_fn, derive_seed, sparsify_update
from fedfuse.client.error_feedback import ErrorFeedback
from fedfuse.settings import RunSettings
from fedfuse.training.data import client_split, data_for, tokenize
from fedfuse.training.loop import Evaluation, evaluate, fisher_diagonal, steps_for, train
from fedfuse.training.models import attach_lora, base_model, global_state, load_global_state, lora_update
from fedfuse.wire import UpdateHeader, encode_update, fingerprint


@dataclass(frozen=True)
class Shard:
    """Which share of the run's partition a client owns, and the name it sends its updates under.

    A gateway node splits its share over ``members`` institutions behind it; ``member`` picks one.
    """

    partition_id: int
    num_partitions: int
    node_name: str
    member: int = 0
    members: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.partition_id < self.num_partitions:
            raise ValueError(f"partition-id {self.partition_id} is outside [0, {self.num_partitions})")
        if not 0 <= self.member < self.members:
            raise ValueError(f"member {self.member} is outside [0, {self.members})")

    def member_shard(self, member: int, members: int) -> Shard:
        """The share of one of ``members`` institutions behind this node (a gateway's member)."""
        return Shard(self.partition_id, self.num_partitions, f"{self.node_name}/member-{member}", member, members)


@dataclass(frozen=True)
class LocalResult:
    """An encoded update and what the client reports about it."""

    payload: bytes
    num_examples: int
    train_loss: float


def local_data(settings: RunSettings, shard: Shard, tokenizer):
    """The client's tokenized local train and evaluation examples."""
    data = data_for(settings, shard.num_partitions)
    share = data.train.subset(data.partitions[shard.partition_id])
    tokens = tokenize(share, tokenizer, settings.max_length, settings.task)
    train_pos, eval_pos = client_split(len(tokens), settings.client_eval_examples, settings.seed, shard.partition_id)
    if shard.members > 1:
        train_pos = np.array_split(train_pos, shard.members)[shard.member]
    return tokens.rows(train_pos), tokens.rows(eval_pos), data.domain_names


def round_model(settings: RunSettings, changed: dict[str, torch.Tensor]):
    """The round's model (base + the broadcast parameters), its full weights and the tokenizer."""
    model, tokenizer = base_model(settings)
    load_global_state(model, changed)
    return model, global_state(model), tokenizer


def evaluate_locally(settings: RunSettings, changed: dict[str, torch.Tensor], shard: Shard) -> Evaluation:
    """The round's global model on the client's held-out local examples."""
    torch.set_num_threads(settings.client_threads)
    model, _, tokenizer = round_model(settings, changed)
    _, local_eval, domains = local_data(settings, shard, tokenizer)
    return evaluate(model, local_eval, domains)


def run_local_round(
    settings: RunSettings,
    changed: dict[str, torch.Tensor],
    *,
    round_number: int,
    run_id: str,
    shard: Shard,
    error_feedback: ErrorFeedback | None = None,
) -> LocalResult:
    """Train from the round's weights and return the encoded update (see the module docstring).

    ``changed`` holds the parameters the server broadcast: those that differ from the base model.
    """
    torch.set_num_threads(settings.client_threads)
    model, round_state, tokenizer = round_model(settings, changed)
    round_state = {name: tensor.clone() for name, tensor in round_state.items()}
    local_train, _, _ = local_data(settings, shard, tokenizer)
    if settings.mode == "lora":
        model = attach_lora(model, settings, round_number)
    steps = steps_for(len(local_train), settings.batch_size, settings.local_steps, settings.local_epochs)
    seed = derive_seed(settings.seed, round_number, shard.node_name, "train")
    loss = train(
        model, local_train, steps=steps, batch_size=settings.batch_size, learning_rate=settings.lr, seed=seed
    )
    fisher = None
    if settings.mode == "lora":
        tensors = lora_update(model, round_state)
        sparsifier = Sparsifier()
    else:
        current = dict(model.named_parameters())
        tau = {name: current[name].detach() - round_state[name] for name in round_state}
        sparsifier = settings.sparsifier_spec
        seed_for = dare_seed_fn(settings.seed, round_number, shard.node_name, settings.seed_scope)
        if error_feedback is not None and sparsifier.kind != "none":
            tensors = error_feedback.compress(tau, seed_for)
        else:
            tensors = sparsify_update(tau, sparsifier, seed_for)
        if settings.fisher_batch_count:
            fisher = fisher_diagonal(
                model, local_train, num_batches=settings.fisher_batch_count, batch_size=settings.batch_size, seed=seed + 1
            )
    header = UpdateHeader(
        run_id=run_id,
        round=round_number,
        base_fingerprint=fingerprint(round_state),
        node_id=shard.node_name,
        num_examples=len(local_train),
        sparsifier=sparsifier,
        metrics={"train-loss": loss},
    )
    payload = encode_update(tensors, header=header, value_dtype=settings.wire_dtype, fisher=fisher)
    return LocalResult(payload, len(local_train), loss)
