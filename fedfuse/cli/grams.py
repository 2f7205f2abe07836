"""``fedfuse grams``: Gram matrices of a model's linear-layer inputs over a local file, for RegMean merges."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape


def grams(
    model: Annotated[str, typer.Argument(help="A Hugging Face model folder, a hub id, or smollm2.")],
    data: Annotated[
        Path, typer.Option("--data", help="Calibration rows: JSONL, CSV, Parquet or a save_to_disk folder.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The Gram-matrix safetensors file to write.")],
    task: Annotated[
        str,
        typer.Option("--task", click_type=click.Choice(["sft", "lm", "classify"]), help="How the rows are read."),
    ] = "sft",
    batches: Annotated[int, typer.Option("--batches", help="Seeded batches fed through the model.", min=1)] = 16,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per batch.", min=1)] = 8,
    max_length: Annotated[
        str, typer.Option("--max-length", help="Tokens per row (`auto`: 128 for sft, else 32).")
    ] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the batch order.", min=0)] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out file.")] = False,
) -> None:
    """Write Σ XᵀX of every linear layer's inputs over --data: run it where the data lives, merge with --gram.

    Example: ``fedfuse grams tuned/clinic --data clinic.jsonl --out clinic-grams.safetensors``, then
    ``fedfuse merge --method regmean --base B --model tuned/clinic --gram clinic-grams.safetensors …``.
    """
    from fedfuse.checkpoints import CheckpointWriteError
    from fedfuse.data.files import DataError
    from fedfuse.models.loading import ModelLoadError
    from fedfuse.offline.grams import compute_grams
    from fedfuse.settings import SettingsError

    console = Console(stderr=True)
    started = time.perf_counter()
    try:
        with console.status(f"feeding {batches} batches of {data} through {model}"):
            result = compute_grams(
                model,
                data,
                out,
                task=task,
                batches=batches,
                batch_size=batch_size,
                max_length=max_length,
                seed=seed,
                force=force,
            )
    except (SettingsError, DataError, ModelLoadError, CheckpointWriteError, OSError) as exc:
        console.print(f"[bold red]error:[/bold red] [red]{escape(str(exc))}[/red]", soft_wrap=True)
        raise typer.Exit(code=2) from None
    Console().print(
        f"wrote {result.layers} Gram matrices from {result.rows} rows to {result.path} "
        f"({time.perf_counter() - started:.1f} s)",
        highlight=False,
    )
