"""``fedfuse simulate``: the fedfuse apps on Flower's simulation engine, with run-config overrides."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from fedfuse.defaults import DEFAULT_CLIENTS


def run_simulation(overrides: dict[str, Any], **kwargs: Any) -> Any:
    """:func:`fedfuse.simulation.simulate`, imported (with Flower, Ray and torch) when a simulation starts."""
    from fedfuse.simulation import simulate

    return simulate(overrides, **kwargs)


def parse_run_config(text: str) -> dict[str, str]:
    """``"key=value key2=value2"`` (Flower's ``--run-config`` syntax, quotes optional) → dict."""
    from fedfuse.settings import SettingsError

    pairs: dict[str, str] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SettingsError(f"--run-config entries are key=value, got {item!r}")
        pairs[key] = value.strip("\"'")
    return pairs


def merged_strategy_params(run_config_value: str, options: list[str]) -> str:
    """The ``strategy-params`` run-config value: ``--run-config``'s entries, then ``--strategy-param``'s (which win)."""
    from fedfuse.settings import SettingsError
    from fedfuse.strategies import format_strategy_params, parse_strategy_params

    try:
        params = {**parse_strategy_params(str(run_config_value)), **parse_strategy_params(options)}
    except ValueError as exc:
        raise SettingsError(f"--strategy-param: {exc}") from None
    return format_strategy_params(params)


def simulate(
    clients: int = typer.Option(DEFAULT_CLIENTS, "--clients", "-n", min=1, help="Simulated institutions (SuperNodes)."),
    rounds: int = typer.Option(None, "--rounds", "-r", help="Server rounds (run config num-server-rounds)."),
    strategy: str = typer.Option(
        None,
        "--strategy",
        "-s",
        help="Merge strategy: fedavg, ties, fisher, task_arithmetic, dare_linear, dare_ties or a plug-in.",
    ),
    strategy_param: Annotated[
        list[str] | None,
        typer.Option(
            "--strategy-param",
            metavar="NAME=VALUE",
            help="A declared parameter of the strategy, e.g. eps=1e-8 (fisher) or vote=count (ties); repeatable.",
        ),
    ] = None,
    sparsifier: str = typer.Option(None, "--sparsifier", help="Client update sparsifier: none, trim (TIES) or dare."),
    density: float = typer.Option(None, "--density", "-d", help="Kept fraction of each task vector (trim/dare)."),
    mode: str = typer.Option(None, "--mode", help="Local training: lora (PEFT) or full."),
    lora_aggregation: str = typer.Option(
        None,
        "--lora-aggregation",
        help="exact (merge ΔW = s·BA), factors (naive A/B average) or frozen-a (shared frozen A, only B trained).",
    ),
    secure_aggregation: str = typer.Option(
        None,
        "--secure-aggregation",
        help="secagg+: nodes send masked statistics and the server learns only their sum (SecAgg+); or none.",
    ),
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="'default' (embedded all-MiniLM-L6-v2), 'smollm2' (embedded SmolLM2-135M-Instruct), a local folder"
        " or a hub id.",
    ),
    task: str = typer.Option(
        None,
        "--task",
        help="topics (built-in docstring topics), classify (text+label), lm (causal LM) or sft (chat; loss on"
        " assistant tokens).",
    ),
    data: str = typer.Option(
        None,
        "--data",
        help="Your dataset (JSONL/CSV/Parquet file or save_to_disk folder), partitioned over the clients.",
    ),
    data_dir: str = typer.Option(None, "--data-dir", help="A folder with one data file per client (sorted by name)."),
    eval_data: str = typer.Option(
        None, "--eval-data", help="A held-out file the server evaluates on (else: federated evaluation only)."
    ),
    trainer: str = typer.Option(
        None,
        "--trainer",
        help="auto (built-in for the task), an entry point of group fedfuse.trainers, or module:function.",
    ),
    partition: str = typer.Option(
        None,
        "--partition",
        help="Client partition: auto (the default: dirichlet over a label, else iid), iid, dirichlet, shards, "
        "natural (files) or domain (built-in task).",
    ),
    partition_column: str = typer.Option(
        None,
        "--partition-column",
        help="Column for dirichlet/shards (default: the label) or natural (e.g. institution).",
    ),
    alpha: float = typer.Option(None, "--alpha", help="Dirichlet concentration α (smaller = more non-IID)."),
    seed: int = typer.Option(
        None, "--seed", help="Seed of data split, partitions, head init, DARE masks, training order."
    ),
    local_steps: int = typer.Option(None, "--local-steps", help="Optimizer steps per client per round."),
    output_dir: str = typer.Option(None, "--output-dir", "-o", help="Where checkpoints and the report go."),
    resume: str = typer.Option(None, "--resume", help="Continue from a run folder or checkpoint (same settings)."),
    tracking: str = typer.Option(
        None, "--tracking", help="Experiment tracking: none, tensorboard or mlflow (pip install 'fedfuse[tracking]')."
    ),
    tracking_uri: str = typer.Option(
        None,
        "--tracking-uri",
        help="Where tracking writes (default: <output-dir>/tensorboard, or MLflow's sqlite:///<output-dir>/mlflow.db).",
    ),
    run_config: str = typer.Option(
        "", "--run-config", help='Any other run-config keys, e.g. "lora-rank=4 batch-size=16".'
    ),
    client_gpus: float = typer.Option(
        0.0,
        "--client-gpus",
        help="GPUs per client, given by Ray (0.5: two clients share a GPU; 0: clients see no GPU). Above 0, Ray"
        " runs at most floor(GPUs / client-gpus) clients at once.",
    ),
    ray_address: str = typer.Option(
        None,
        "--ray-address",
        metavar="ADDR",
        help="Run on an existing Ray cluster (HOST:PORT of its 'ray start --head --port PORT'; 'auto' finds a local"
        " one) instead of starting a local Ray; clients at once then follow the cluster's CPUs and GPUs.",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower's and Ray's logs."),
) -> None:
    """Simulate a federation on this machine and write report.json, report.md and plots."""
    named: dict[str, Any] = {
        "num-server-rounds": rounds,
        "strategy": strategy,
        "sparsifier": sparsifier,
        "density": density,
        "mode": mode,
        "lora-aggregation": lora_aggregation,
        "secure-aggregation": secure_aggregation,
        "model": model,
        "task": task,
        "partition": partition,
        "data": data,
        "data-dir": data_dir,
        "eval-data": eval_data,
        "trainer": trainer,
        "partition-column": partition_column,
        "alpha": alpha,
        "seed": seed,
        "local-steps": local_steps,
        "output-dir": output_dir,
        "resume": resume,
        "tracking": tracking,
        "tracking-uri": tracking_uri,
    }
    overrides = _checked_overrides(named, run_config, strategy_param, clients)
    from fedfuse.simulation import ClientResourcesError, RayClusterError

    try:
        run_simulation(
            overrides, num_clients=clients, client_gpus=client_gpus, verbose=verbose, ray_address=ray_address
        )
    except (ClientResourcesError, RayClusterError) as exc:
        raise typer.BadParameter(str(exc)) from None


def _checked_overrides(
    named: dict[str, Any], run_config: str, strategy_param: list[str] | None, clients: int
) -> dict[str, Any]:
    """The run-config overrides of the options, checked before anything starts (bad input: ``BadParameter``)."""
    from fedfuse.data.files import DataError
    from fedfuse.security import KeyFileError, Registry
    from fedfuse.server.app import resume_state
    from fedfuse.server.run_checkpoint import CheckpointError
    from fedfuse.settings import RunSettings, SettingsError
    from fedfuse.training.client_datasets import preflight

    try:
        overrides = {**parse_run_config(run_config), **{k: v for k, v in named.items() if v is not None}}
        if strategy_param:
            overrides["strategy-params"] = merged_strategy_params(overrides.get("strategy-params", ""), strategy_param)
        settings = RunSettings.from_run_config({}, **overrides)
        settings.run.check_tracking_installed()
        preflight(settings, clients)
        if settings.run.resume:
            resume_state(settings)
        if settings.run.signer_registry:
            Registry.load(settings.run.signer_registry)
    except (SettingsError, DataError, CheckpointError, KeyFileError) as exc:
        raise typer.BadParameter(str(exc)) from None
    return overrides
