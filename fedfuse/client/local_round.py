"""One client's round without Flower: train on the local data, form the task vector, shrink it, encode it.

Training goes through the run's trainer (built-in or the user's, see ``fedfuse.training.trainers``)
on the client's device; everything after training is fedfuse's. Full mode sends
τ = θ_local − θ_round, sparsified on the client (with error feedback when enabled) and optionally
with a diagonal Fisher. For RegMean either mode adds the Gram matrices of its linear layers' inputs.
LoRA mode sends each module's A and B factors and the head's task vector dense (they are small);
the server forms ΔW = s·B·A and sparsifies there, so TIES and DARE act on ΔW. With a frozen shared A
(``lora-aggregation = "frozen-a"``) only B and the head travel.
A node may train at its own LoRA rank rₖ ≤ the run's ``lora-rank`` r (node config ``lora-rank``): it
sends its factors at rank r (:func:`to_run_rank`), so every node's payload has the shapes the server expects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fedfuse.algebra import UpdateTensor, derive_seed, factor_names, lora_modules
from fedfuse.algebra.lora import LORA_A_SUFFIX, pad_factors
from fedfuse.client.error_feedback import ErrorFeedback
from fedfuse.client.uplink import LocalDP, TrainedUpdate, UpdateFacts, UpdateKind, Uplink, encode_uplink, locally_noised
from fedfuse.data.files import DataSource
from fedfuse.settings import RunSettings
from fedfuse.timing import Phases
from fedfuse.training.client_datasets import ClientDatasets, NodeData, load_client_datasets
from fedfuse.training.device import (
    autocast_dtype,
    client_device,
    enable_gradient_checkpointing,
    quantize_4bit,
)
from fedfuse.training.gram import gram_matrices, gram_targets
from fedfuse.training.loop import Evaluation, evaluate, fisher_diagonal, steps_for
from fedfuse.training.run_model import (
    attach_lora,
    base_model,
    global_state,
    load_global_state,
    lora_update,
)
from fedfuse.training.trainers import TrainerSettings, TrainingRound, as_result, resolve_trainer
from fedfuse.wire import fingerprint
from fedfuse.wire.header import MetricValue


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


def locally_private(
    tensors: dict[str, UpdateTensor], settings: RunSettings, round_number: int, node: str
) -> dict[str, UpdateTensor]:
    """Local DP as the run configures it (see :func:`fedfuse.client.uplink.locally_noised`)."""
    return locally_noised(tensors, local_dp(settings), round_number, node)


def local_dp(settings: RunSettings) -> LocalDP:
    """The run's local-DP mechanism (C, σ and the test-only noise seed)."""
    privacy = settings.privacy
    return LocalDP(privacy.dp_clip_norm, privacy.dp_noise_multiplier, privacy.dp_noise_seed)


def uplink_of(settings: RunSettings) -> Uplink:
    """How the run's nodes shrink and encode their updates (``task_vector_mod``'s options from the run config)."""
    compression = settings.compression
    return Uplink(
        sparsifier=compression.sparsifier_spec,
        wire_dtype=compression.wire_dtype,
        error_feedback=settings.uses_error_feedback,
        seed=settings.run.seed,
        seed_scope=compression.seed_scope,
        local_dp=local_dp(settings) if settings.privacy.dp == "local" else None,
    )


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


DatasetLoader = Callable[[RunSettings, Shard, Any], ClientDatasets]
"""Loads a shard's datasets (``client_datasets``; a simulation may wrap it, e.g. a label-flipping attacker)."""


@dataclass(frozen=True)
class TrainedRound:
    """A local round's training products: the update the uplink sends and what the client reports."""

    update: TrainedUpdate
    base_fingerprint: str
    train_loss: float
    source: DataSource
    train_seconds: float
    phases: Phases

    def facts(self, *, run_id: str, round_number: int, shard: Shard, tier: str = "") -> UpdateFacts:
        """The header facts of this round's update sent by ``shard``."""
        return UpdateFacts(run_id, round_number, self.base_fingerprint, shard.header_node, shard.node_name, tier)


def trainer_settings(settings: RunSettings) -> TrainerSettings:
    """What a trainer receives of the run: its training section, the task and the model."""
    return TrainerSettings(settings.training, settings.source.task, settings.source.model)


