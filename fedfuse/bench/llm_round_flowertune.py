"""The FlowerTune-style baseline of ``fedfuse bench llm-round``: Flower's FedAvg over a PEFT adapter's A and B.

What a FlowerTune LLM app does: the server holds only the adapter (``get_peft_model_state_dict``), sends it
each round, and ``flwr.serverapp.strategy.FedAvg`` averages the clients' trained adapters (A and B each,
weighted by examples). Clients load the averaged adapter (``set_peft_model_state_dict``) and keep training
it. Training mirrors fedfuse's ``train_locally``: the same base model, data shard, trainer, step budget,
seed and device (``fedfuse.training``); the round-1 adapter is fedfuse's round-1 adapter
(``attach_lora(model, settings, 1)``), so round 1 trains exactly as a fedfuse client does.

Per round the strategy records the bytes of the ArrayRecords it sends and receives (the arrays'
serialized sizes, as fedfuse counts its own), the seconds ``aggregate_train`` took (decoding and
averaging), the example-weighted train loss and, after the round, the adapter (saved for the weight
comparison: the merged model is W + s·B̄·Ā).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from fedfuse.algebra import derive_seed
from fedfuse.bench.llm_round_measure import (
    PeakSampler,
    adapted_names,
    matrix_entries,
    record_adapted,
    round_peaks,
)
from fedfuse.bench.measure import Meter
from fedfuse.client.app import shard_of
from fedfuse.client.local_round import client_datasets, trainer_settings
from fedfuse.known_warnings import known_warnings_silenced
from fedfuse.settings import RunSettings
from fedfuse.simulation import RAY_OVERRIDE_ON_ZERO, backend_config
from fedfuse.training.device import autocast_dtype, client_device, enable_gradient_checkpointing
from fedfuse.training.loop import steps_for
from fedfuse.training.run_model import attach_lora, base_model, global_state, lora_scale, target_modules_for
from fedfuse.training.trainers import TrainingRound, as_result, resolve_trainer

ADAPTER_FILE = "adapter-round-{round:04d}.safetensors"


def record_bytes(content: RecordDict) -> int:
    """The serialized bytes of a message's arrays (what fedfuse counts as a message's size)."""
    return sum(len(array.data) for record in content.array_records.values() for array in record.values())


def adapter_state(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's A and B matrices by PEFT's names (what a FlowerTune app sends), fp32 on the CPU."""
    return {name: t.detach().float().cpu() for name, t in get_peft_model_state_dict(peft_model).items()}


def initial_adapter(settings: RunSettings) -> dict[str, torch.Tensor]:
    """The adapter the server starts from: fedfuse's round-1 adapter (A seeded, B = 0)."""
    model, _ = base_model(settings)
    return adapter_state(attach_lora(model, settings, 1))


def train_adapter(settings: RunSettings, adapter: Mapping[str, torch.Tensor], round_number: int, context: Context):
    """One client's round: load the averaged adapter, train it as fedfuse trains; (adapter, examples, loss)."""
    torch.set_num_threads(settings.training.client_threads)
    shard = shard_of(context, settings)
    model, tokenizer = base_model(settings)
    data = client_datasets(settings, shard, tokenizer)
    device = client_device(settings)
    model.to(device)
    if settings.training.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    peft_model = attach_lora(model, settings, round_number)
    set_peft_model_state_dict(peft_model, {name: t.to(device) for name, t in adapter.items()})
    training = settings.training
    steps = steps_for(len(data.train), training.batch_size, training.local_steps, training.local_epochs)
    seed = derive_seed(settings.run.seed, round_number, shard.node_name, "train")
    trainer = resolve_trainer(training.trainer, settings.source.task)
    round_info = TrainingRound(round_number, shard.node_name, seed, steps, device, autocast_dtype(settings, device))
    result = as_result(trainer(peft_model, data, trainer_settings(settings), round_info))
    return adapter_state(peft_model), len(data.train), result.loss


