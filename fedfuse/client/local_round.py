"""One client's round without Flower: train on the local data, form the task vector, shrink it, encode it.

Training goes through the run's trainer (built-in or the user's, see ``fedfuse.training.trainers``)
on the client's device; everything after training is fedfuse's. Full mode sends
τ = θ_local − θ_round, sparsified on the client (with error feedback when enabled) and optionally
with a diagonal Fisher. For RegMean either mode adds the Gram matrices of its linear layers' inputs.
LoRA mode sends each module's A and B factors and the head's task vector dense (they are small);
the server forms ΔW = s·B·A and sparsifies there, so TIES and DARE act on ΔW.
A node may train at its own LoRA rank rₖ ≤ the run's ``lora-rank`` r (node config ``lora-rank``): it
sends its factors at rank r (:func:`to_run_rank`), so every node's payload has the shapes the server expects.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedfuse.algebra import Sparsifier, UpdateTensor, dare_seed_fn, derive_seed, factor_names, lora_modules
from fedfuse.algebra.lora import pad_factors
from fedfuse.algebra.noise import add_gaussian_noise
from fedfuse.algebra.robust import clip_factor, scale_update, update_norm
from fedfuse.client.attacks import MODEL_ATTACKS, attacked_tensors, flipped_labels, reported_examples
from fedfuse.client.error_feedback import ErrorFeedback, shrink_update
from fedfuse.data.files import DataSource
from fedfuse.rounds.privacy import noise_generator
from fedfuse.settings import RunSettings
from fedfuse.timing import Phases
from fedfuse.training.client_data import ClientDatasets, NodeData, load_client_datasets
from fedfuse.training.device import (
    autocast_dtype,
    client_device,
    enable_gradient_checkpointing,
    quantize_4bit,
)
from fedfuse.training.gram import gram_matrices, gram_targets
from fedfuse.training.loop import Evaluation, evaluate, fisher_diagonal, steps_for
from fedfuse.training.models import (
    attach_lora,
    base_model,
    global_state,
    load_global_state,
    lora_update,
)
from fedfuse.training.trainers import TrainingRound, as_result, resolve_trainer
from fedfuse.wire import UpdateHeader, encode_update, fingerprint


@dataclass(frozen=True)
class Shard:
    """Which share of the run's data a client owns, and the name it sends its updates under.

    A gateway node splits its share over ``members`` institutions behind it; ``member`` picks one.
    ``node_data`` holds the node's own files (node config ``data`` / ``eval-data``), if any.
    ``lora_rank`` is the node's own LoRA rank (node config ``lora-rank``, at most the run's); 0: the run's.
    ``node_name`` seeds training and DARE masks and names the node in reports; ``sender`` (when set)
    is the identity its payload headers carry instead: the Flower node id in unsigned runs, so the
    server can bind each update to the node that sent it.
    """

    partition_id: int
    num_partitions: int
    node_name: str
    member: int = 0
    members: int = 1
    node_data: NodeData = field(default_factory=NodeData)
    sender: str = ""
    lora_rank: int = 0

    @property
    def header_node(self) -> str:
        """The node id its payload headers carry."""
        return self.sender or self.node_name

    def __post_init__(self) -> None:
        if not 0 <= self.partition_id < self.num_partitions:
            raise ValueError(f"partition-id {self.partition_id} is outside [0, {self.num_partitions})")
        if not 0 <= self.member < self.members:
            raise ValueError(f"member {self.member} is outside [0, {self.members})")
        if self.lora_rank < 0:
            raise ValueError(f"node lora-rank must be >= 1 (or 0: the run's), got {self.lora_rank}")

    def member_shard(self, member: int, members: int) -> Shard:
        """The share of one of ``members`` institutions behind this node (a gateway's member)."""
        name = f"{self.node_name}/member-{member}"
        return Shard(
            self.partition_id, self.num_partitions, name, member, members, self.node_data, lora_rank=self.lora_rank
        )


@dataclass(frozen=True)
class LocalResult:
    """An encoded update and what the client reports about it."""

    payload: bytes
    num_examples: int
    train_loss: float
    source: DataSource
    train_seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds per phase of the round (:data:`fedfuse.timing.CLIENT_PHASES`)."""


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The finite entries of a trainer's metrics (a trainer that reports no loss gives NaN)."""
    return {key: float(value) for key, value in metrics.items() if math.isfinite(float(value))}


def client_datasets(settings: RunSettings, shard: Shard, tokenizer: object) -> ClientDatasets:
    """The client's train and validation data for its shard."""
    return load_client_datasets(
        settings,
        tokenizer,
        partition_id=shard.partition_id,
        num_partitions=shard.num_partitions,
        node=shard.node_data,
        member=shard.member,
        members=shard.members,
    )


def round_model(settings: RunSettings, changed: dict[str, torch.Tensor]):
    """The round's model (base + the broadcast parameters), its full weights and the tokenizer."""
    model, tokenizer = base_model(settings)
    load_global_state(model, changed)
    return model, global_state(model), tokenizer


def evaluate_locally(
    settings: RunSettings, changed: dict[str, torch.Tensor], shard: Shard
) -> tuple[Evaluation, DataSource]:
    """The round's global model on the client's held-out local examples, and which data it used."""
    torch.set_num_threads(settings.training.client_threads)
    model, _, tokenizer = round_model(settings, changed)
    data = client_datasets(settings, shard, tokenizer)
    model.to(client_device(settings))
    return evaluate(model, data.eval, data.domain_names), data.source


def _training_model(
    settings: RunSettings, model: torch.nn.Module, round_number: int, device: torch.device
) -> torch.nn.Module:
    if settings.training.quantization == "4bit":
        model = quantize_4bit(model, device)
    else:
        model.to(device)
    if settings.training.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if settings.training.mode == "lora":
        model = attach_lora(model, settings, round_number)
    return model


def _attacked(
    settings: RunSettings, attacker: bool, tensors: dict[str, torch.Tensor], seed: int
) -> dict[str, torch.Tensor]:
    """The task vector (or LoRA factors) a simulated attacker sends instead; honest clients' unchanged."""
    if not attacker or settings.attack.attack not in MODEL_ATTACKS:
        return tensors
    return attacked_tensors(tensors, settings.attack, torch.Generator().manual_seed(seed + 2))


def locally_private(
    tensors: dict[str, UpdateTensor], settings: RunSettings, round_number: int, node: str
) -> dict[str, UpdateTensor]:
    """Local DP: the update clipped to C, then N(0, σ²C²) on every entry it carries (DARE: its round mask)."""
    privacy = settings.privacy
    clipped = scale_update(tensors, clip_factor(update_norm(tensors), privacy.dp_clip_norm))
    generator = noise_generator(settings, round_number, f"local|{node}")
    std = privacy.dp_noise_multiplier * privacy.dp_clip_norm
    return {name: add_gaussian_noise(clipped[name], std, generator) for name in sorted(clipped)}


def node_settings(settings: RunSettings, shard: Shard) -> RunSettings:
    """The settings the node trains with: the run's, at the node's own LoRA rank when it has one."""
    rank, run_rank = shard.lora_rank, settings.training.lora_rank
    if settings.training.mode != "lora" or rank in (0, run_rank):
        return settings
    if rank > run_rank:
        raise ValueError(
            f"node lora-rank {rank} exceeds the run's lora-rank {run_rank}, the largest rank the server accepts"
        )
    return settings.replace(lora_rank=rank, lora_node_ranks="")  # this node's rank is now the rank


def to_run_rank(factors: Mapping[str, torch.Tensor], settings: RunSettings, rank: int) -> dict[str, torch.Tensor]:
    """A node's rank-``rank`` LoRA factors in the form the server expects at the run's ``lora-rank`` r.

    The server forms ΔW = s·B·A with the run's s = α / r; a node that trained at rank rₖ (PEFT's scale
    α / rₖ) sends A and B·(r / rₖ), zero-padded to rank r, so the server's ΔW is the node's
    ΔWₖ = (α / rₖ)·Bₖ·Aₖ exactly and its payload has every node's shapes. Other tensors pass through.
    """
    run_rank = settings.training.lora_rank
    out = dict(factors)
    if rank == run_rank:
        return out
    for module in lora_modules(list(factors)):
        a_name, b_name = factor_names(module)
        out[a_name], out[b_name] = pad_factors(factors[a_name], factors[b_name] * (run_rank / rank), run_rank)
    return out


def run_local_round(
    settings: RunSettings,
    changed: dict[str, torch.Tensor],
    *,
    round_number: int,
    run_id: str,
    shard: Shard,
    error_feedback: ErrorFeedback | None = None,
    tier: str = "",
) -> LocalResult:
    """Train from the round's weights and return the encoded update (see the module docstring).

    ``changed`` holds the parameters the server broadcast: those that differ from the base model.
    The update's header (signed with it) names the node and its ``tier`` and carries the client's
    report: examples, train loss and seconds, the trainer's metrics, and which data it used.
    """
    torch.set_num_threads(settings.training.client_threads)
    phases = Phases()
    with phases("build"):
        model, round_state, tokenizer = round_model(settings, changed)
        round_state = {name: tensor.clone() for name, tensor in round_state.items()}
    with phases("data"):
        data = client_datasets(settings, shard, tokenizer)
        attacker = settings.attack.attacks(shard.partition_id)
        if attacker and settings.attack.attack == "label_flip":
            data = flipped_labels(data)
    with phases("build"):
        device = client_device(settings)
        model = _training_model(node_settings(settings, shard), model, round_number, device)
    steps = steps_for(
        len(data.train), settings.training.batch_size, settings.training.local_steps, settings.training.local_epochs
    )
    seed = derive_seed(settings.run.seed, round_number, shard.node_name, "train")
    trainer = resolve_trainer(settings.training.trainer, settings.source.task)
    context = TrainingRound(round_number, shard.node_name, seed, steps, device, autocast_dtype(settings, device))
    with phases("train"):
        result = as_result(trainer(model, data, settings, context))
    train_seconds = phases.seconds["train"]
    with phases("encode"):
        tensors, sparsifier = _update_tensors(
            settings, model, round_state, device, attacker, seed, shard, round_number, error_feedback
        )
    fisher = None
    if settings.training.mode != "lora" and settings.fisher_batch_count:
        with phases("fisher"):
            fisher = fisher_diagonal(
                model,
                data.train,
                num_batches=settings.fisher_batch_count,
                batch_size=settings.training.batch_size,
                seed=seed + 1,
            )
            fisher = {name: value.cpu() for name, value in fisher.items()}
    grams = None
    if settings.gram_batch_count:
        with phases("gram"):
            grams = gram_matrices(
                model,
                data.train,
                gram_targets(model, tensors),
                num_batches=settings.gram_batch_count,
                batch_size=settings.training.batch_size,
                seed=seed + 2,
            )
    with phases("encode"):
        header = UpdateHeader(
            run_id=run_id,
            round=round_number,
            base_fingerprint=fingerprint(round_state),
            node_id=shard.header_node,
            num_examples=reported_examples(len(data.train), settings.attack) if attacker else len(data.train),
            sparsifier=sparsifier,
            metrics={
                **finite_metrics({"train-loss": result.loss, "train-seconds": train_seconds, **result.metrics}),
                "data-rows": data.source.rows,
                "data-sha256": data.source.sha256,
                "institution": shard.node_name,
            },
            tier=tier,
        )
        payload = encode_update(
            tensors, header=header, value_dtype=settings.compression.wire_dtype, fisher=fisher, grams=grams
        )
    return LocalResult(payload, len(data.train), result.loss, data.source, train_seconds, phases.as_dict())


def _update_tensors(
    settings: RunSettings,
    model: torch.nn.Module,
    round_state: dict[str, torch.Tensor],
    device: torch.device,
    attacker: bool,
    seed: int,
    shard: Shard,
    round_number: int,
    error_feedback: ErrorFeedback | None,
) -> tuple[dict[str, UpdateTensor], Sparsifier]:
    """What the client sends and how it was shrunk: LoRA factors as they are, or the shrunk task vector."""
    if settings.training.mode == "lora":
        factors = {
            name: t.cpu() for name, t in lora_update(model, {n: t.to(device) for n, t in round_state.items()}).items()
        }
        factors = to_run_rank(factors, settings, node_settings(settings, shard).training.lora_rank)
        return dict(_attacked(settings, attacker, factors, seed)), Sparsifier()
    current = dict(model.named_parameters())
    tau = {name: current[name].detach().float().cpu() - round_state[name] for name in round_state}
    tau = _attacked(settings, attacker, tau, seed)
    sparsifier = settings.compression.sparsifier_spec
    seed_for = dare_seed_fn(settings.run.seed, round_number, shard.node_name, settings.compression.seed_scope)
    tensors = shrink_update(tau, sparsifier, seed_for, error_feedback)
    if settings.privacy.dp == "local":
        tensors = locally_private(tensors, settings, round_number, shard.node_name)
    return tensors, sparsifier
