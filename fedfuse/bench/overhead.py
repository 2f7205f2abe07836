"""``fedfuse bench overhead``: fedfuse's round time against a plain Flower FedAvg app doing the same training.

Both runs use Flower's simulation engine, the same clients, data shards, seeds, local training
(full fine-tuning with fedfuse's training loop) and the same server-side evaluation each round. The
plain app is what a Flower user writes: clients return their whole weights in an ``ArrayRecord`` and
``flwr.serverapp.strategy.FedAvg.start`` averages them. fedfuse adds task vectors, the wire codec,
validation, streaming folding and an atomic checkpoint per round. Round time is the interval between
consecutive round ends; round 1 (actors loading the model) is left out, the median of the rest kept.
"""

from __future__ import annotations

import itertools
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from rich.console import Console

from fedfuse.algebra import derive_seed
from fedfuse.client.app import shard_of
from fedfuse.client.local_round import client_datasets
from fedfuse.server.evaluation import ServerEvaluator
from fedfuse.settings import RunSettings
from fedfuse.simulation import simulate
from fedfuse.training.loop import steps_for, train
from fedfuse.training.models import base_model, global_state, load_global_state

TARGET_RATIO = 1.15


def plain_flower_client(settings: RunSettings) -> ClientApp:
    """A textbook Flower ClientApp: load the global weights, train, return all weights."""
    app = ClientApp()

    @app.train()
    def fit(msg: Message, context: Context) -> Message:
        torch.set_num_threads(settings.training.client_threads)
        model, tokenizer = base_model(settings)
        load_global_state(model, dict(msg.content.array_records["arrays"].to_torch_state_dict()))
        shard = shard_of(context)
        local_train = client_datasets(settings, shard, tokenizer).train
        round_number = msg.content.config_records["config"]["server-round"]
        assert isinstance(round_number, int), "Flower sends the server round as an int"
        loss = train(
            model,
            local_train,
            steps=steps_for(
                len(local_train),
                settings.training.batch_size,
                settings.training.local_steps,
                settings.training.local_epochs,
            ),
            batch_size=settings.training.batch_size,
            learning_rate=settings.training.lr,
            seed=derive_seed(settings.run.seed, round_number, shard.node_name, "train"),
        )
        content = RecordDict(
            {
                "arrays": ArrayRecord(global_state(model)),
                "metrics": MetricRecord({"num-examples": len(local_train), "train-loss": loss}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def plain_flower_server(settings: RunSettings, clients: int, round_ends: list[float]) -> ServerApp:
    """A textbook Flower ServerApp: FedAvg.start with a server-side evaluate_fn (timestamps each round end)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        model, _ = base_model(settings)
        evaluator = ServerEvaluator(settings)

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            metrics = evaluator(arrays)
            if server_round > 0:
                round_ends.append(time.time())
            return metrics

        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=clients)
        round_ends.append(time.time())
        strategy.start(
            grid,
            ArrayRecord(global_state(model)),
            num_rounds=settings.run.num_server_rounds,
            evaluate_fn=evaluate,
        )

    return app


def _median_round(ends: list[float]) -> tuple[float, list[float]]:
    durations = [b - a for a, b in itertools.pairwise(ends)]
    steady = durations[1:] or durations
    return statistics.median(steady), durations


def overhead(
    clients: Annotated[int, typer.Option("--clients", help="Simulated clients.", min=1)] = 4,
    rounds: Annotated[int, typer.Option("--rounds", help="Rounds per run (round 1 is warm-up).", min=2)] = 4,
    local_steps: Annotated[int, typer.Option("--local-steps", help="Local steps per client per round.", min=1)] = 10,
    eval_examples: Annotated[int, typer.Option("--eval-examples", help="Server evaluation examples per round.")] = 256,
    out: Annotated[Path, typer.Option("--out", help="Folder for overhead.md and overhead.json.")] = Path(
        "bench-results/overhead"
    ),
    check: Annotated[bool, typer.Option("--check", help="Exit with status 1 when the target fails.")] = False,
) -> None:
    """Round time of fedfuse (dense FedAvg, full fine-tuning) over a plain Flower FedAvg app."""
    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    overrides: dict[str, Any] = {
        "mode": "full",
        "strategy": "fedavg",
        "sparsifier": "none",
        "num-server-rounds": rounds,
        "local-steps": local_steps,
        "eval-examples": eval_examples,
        "fraction-evaluate": 0.0,
        "output-dir": str(out / "fedfuse-run"),
    }
    settings = RunSettings.from_run_config({}, **overrides)
    console.rule("plain Flower FedAvg")
    flower_ends: list[float] = []
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(
        server_app=plain_flower_server(settings, clients, flower_ends),
        client_app=plain_flower_client(settings),
        num_supernodes=clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": min(clients, 2), "num_gpus": 0, "logging_level": "ERROR"},
        },
    )
    console.rule("fedfuse")
    history = simulate(overrides, num_clients=clients)
    fedfuse_ends = [history["rounds"][0]["finished_at"] - history["rounds"][0]["seconds"]]
    fedfuse_ends += [r["finished_at"] for r in history["rounds"]]
    flower_round, flower_all = _median_round(flower_ends)
    fedfuse_round, fedfuse_all = _median_round(fedfuse_ends)
    ratio = fedfuse_round / flower_round
    ok = ratio <= TARGET_RATIO
    lines = [
        "| app | round times (s) | median round 2.. (s) | ratio |",
        "|---|---|---:|---:|",
        f"| plain Flower FedAvg | {' '.join(f'{d:.1f}' for d in flower_all)} | {flower_round:.2f} | 1.000 |",
        f"| fedfuse fedavg (dense) | {' '.join(f'{d:.1f}' for d in fedfuse_all)} | {fedfuse_round:.2f} | {ratio:.3f} |",
        "",
        f"{'PASS' if ok else 'FAIL'} fedfuse round time ≤ {TARGET_RATIO}× plain Flower: {ratio:.3f}×",
    ]
    text = "\n".join(lines)
    console.print(text)
    (out / "overhead.md").write_text(f"# fedfuse bench overhead\n\nclients {clients}, settings {overrides}\n\n{text}\n")
    (out / "overhead.json").write_text(
        json.dumps(
            {
                "clients": clients,
                "settings": overrides,
                "flower_round_s": flower_all,
                "fedfuse_round_s": fedfuse_all,
                "ratio": ratio,
                "pass": ok,
            },
            indent=2,
        )
    )
    if check and not ok:
        raise typer.Exit(code=1)