def flowertune_client(settings: RunSettings) -> ClientApp:
    """The baseline's ClientApp: receive the adapter, train it, send it back with examples and loss."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        round_number = msg.content.config_records["config"]["server-round"]
        assert isinstance(round_number, int), "Flower sends the server round as an int"
        received = dict(msg.content.array_records["arrays"].to_torch_state_dict())
        adapter, examples, loss = train_adapter(settings, received, round_number, context)
        metrics = MetricRecord({"num-examples": examples, "train-loss": loss})
        return Message(content=RecordDict({"arrays": ArrayRecord(adapter), "metrics": metrics}), reply_to=msg)

    return app


class AdapterFedAvg(FedAvg):
    """Flower's FedAvg, recording each round's bytes both ways, aggregation seconds and train loss."""

    def __init__(self, rounds: list[dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounds = rounds

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's sampling and messages; records the bytes sent per node."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        sent = [record_bytes(m.content) for m in messages]
        self.rounds.append({"round": server_round, "down_per_node": max(sent, default=0), "sent": len(sent)})
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's weighted average of the adapters; records bytes received, seconds and the train loss."""
        replies = list(replies)
        good = [r for r in replies if not r.has_error()]
        started = time.perf_counter()
        arrays, metrics = super().aggregate_train(server_round, replies)
        seconds = time.perf_counter() - started
        record = self.rounds[-1]
        record["accepted"] = len(good)
        record["up_per_node"] = round(sum(record_bytes(r.content) for r in good) / max(1, len(good)))
        record["fold_seconds"] = seconds
        record["train_loss"] = float(metrics["train-loss"]) if metrics and "train-loss" in metrics else None  # type: ignore[arg-type]
        return arrays, metrics


def flowertune_server(settings: RunSettings, clients: int, rounds: list[dict[str, Any]], out: Path) -> ServerApp:
    """The baseline's ServerApp: FedAvg.start over the adapter; each round's adapter saved to ``out``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = AdapterFedAvg(
            rounds, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients
        )

        def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round > 0:
                save_file(dict(arrays.to_torch_state_dict()), str(out / ADAPTER_FILE.format(round=server_round)))
                rounds[-1]["finished_at"] = time.time()
            return None

        strategy.start(
            grid,
            ArrayRecord(initial_adapter(settings)),
            num_rounds=settings.run.num_server_rounds,
            timeout=settings.run.timeout,
            evaluate_fn=after_round,
        )

    return app


def merged_adapted(
    base: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """W + s·B·A for every module of a PEFT adapter state (names as in the base model)."""
    merged = {}
    for name, a in adapter.items():
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0].removeprefix("base_model.model.")
        b = adapter[name.replace(".lora_A.", ".lora_B.")]
        weight = f"{module}.weight"
        merged[weight] = base[weight].float() + scale * (b.float() @ a.float())
    return merged


def run_flowertune(settings: RunSettings, clients: int, rounds: list[dict[str, Any]]) -> None:
    """The baseline on Flower's simulation engine in this process (Ray workers run the clients)."""
    out = Path(settings.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault(RAY_OVERRIDE_ON_ZERO, "1")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    with known_warnings_silenced():
        run_simulation(
            server_app=flowertune_server(settings, clients, rounds, out),
            client_app=flowertune_client(settings),
            num_supernodes=clients,
            backend_config=backend_config(parallel=min(clients, os.cpu_count() or 1)),
        )
    if len(rounds) != settings.run.num_server_rounds or any("finished_at" not in r for r in rounds):
        raise RuntimeError(f"the FlowerTune baseline finished {len(rounds)} rounds; see the log above")


def measure_flowertune(meter: Meter, config: Mapping[str, Any]) -> dict[str, Any]:
    """The baseline (run in a fresh process): its rounds, memory and adapted weights' difference from dense."""
    settings = RunSettings.from_run_config({}, **config["overrides"])
    clients = int(config["clients"])
    rounds: list[dict[str, Any]] = []
    started = time.perf_counter()
    with meter.memory():
        sampler = PeakSampler(meter.peak_method == "clear_refs")
        sampler.start()
        run_flowertune(settings, clients, rounds)
        sampler.stop()
    wall = time.perf_counter() - started
    baseline = meter.rss_baseline_bytes or 0
    for row, peak in zip(rounds, round_peaks(sampler, [r["finished_at"] for r in rounds], baseline), strict=True):
        row["rss_above_start"] = peak
    model, _ = base_model(settings)
    base = global_state(model)
    names = adapted_names(base, target_modules_for(model, settings))
    out, scale = Path(settings.run.output_dir), lora_scale(settings)

    def adapted(round_number: int) -> dict[str, torch.Tensor]:
        return merged_adapted(base, load_file(out / ADAPTER_FILE.format(round=round_number)), scale)

    differences = record_adapted([r["round"] for r in rounds], adapted, out, config["reference_dir"])
    for row in rounds:
        row["max_rel_diff"] = differences[row["round"]]
    adapted_count, factors = matrix_entries(base, names, settings.training.lora_rank)
    return {
        "rounds": rounds,
        "server_rss_above_start": None,
        "adapter_bytes": 4 * factors,
        "adapted_entries": adapted_count,
        "factor_entries": factors,
        "wall_seconds": wall,
    }
