"""``fedfuse merge``: merge finished checkpoints offline (like mergekit), or combine tier partials."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from fedfuse.algebra.sparsify import SPARSIFIER_KINDS
from fedfuse.offline import AdapterMergeResult, MergeInputError, MergeResult, combine_partials, merge_models
from fedfuse.offline import Progress as ProgressCallback
from fedfuse.offline import merge_adapters as merge_lora_adapters
from fedfuse.offline.recipe import load_recipe, merge_recipe
from fedfuse.strategies import available_strategies, parse_strategy_params


def _report(result: MergeResult | AdapterMergeResult, console: Console) -> None:
    if isinstance(result, AdapterMergeResult):
        console.print(f"[green]wrote[/green] {escape(result.summary().removeprefix('wrote '))}", soft_wrap=True)
        return
    what = "partial statistics" if result.kind == "partial" else "model"
    files = "" if result.kind == "partial" else f" ({', '.join(path.name for path in result.files)})"
    console.print(
        f"[green]wrote[/green] {what} to {escape(str(result.out))}{escape(files)}: {result.method}, "
        f"{result.num_updates} update(s), {result.num_tensors} tensors, {decimal(result.nbytes)}",
        soft_wrap=True,
        highlight=False,
    )


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[ProgressCallback | None]:
    """A rich progress bar on stderr, as the callback the merge loop calls after each tensor."""
    if not enabled:
        yield None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("merging", total=None)

        def advance(name: str, done: int, total: int) -> None:
            bar.update(task, description=name, completed=done, total=total)

        yield advance


def _check_combine_flags(given: dict[str, bool]) -> None:
    clashing = [flag for flag, used in given.items() if used]
    if clashing:
        raise MergeInputError(
            f"{', '.join(clashing)} cannot be used with --combine: the merge settings come from the partial files"
        )


def _check_config_flags(given: dict[str, bool]) -> None:
    clashing = [flag for flag, used in given.items() if used]
    if clashing:
        raise MergeInputError(f"{', '.join(clashing)} cannot be used with --config: the recipe sets the merge")


def _error(console: Console, message: str) -> None:
    console.print(f"[bold red]error:[/bold red] [red]{escape(message)}[/red]", soft_wrap=True)


def merge(
    base: Annotated[
        Path | None, typer.Option("--base", help="Base model: a .safetensors file or an HF model folder.")
    ] = None,
    model: Annotated[
        list[Path] | None, typer.Option("--model", "-m", help="A fine-tuned model to merge (repeat per model).")
    ] = None,
    method: Annotated[
        str | None, typer.Option("--method", help=f"Merge method: {', '.join(available_strategies())}.")
    ] = None,
    density: Annotated[
        float | None,
        typer.Option(
            "--density", help="Kept fraction for the sparsifier (DARE keeps each entry with this probability)."
        ),
    ] = None,
    weight: Annotated[
        list[float] | None,
        typer.Option("--weight", "-w", help="Weight of each model, once per --model (default 1)."),
    ] = None,
    lam: Annotated[float, typer.Option("--lambda", help="Scale λ of the merged task vector.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="DARE seed (per model and tensor).")] = 0,
    sparsifier: Annotated[
        str | None,
        typer.Option(
            "--sparsifier",
            click_type=click.Choice(list(SPARSIFIER_KINDS)),
            help="Override the method's sparsifier (ties: trim, dare_*: dare, breadcrumbs*, della*, others: none).",
        ),
    ] = None,
    gamma: Annotated[
        float | None, typer.Option("--gamma", help="Breadcrumbs: fraction of largest-|τ| outliers dropped (0.01).")
    ] = None,
    epsilon: Annotated[
        float | None, typer.Option("--epsilon", help="DELLA: keep probabilities span density ± epsilon (0.15).")
    ] = None,
    rescale: Annotated[
        str | None,
        typer.Option(
            "--rescale",
            click_type=click.Choice(["inverse", "l1", "none"]),
            help="Rescale kept entries: inverse (1/p, dare/della default), l1 (mergekit) or none.",
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="Where to accumulate: cpu, cuda, cuda:N or auto.")] = "cpu",
    dtype: Annotated[
        str,
        typer.Option("--dtype", click_type=click.Choice(["float32", "float64"]), help="Accumulation precision."),
    ] = "float32",
    vote: Annotated[
        str | None,
        typer.Option(
            "--vote", click_type=click.Choice(["mass", "count"]), help="TIES sign election (ties, dare_ties)."
        ),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param", "-p", help="A declared parameter of the method, NAME=VALUE (repeat), e.g. --param eps=1e-8."
        ),
    ] = None,
    fisher: Annotated[
        list[Path] | None,
        typer.Option("--fisher", help="Fisher-diagonal safetensors file, once per --model (fisher method)."),
    ] = None,
    gram: Annotated[
        list[Path] | None,
        typer.Option(
            "--gram", help="Gram-matrix safetensors file, once per --model (regmean; made by `fedfuse grams`)."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output model folder.")] = None,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Shard the output past this size: 5GB, 500MB, 2GiB or bytes.")
    ] = "5GB",
    partial_out: Annotated[
        Path | None,
        typer.Option("--partial-out", help="Write this group's partial state (for --combine) instead of a model."),
    ] = None,
    combine: Annotated[
        list[Path] | None,
        typer.Option(
            "--combine",
            help="A partial-state file to fold in (--partial-out or a gateway's; repeat); replaces --model.",
        ),
    ] = None,
    adapter: Annotated[
        list[Path] | None,
        typer.Option("--adapter", help="A PEFT LoRA adapter folder to merge in ΔW space (repeat); replaces --model."),
    ] = None,
    out_adapter: Annotated[
        bool, typer.Option("--out-adapter", help="With --adapter: write a PEFT LoRA adapter (needs --rank) to --out.")
    ] = False,
    rank: Annotated[
        int | None, typer.Option("--rank", help="Rank of the --out-adapter factors (truncated SVD of each ΔW).")
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
    allow_non_finite: Annotated[
        bool,
        typer.Option(
            "--allow-non-finite", help="Merge NaN/Inf input values as they are (default: refuse, naming them)."
        ),
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="A mergekit recipe (YAML) to run instead of --base/--model/--method; needs --out."
        ),
    ] = None,
) -> None:
    """Merge fine-tuned checkpoints of BASE into one model, tensor by tensor (memory: one tensor).

    Example: fedfuse merge --base BASE -m M1 -m M2 --method ties --density 0.2 --out OUT
    (or a mergekit recipe: fedfuse merge --config recipe.yml --out OUT)
    """
    errors = Console(stderr=True)
    result: MergeResult | AdapterMergeResult
    try:
        with _progress_bar(not quiet and sys.stderr.isatty()) as progress:
            if config is not None:
                _check_config_flags(
                    {
                        "--base": base is not None,
                        "--model": bool(model),
                        "--method": method is not None,
                        "--weight": bool(weight),
                        "--density": density is not None,
                        "--sparsifier": sparsifier is not None,
                        "--gamma": gamma is not None,
                        "--epsilon": epsilon is not None,
                        "--rescale": rescale is not None,
                        "--vote": vote is not None,
                        "--param": bool(param),
                        "--fisher": bool(fisher),
                        "--gram": bool(gram),
                        "--dtype": dtype != "float32",
                        "--lambda": lam != 1.0,
                        "--partial-out": partial_out is not None,
                        "--combine": bool(combine),
                        "--first-model-index": first_model_index != 0,
                        "--adapter": bool(adapter),
                        "--out-adapter": out_adapter,
                        "--rank": rank is not None,
                    }
                )
                if out is None:
                    raise MergeInputError("give an output folder (--out) for the recipe's merge")
                recipe = load_recipe(config)
                for note in () if quiet else recipe.notes:
                    errors.print(f"[dim]note: {escape(note)}[/dim]", soft_wrap=True)
                result = merge_recipe(
                    recipe,
                    out=out,
                    seed=seed,
                    device=device,
                    max_shard_size=max_shard_size,
                    force=force,
                    progress=progress,
                    allow_non_finite=allow_non_finite,
                )
            elif base is None:
                raise MergeInputError("give the base model (--base), or a mergekit recipe (--config)")
            elif combine:
                _check_combine_flags(
                    {
                        "--model": bool(model),
                        "--method": method is not None,
                        "--weight": bool(weight),
                        "--density": density is not None,
                        "--sparsifier": sparsifier is not None,
                        "--gamma": gamma is not None,
                        "--epsilon": epsilon is not None,
                        "--rescale": rescale is not None,
                        "--vote": vote is not None,
                        "--param": bool(param),
                        "--fisher": bool(fisher),
                        "--gram": bool(gram),
                        "--dtype": dtype != "float32",
                        "--lambda": lam != 1.0,
                        "--seed": seed != 0,
                        "--first-model-index": first_model_index != 0,
                        "--adapter": bool(adapter),
                        "--out-adapter": out_adapter,
                        "--rank": rank is not None,
                    }
                )
                result = combine_partials(
                    combine,
                    base=base,
                    out=out,
                    partial_out=partial_out,
                    device=device,
                    max_shard_size=max_shard_size,
                    force=force,
                    progress=progress,
                )
            elif adapter or out_adapter or rank is not None:
                try:
                    params = parse_strategy_params(param or [])
                except ValueError as exc:
                    raise MergeInputError(f"--param: {exc}") from None
                if model or fisher or gram:
                    given = "--adapter" if adapter else "--out-adapter" if out_adapter else "--rank"
                    mixed = "--model" if model else "--fisher" if fisher else "--gram"
                    raise MergeInputError(
                        f"{given} cannot be mixed with {mixed}: merge either fine-tuned models or LoRA adapters"
                    )
                result = merge_lora_adapters(
                    base,
                    adapter or [],
                    method=method or "",
                    weights=weight,
                    density=density,
                    sparsifier=sparsifier,
                    sparsifier_options={"gamma": gamma, "epsilon": epsilon, "rescale": rescale},
                    lam=lam,
                    seed=seed,
                    device=device,
                    dtype=dtype,
                    vote=vote,
                    params=params,
                    out=out,
                    out_adapter=out_adapter,
                    rank=rank,
                    max_shard_size=max_shard_size,
                    partial_out=partial_out,
                    force=force,
                    progress=progress,
                    first_model_index=first_model_index,
                    allow_non_finite=allow_non_finite,
                )
            else:
                try:
                    params = parse_strategy_params(param or [])
                except ValueError as exc:
                    raise MergeInputError(f"--param: {exc}") from None
                result = merge_models(
                    base,
                    model or [],
                    method=method or "",
                    weights=weight,
                    density=density,
                    sparsifier=sparsifier,
                    sparsifier_options={"gamma": gamma, "epsilon": epsilon, "rescale": rescale},
                    lam=lam,
                    seed=seed,
                    device=device,
                    dtype=dtype,
                    vote=vote,
                    params=params,
                    fishers=fisher,
                    grams=gram,
                    out=out,
                    max_shard_size=max_shard_size,
                    partial_out=partial_out,
                    force=force,
                    progress=progress,
                    first_model_index=first_model_index,
                    allow_non_finite=allow_non_finite,
                )
    except MergeInputError as exc:
        _error(errors, str(exc))
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        _error(errors, "interrupted, nothing written")
        raise typer.Exit(code=130) from None
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        _error(errors, f"cannot write the merge{where}: {exc.strerror or exc}; nothing written")
        raise typer.Exit(code=1) from None
    if not quiet:
        _report(result, Console())
