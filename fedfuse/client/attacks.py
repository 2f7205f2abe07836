"""Simulated attackers (run config ``attack``, ``attackers``, ``attack-scale``): a testing feature.

A client whose partition id is listed in ``attackers`` misbehaves in one chosen way, so a researcher
can measure what a merge strategy withstands (``fedfuse bench robust``). Model attacks change the
task vector before it is sparsified and sent; ``label_flip`` poisons the training labels; and
``inflate_examples`` lies about the number of examples. Every other client is untouched.

Attackers are simulation devices, not part of the production client: :func:`attack_mod` sits between
the uplink mod and fedfuse's training handler and :func:`attacked_datasets` wraps its data loading
(:func:`attacker_client_app`, which ``fedfuse simulate`` uses when the run names an attack);
:func:`simulated_local_round` is the same for the Flower-free rounds of ``fedfuse bench robust``.
``clientapp = "fedfuse.client.attacks:app"`` runs them under ``flwr run``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedfuse.algebra import derive_seed
from fedfuse.algebra.lora import LORA_A_SUFFIX
from fedfuse.client.app import make_client_app, run_settings, shard_of
from fedfuse.client.local_round import LocalResult, Shard, client_datasets, encode_round, train_locally
from fedfuse.client.mods import FACTORS_RECORD, TASK_VECTOR_RECORD, UPLINK_RECORD
from fedfuse.client.uplink import TrainedUpdate
from fedfuse.messages import RoundInstruction, record_tensors
from fedfuse.settings import RunSettings
from fedfuse.settings.attack import AttackSettings
from fedfuse.training.client_datasets import ClientDatasets
from fedfuse.wire import MAX_NUM_EXAMPLES

MODEL_ATTACKS = ("sign_flip", "noise", "scale")
"""Attacks on the task vector (the others act on the data or the header)."""


def flipped_labels(data: ClientDatasets) -> ClientDatasets:
    """The training examples with every class label y replaced by L − 1 − y (evaluation data untouched)."""
    count = len(data.label_names)
    labels = data.train.labels
    flipped = torch.where(labels >= 0, count - 1 - labels, labels)
    return dataclasses.replace(data, train=dataclasses.replace(data.train, labels=flipped))


def attacked_tensors(
    tensors: dict[str, torch.Tensor], attack: AttackSettings, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The tensors an attacker sends instead of its true task vector (or LoRA factors).

    ``sign_flip`` sends −s·τ and ``scale`` s·τ (for LoRA, B and the head are scaled, so ΔW = s·B·A
    scales the same way); ``noise`` replaces each tensor by Gaussian noise of s times its norm.
    """
    scale = attack.attack_scale
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if attack.attack == "noise":
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(tensor.dtype)
            out[name] = noise * (scale * float(tensor.norm()) / max(1e-12, float(noise.norm())))
        elif name.endswith(LORA_A_SUFFIX):
            out[name] = tensor
        else:
            out[name] = tensor * (-scale if attack.attack == "sign_flip" else scale)
    return out


def reported_examples(num_examples: int, attack: AttackSettings) -> int:
    """What an ``inflate_examples`` attacker reports: s times its true number of examples."""
    if attack.attack != "inflate_examples":
        return num_examples
    return min(MAX_NUM_EXAMPLES, round(num_examples * attack.attack_scale))


def attacked_datasets(settings: RunSettings, shard: Shard, tokenizer: Any) -> ClientDatasets:
    """The shard's datasets, with flipped training labels for a ``label_flip`` attacker."""
    data = client_datasets(settings, shard, tokenizer)
    if settings.attack.attack == "label_flip" and settings.attack.attacks(shard.partition_id):
        return flipped_labels(data)
    return data


def _attack_generator(settings: RunSettings, round_number: int, shard: Shard) -> torch.Generator:
    """The attacker's noise generator, seeded from its round's training seed."""
    return torch.Generator().manual_seed(derive_seed(settings.run.seed, round_number, shard.node_name, "train") + 2)


def attacked_update(update: TrainedUpdate, attack: AttackSettings, generator: torch.Generator) -> TrainedUpdate:
    """What an attacker sends instead of ``update``: its tensors attacked, or its example count inflated."""
    if attack.attack in MODEL_ATTACKS:
        update = update.with_tensors(attacked_tensors(update.tensors, attack, generator))
    return dataclasses.replace(update, num_examples=reported_examples(update.num_examples, attack))


def attack_mod(overrides: Mapping[str, Any] | None = None) -> Mod:
    """A mod between the uplink and fedfuse's training handler: a listed partition attacks its update.

    The handler's τ (or LoRA factors) and example count are replaced before the uplink shrinks, heads
    and encodes them; honest nodes, evaluate messages and a gateway's partial states pass through.
    """
    extra = dict(overrides or {})

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        settings = run_settings(context, extra)
        shard = shard_of(context, settings)
        arrays = reply.content.array_records
        key = FACTORS_RECORD if FACTORS_RECORD in arrays else TASK_VECTOR_RECORD
        if not settings.attack.attacks(shard.partition_id) or key not in arrays:
            return reply
        facts = reply.content.config_records[UPLINK_RECORD]
        round_number = RoundInstruction.from_message(msg).server_round
        update = TrainedUpdate(record_tensors(arrays[key]), int(facts["num-examples"]))  # type: ignore[arg-type]
        attacked = attacked_update(update, settings.attack, _attack_generator(settings, round_number, shard))
        reply.content[key] = ArrayRecord(attacked.tensors)
        facts["num-examples"] = attacked.num_examples
        return reply

    return mod


def attacker_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """fedfuse's ClientApp with the simulated attackers the run config names (honest nodes unchanged)."""
    return make_client_app(overrides, simulated=[attack_mod(overrides)], datasets=attacked_datasets)


def simulated_local_round(
    settings: RunSettings, changed: dict[str, torch.Tensor], *, round_number: int, run_id: str, shard: Shard
) -> LocalResult:
    """``run_local_round`` with the run's simulated attackers (the Flower-free rounds of ``fedfuse bench robust``)."""
    trained = train_locally(settings, changed, round_number=round_number, shard=shard, datasets=attacked_datasets)
    if settings.attack.attacks(shard.partition_id):
        generator = _attack_generator(settings, round_number, shard)
        trained = dataclasses.replace(trained, update=attacked_update(trained.update, settings.attack, generator))
    return encode_round(settings, trained, run_id=run_id, round_number=round_number, shard=shard)


app = attacker_client_app()
"""A ClientApp with simulated attackers for ``flwr run`` (``clientapp = "fedfuse.client.attacks:app"``)."""
