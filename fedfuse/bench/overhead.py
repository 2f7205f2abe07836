"""``fedfuse bench overhead``: where a round's time goes, its compute bound, and fedfuse against plain Flower.

Every fedfuse run reports its rounds' phases (see :mod:`fedfuse.bench.breakdown`): the clients' model
build, data, training, Fisher, encoding and signing, transport and queueing, and the server's
broadcast, decode+fold, finalize, evaluation, checkpoint and report, with the **compute bound** (the
clients' pure training time over the clients that run at once, plus server evaluation). Presets:
``full`` (full fine-tuning, dense FedAvg; also runs the plain Flower app), ``default`` (``fedfuse
simulate`` as shipped) and ``sft`` (federated SFT of SmolLM2 on the shipped instructions);
``--clients 256 --run-config "fraction-train=0.125"`` measures hundreds of institutions.

With ``--compare`` both runs use Flower's simulation engine, the same clients, data shards, seeds,
local training (full fine-tuning with fedfuse's training loop) and the same server-side evaluation each
round. The plain app is what a Flower user writes: clients return their whole weights in an
``ArrayRecord`` and ``flwr.serverapp.strategy.FedAvg.start`` averages them. fedfuse adds task vectors,
the wire codec, validation, streaming folding and an atomic checkpoint per round. Round time is the
interval between consecutive round ends; round 1 (actors loading the model) is left out, the median of
the rest kept.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import statistics
import time
from dataclasses import asdict
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
from fedfuse.bench.breakdown import breakdown, breakdown_table, median_ratio, steady
from fedfuse.bench.measure import markdown_table, print_table
from fedfuse.cli.simulate import parse_run_config
from fedfuse.client.app import shard_of
from fedfuse.client.local_round import client_datasets
from fedfuse.server.evaluation import ServerEvaluator
from fedfuse.settings import RunSettings, SettingsError
from fedfuse.simulation import simulate
from fedfuse.training.loop import steps_for, train
from fedfuse.training.run_model import base_model, global_state, load_global_state

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
            metrics = evaluator.of_weights(dict(arrays.to_torch_state_dict()))
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
    steady_rounds = durations[1:] or durations
    return statistics.median(steady_rounds), durations


PRESETS: dict[str, dict[str, Any]] = {
    "full": {"mode": "full", "strategy": "fedavg", "sparsifier": "none", "fraction-evaluate": 0.0, "local-steps": 10},
    "default": {},
    "sft": {
        "model": "smollm2",
        "task": "sft",
        "data": "examples/data/instructions.jsonl",
        "partition": "natural",
        "partition-column": "institution",
        "batch-size": 8,
        "local-steps": 8,
    },
}
"""Run settings per preset: ``full`` (the Flower comparison), ``default`` (``fedfuse simulate`` as shipped), ``sft``."""
MANY_CLIENTS = 100
"""From this many simulated clients on, the looser compute-bound target applies."""


def bound_target(preset: str, clients: int) -> float:
    """The wall/compute-bound target: 1.2×, or 1.5× for SmolLM2 SFT and for hundreds of clients."""
    return 1.5 if preset == "sft" or clients >= MANY_CLIENTS else 1.2


def _flower_round(settings: RunSettings, clients: int, console: Console) -> tuple[float, list[float]]:
    """Median steady round time of the plain Flower app with the same settings, and every round's time."""
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
    return _median_round(flower_ends)


