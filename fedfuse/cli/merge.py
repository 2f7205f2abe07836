"""``fedfuse merge``: merge finished checkpoints offline (like mergekit), or combine tier partials."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape

from fedfuse.offline import MergeInputError, MergeResult, combine_partials, merge_models
from fedfuse.strategies import available_strategies

def _report(result: MergeResult, console: Console) -> None:
    what = "partial statistics" if result.kind == "partial" else "model"
    files = "" if result.kind == "partial" else f" ({', '.join(path.name for path in result.files)})"
    console.print(
        f"[green]wrote[/green] {what} to {escape(str(result.out))}{escape(files)}: {result.method}, "
        f"{result.num_updates} update(s), {result.num_tensors} tensors, {decimal(result.nbytes)}",
        soft_wrap=True,
        highlight=False,
    )


def merge(
    base: Annotated[Path, typer.Option("--base", help="Base model: a .safetensors file or an HF model folder.")],
    model: Annotated[
        Optional[list[Path]], typer.Option("--model", "-m", help="A fine-tuned model to merge (repeat per model).")
    ] = None,
    method: Annotated[
        Optional[str], typer.Option("--method", help=f"Merge method: {', '.join(available_strategies())}.")
    ] = None,
    density: Annotated[
        Optional[float],
        typer.Option(
            "--density", help="Kept fraction for the sparsifier (DARE keeps each entry with this probability)."
        ),
    ] = None,
    weight: Annotated[
        Optional[list[float]],
        typer.Option("--weight", "-w", help="Weight of each model, once per --model (default 1)."),
    ] = None,
    lam: Annotated[float, typer.Option("--lambda", help="Scale λ of the merged task vector.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="DARE seed (per model and tensor).")] = 0,
    sparsifier: Annotated[
        Optional[str],
        typer.Option(
            "--sparsifier",
            click_type=click.Choice(["none", "trim", "dare"]),
            help="Override the method's sparsifier (ties: trim, dare_*: dare, others: none).",
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="Where to accumulate: cpu, cuda, cuda:N or auto.")] = "cpu",
    dtype: Annotated[
        str,
        typer.Option("--dtype", click_type=click.Choice(["float32", "float64"]), help="Accumulation precision."),
    ] = "float32",
    vote: Annotated[
        Optional[str],
        typer.Option(
            "--vote", click_type=click.Choice(["mass", "count"]), help="TIES sign election (ties, dare_ties)."
        ),
    ] = None,
    fisher: Annotated[
        Optional[list[Path]],
        typer.Option("--fisher", help="Fisher-diagonal safetensors file, once per --model (fisher method)."),
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output model folder.")] = None,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Shard the output past this size: 5GB, 500MB, 2GiB or bytes.")
    ] = "5GB",
    partial_out: Annotated[
        Optional[Path],
        typer.Option("--partial-out", help="Write this group's partial statistics (for --combine) instead of a model."),
    ] = None,
    combine: Annotated[
        Optional[list[Path]],
        typer.Option("--combine", help="A partial-statistics file to fold in (repeat); replaces --model."),
    ] = None,
    first_model_index: Annotated[
        int,
        typer.Option(
            "--first-model-index", help="Index of the first --model in DARE seeds (for groups of a tiered merge)."
        ),
    ] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a non-empty --out or an existing --partial-out.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")] = False,
) -> None:
    """Merge fine-tuned checkpoints of BASE into one model, tensor by tensor (memory: one tensor).

    Example: fedfuse merge --base BASE -m M1 -m M2 --method ties --density 0.2 --out OUT
    """
    errors = Console(stderr=True)
    progress = not quiet and sys.stderr.isatty()
    try:
        if combine:
            given = {
                "--model": bool(model), "--method": method is not None, "--weight": bool(weight),
                "--density": density is not None, "--sparsifier": sparsifier is not None, "--vote": vote is not None,
                "--fisher": bool(fisher), "--dtype": dtype != "float32", "--lambda": lam != 1.0, "--seed": seed != 0,
                "--first-model-index": first_model_index != 0,
            }
            clashing = [flag for flag, used in given.items() if used]
            if clashing:
                raise MergeInputError(
                    f"{', '.join(clashing)} cannot be used with --combine: "
                    "the merge settings come from the partial files"
                )
            result = combine_partials(
                combine, base=base, out=out, partial_out=partial_out, device=device,
                max_shard_size=max_shard_size, force=force, progress=progress,
            )
        else:
            result = merge_models(
                base, model or [], method=method or "", weights=weight, density=density, sparsifier=sparsifier,
                lam=lam, seed=seed, device=device, dtype=dtype, vote=vote, fishers=fisher, out=out,
                max_shard_size=max_shard_size, partial_out=partial_out, force=force, progress=progress,
                first_model_index=first_model_index,
            )
    except MergeInputError as exc:
        errors.print(f"[bold red]error:[/bold red] [red]{escape(str(exc))}[/red]", soft_wrap=True)
        raise typer.Exit(code=2) from None
    if not quiet:
        _report(result, Console())