def train_locally(
    settings: RunSettings,
    changed: dict[str, torch.Tensor],
    *,
    round_number: int,
    shard: Shard,
    datasets: DatasetLoader = client_datasets,
    model_version: str = "",
) -> TrainedRound:
    """Train from the round's weights; return the update (τ or LoRA factors, Fisher, Grams) and the report.

    ``changed`` holds the round's values of the parameters that differ from the base model. The update
    names ``model_version`` as what it was trained from (default: the fingerprint of the round's weights).
    Its header metrics are the client's report: train loss and seconds, the trainer's metrics, and which
    data it used.
    """
    torch.set_num_threads(settings.training.client_threads)
    phases = Phases()
    with phases("build"):
        model, round_state, tokenizer = round_model(settings, changed)
        round_state = {name: tensor.clone() for name, tensor in round_state.items()}
    with phases("data"):
        data = datasets(settings, shard, tokenizer)
    with phases("build"):
        device = client_device(settings)
        model = _training_model(node_settings(settings, shard), model, round_number, device)
    training = settings.training
    steps = steps_for(len(data.train), training.batch_size, training.local_steps, training.local_epochs)
    seed = derive_seed(settings.run.seed, round_number, shard.node_name, "train")
    trainer = resolve_trainer(training.trainer, settings.source.task)
    context = TrainingRound(round_number, shard.node_name, seed, steps, device, autocast_dtype(settings, device))
    with phases("train"):
        result = as_result(trainer(model, data, trainer_settings(settings), context))
    train_seconds = phases.seconds["train"]
    with phases("encode"):
        tensors, kind = _trained_tensors(settings, model, round_state, device, shard)
    fisher = _fisher(settings, model, data, seed, phases) if kind == "task-vector" else None
    grams = _grams(settings, model, data, tensors, seed, phases)
    metrics: dict[str, MetricValue] = {
        **finite_metrics({"train-loss": result.loss, "train-seconds": train_seconds, **result.metrics}),
        "data-rows": data.source.rows,
        "data-sha256": data.source.sha256,
        "institution": shard.node_name,
    }
    update = TrainedUpdate(tensors, len(data.train), kind, metrics, fisher, grams)
    version = model_version or fingerprint(round_state)
    return TrainedRound(update, version, result.loss, data.source, train_seconds, phases)


def run_local_round(
    settings: RunSettings,
    changed: dict[str, torch.Tensor],
    *,
    round_number: int,
    run_id: str,
    shard: Shard,
    error_feedback: ErrorFeedback | None = None,
    tier: str = "",
    model_version: str = "",
) -> LocalResult:
    """Train from the round's weights and return the encoded update (see the module docstring).

    The Flower-free round (a gateway's members, the benches): :func:`train_locally`, then the one
    uplink :func:`~fedfuse.client.uplink.encode_uplink` with ``error_feedback`` as the residual store.
    The update's header (signed with it) names the node and its ``tier``.
    """
    trained = train_locally(settings, changed, round_number=round_number, shard=shard, model_version=model_version)
    return encode_round(
        settings,
        trained,
        run_id=run_id,
        round_number=round_number,
        shard=shard,
        error_feedback=error_feedback,
        tier=tier,
    )


def encode_round(
    settings: RunSettings,
    trained: TrainedRound,
    *,
    run_id: str,
    round_number: int,
    shard: Shard,
    error_feedback: ErrorFeedback | None = None,
    tier: str = "",
) -> LocalResult:
    """A trained round through the uplink: its payload and the client's report."""
    facts = trained.facts(run_id=run_id, round_number=round_number, shard=shard, tier=tier)
    with trained.phases("encode"):
        payload = encode_uplink(trained.update, facts, uplink_of(settings), error_feedback)
    update = trained.update
    return LocalResult(
        payload,
        update.num_examples,
        trained.train_loss,
        trained.source,
        trained.train_seconds,
        trained.phases.as_dict(),
    )


def _fisher(
    settings: RunSettings, model: torch.nn.Module, data: ClientDatasets, seed: int, phases: Phases
) -> dict[str, torch.Tensor] | None:
    """The diagonal Fisher of the trained model on the local data, when the run asks for it (full mode)."""
    if not settings.fisher_batch_count:
        return None
    with phases("fisher"):
        fisher = fisher_diagonal(
            model,
            data.train,
            num_batches=settings.fisher_batch_count,
            batch_size=settings.training.batch_size,
            seed=seed + 1,
        )
        return {name: value.cpu() for name, value in fisher.items()}


def _grams(
    settings: RunSettings,
    model: torch.nn.Module,
    data: ClientDatasets,
    tensors: Mapping[str, torch.Tensor],
    seed: int,
    phases: Phases,
) -> dict[str, torch.Tensor] | None:
    """The input Gram matrices of the update's linear layers, when the run asks for them (RegMean)."""
    if not settings.gram_batch_count:
        return None
    with phases("gram"):
        return gram_matrices(
            model,
            data.train,
            gram_targets(model, tensors),
            num_batches=settings.gram_batch_count,
            batch_size=settings.training.batch_size,
            seed=seed + 2,
        )


def _trained_tensors(
    settings: RunSettings,
    model: torch.nn.Module,
    round_state: dict[str, torch.Tensor],
    device: torch.device,
    shard: Shard,
) -> tuple[dict[str, torch.Tensor], UpdateKind]:
    """What training produced for the uplink: LoRA factors at the run's rank, or the task vector τ."""
    if settings.training.mode == "lora":
        on_device = {n: t.to(device) for n, t in round_state.items()}
        factors = {name: t.cpu() for name, t in lora_update(model, on_device).items()}
        factors = to_run_rank(factors, settings, node_settings(settings, shard).training.lora_rank)
        if settings.merge.lora_aggregation == "frozen-a":  # A is the round's shared one: the server redraws it
            factors = {name: t for name, t in factors.items() if not name.endswith(LORA_A_SUFFIX)}
        return factors, "factors"
    current = dict(model.named_parameters())
    return {name: current[name].detach().float().cpu() - round_state[name] for name in round_state}, "task-vector"