def overhead(
    preset: Annotated[
        str, typer.Option("--preset", help="full (the Flower comparison), default (fedfuse simulate) or sft (SmolLM2).")
    ] = "full",
    clients: Annotated[int, typer.Option("--clients", help="Simulated clients.", min=1)] = 4,
    rounds: Annotated[int, typer.Option("--rounds", help="Rounds per run (round 1 is warm-up).", min=2)] = 4,
    local_steps: Annotated[
        int | None, typer.Option("--local-steps", help="Local steps per client per round (default: the preset's).")
    ] = None,
    eval_examples: Annotated[int, typer.Option("--eval-examples", help="Server evaluation examples per round.")] = 256,
    run_config: Annotated[
        str, typer.Option("--run-config", help='More run-config keys for fedfuse, e.g. "fraction-train=0.125".')
    ] = "",
    compare: Annotated[
        bool | None,
        typer.Option("--compare/--no-compare", help="Also run the plain Flower app (default: with preset full)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for overhead.md and overhead.json.")] = Path(
        "bench-results/overhead"
    ),
    check: Annotated[bool, typer.Option("--check", help="Exit with status 1 when a target fails.")] = False,
) -> None:
    """Where fedfuse's round time goes, against its compute bound and (preset full) a plain Flower FedAvg app."""
    console = Console()
    if preset not in PRESETS:
        raise typer.BadParameter(f"--preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    compare = preset == "full" if compare is None else compare
    if compare and preset != "full":
        raise typer.BadParameter("--compare needs --preset full: the plain Flower app does full fine-tuning")
    out.mkdir(parents=True, exist_ok=True)
    overrides: dict[str, Any] = {
        **PRESETS[preset],
        "num-server-rounds": rounds,
        "eval-examples": eval_examples,
        "output-dir": str(out / "fedfuse-run"),
    }
    if local_steps is not None:
        overrides["local-steps"] = local_steps
    try:
        overrides.update(parse_run_config(run_config))
        settings = RunSettings.from_run_config({}, **overrides)
    except SettingsError as exc:
        raise typer.BadParameter(str(exc)) from None
    flower = _flower_round(settings, clients, console) if compare else None
    console.rule(f"fedfuse ({preset})")
    parallel = min(clients, os.cpu_count() or 1)
    history = simulate(overrides, num_clients=clients, parallel=parallel)
    rows = breakdown(history, parallel)
    fedfuse_all = [row.wall for row in rows]
    fedfuse_round = statistics.median(row.wall for row in steady(rows))
    bound_ratio = median_ratio(rows)
    target = bound_target(preset, clients)
    checks = [(bound_ratio <= target, f"fedfuse round wall ≤ {target}× its compute bound: {bound_ratio:.3f}×")]
    lines = []
    if flower is not None:
        flower_round, flower_all = flower
        ratio = fedfuse_round / flower_round
        checks.append((ratio <= TARGET_RATIO, f"fedfuse round time ≤ {TARGET_RATIO}× plain Flower: {ratio:.3f}×"))
        lines += [
            "| app | round times (s) | median round 2.. (s) | ratio |",
            "|---|---|---:|---:|",
            f"| plain Flower FedAvg | {' '.join(f'{d:.1f}' for d in flower_all)} | {flower_round:.2f} | 1.000 |",
            f"| fedfuse fedavg | {' '.join(f'{d:.1f}' for d in fedfuse_all)} | {fedfuse_round:.2f} | {ratio:.3f} |",
            "",
        ]
    columns, table = breakdown_table(rows)
    print_table(f"fedfuse round breakdown ({preset}, {clients} clients, {parallel} at once)", columns, table)
    lines += [markdown_table(columns, table), ""]
    lines += [f"{'PASS' if ok else 'FAIL'} {text}" for ok, text in checks]
    text = "\n".join(lines)
    console.print(text, markup=False, highlight=False)
    (out / "overhead.md").write_text(
        f"# fedfuse bench overhead\n\npreset {preset}, clients {clients}, settings {overrides}\n\n{text}\n"
    )
    (out / "overhead.json").write_text(
        json.dumps(
            {
                "preset": preset,
                "clients": clients,
                "parallel": parallel,
                "settings": overrides,
                "flower_round_s": flower[1] if flower else None,
                "fedfuse_round_s": fedfuse_all,
                "rounds": [{**asdict(row), "bound": row.bound, "ratio": row.ratio} for row in rows],
                "bound_ratio": bound_ratio,
                "pass": all(ok for ok, _ in checks),
            },
            indent=2,
        )
    )
    if check and not all(ok for ok, _ in checks):
        raise typer.Exit(code=1)
