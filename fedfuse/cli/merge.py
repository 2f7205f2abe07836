"""``fedfuse merge``: merge finished checkpoints offline (like mergekit), or combine tier partials.

One subcommand per mode, each over its request (:mod:`fedfuse.offline.request`): ``models``, ``adapters``,
``combine`` and ``recipe``. Each option's parameter is named as the request's field, so the options are the
request's fields and an error naming a field prints as the flag (``density`` → ``--density``). Today's flag
form (``fedfuse merge --base B -m M ...``, ``--combine``, ``--adapter``, ``--config``) stays: the group
(:mod:`fedfuse.cli.merge_group`, which lists these commands without importing this module) sends a command line
starting with an option to :func:`merge`, which picks the mode from its flags.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from fedfuse.algebra import RESCALES, available_sparsifiers
from fedfuse.offline import (
    AdapterMergeResult,
    DiagnosisResult,
    MergeInputError,
    MergeResult,
    combine_partials,
    diagnose_adapters,
    diagnose_models,
    merge_models,
)
from fedfuse.offline import Progress as ProgressCallback
from fedfuse.offline import merge_adapters as merge_lora_adapters
from fedfuse.offline.recipe import load_recipe, recipe_request
from fedfuse.offline.request import (
    AdaptersRequest,
    CombineRequest,
    ModelsRequest,
    RecipeRequest,
    RequestError,
    field_help,
    parse_request,
)


def _diagnosis_table(result: DiagnosisResult) -> Table:
    """The diagnosis as a rich table: the inputs by outlier rank."""
    report = result.report
    table = Table(title=f"mergeability of {len(result.inputs)} input(s) under {result.method}")
    for name in ("rank", "input", "weight", "norm", "cos to merged", "mean cos", "sign conflict", "outlier"):
        table.add_column(name, justify="left" if name == "input" else "right")
    rows = {u.label: u for u in report.updates}

    def cell(value: float | None, spec: str = ".3f") -> str:
        return "—" if value is None else format(value, spec)

    for rank, label in enumerate(report.outlier_ranking, 1):
        u = rows[label]
        table.add_row(
            str(rank), escape(label), cell(u.weight, ".4g"), cell(u.norm, ".4g"), cell(u.cosine_to_merged),
            cell(u.mean_cosine), cell(u.sign_conflict), cell(u.outlier_score, ".2f"),
        )  # fmt: skip
    return table


def _report_diagnosis(result: DiagnosisResult, console: Console) -> None:
    report = result.report
    console.print(_diagnosis_table(result))
    mass = "—" if report.sign_conflict_mass is None else f"{report.sign_conflict_mass:.3f}"
    console.print(
        f"sign-conflict mass {mass}; norm max/min {report.norm_ratio:.3g}, coefficient of variation "
        f"{report.norm_cv:.3f}; sketched cosines ±{report.tolerance:.3f}",
        soft_wrap=True,
        highlight=False,
    )
    if result.out is not None:
        console.print(f"[green]wrote[/green] {escape(', '.join(str(p) for p in result.files))}", soft_wrap=True)


def _report(result: MergeResult | AdapterMergeResult | DiagnosisResult, console: Console) -> None:
    if isinstance(result, DiagnosisResult):
        _report_diagnosis(result, console)
        return
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


def _error(console: Console, message: str) -> None:
    console.print(f"[bold red]error:[/bold red] [red]{escape(message)}[/red]", soft_wrap=True)


# ---------------------------------------------------------------- options: one per request field, help from it

Base = Annotated[Path | None, typer.Option("--base", help=field_help("base"))]
Models = Annotated[list[Path] | None, typer.Option("--model", "-m", help="A fine-tuned model to merge (repeat).")]
Adapters = Annotated[list[Path] | None, typer.Option("--adapter", help=field_help("adapters"))]
Method = Annotated[str | None, typer.Option("--method", help=field_help("method"))]
Density = Annotated[float | None, typer.Option("--density", help=field_help("density"))]
Weights = Annotated[list[float] | None, typer.Option("--weight", "-w", help=field_help("weights"))]
Lam = Annotated[float, typer.Option("--lambda", help=field_help("lam"))]
Seed = Annotated[int, typer.Option("--seed", help=field_help("seed"))]
Sparsifier = Annotated[
    str | None,
    typer.Option(
        "--sparsifier",
        click_type=click.Choice(available_sparsifiers()),
        help=field_help("sparsifier"),
    ),
]
Gamma = Annotated[float | None, typer.Option("--gamma", help=field_help("gamma"))]
Epsilon = Annotated[float | None, typer.Option("--epsilon", help=field_help("epsilon"))]
Rescale = Annotated[
    str | None,
    typer.Option(
        "--rescale",
        click_type=click.Choice(list(RESCALES)),
        help=field_help("rescale"),
    ),
]
Device = Annotated[str, typer.Option("--device", help=field_help("device"))]
Dtype = Annotated[
    str, typer.Option("--dtype", click_type=click.Choice(["float32", "float64"]), help=field_help("dtype"))
]
Vote = Annotated[
    str | None, typer.Option("--vote", click_type=click.Choice(["mass", "count"]), help=field_help("vote"))
]
Params = Annotated[list[str] | None, typer.Option("--param", "-p", help=field_help("params") + " Repeat.")]
SparsifierParams = Annotated[
    list[str] | None, typer.Option("--sparsifier-param", help=field_help("sparsifier_params") + " Repeat.")
]
Fishers = Annotated[list[Path] | None, typer.Option("--fisher", help=field_help("fishers"))]
Grams = Annotated[list[Path] | None, typer.Option("--gram", help=field_help("grams"))]
Out = Annotated[Path | None, typer.Option("--out", "-o", help=field_help("out"))]
MaxShardSize = Annotated[str, typer.Option("--max-shard-size", help=field_help("max_shard_size"))]
PartialOut = Annotated[Path | None, typer.Option("--partial-out", help=field_help("partial_out"))]
OutAdapter = Annotated[bool, typer.Option("--out-adapter", help=field_help("out_adapter"))]
Rank = Annotated[int | None, typer.Option("--rank", help=field_help("rank"))]
FirstModelIndex = Annotated[int, typer.Option("--first-model-index", help=field_help("first_model_index"))]
Force = Annotated[bool, typer.Option("--force", help=field_help("force"))]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")]
AllowNonFinite = Annotated[bool, typer.Option("--allow-non-finite", help=field_help("allow_non_finite"))]
Diagnose = Annotated[bool, typer.Option("--diagnose", help=field_help("diagnose"))]


# ---------------------------------------------------------------- running a request


def _given(ctx: click.Context) -> dict[str, Any]:
    """The options given a value other than their default (the request's fields; ``quiet`` is the CLI's)."""
    given: dict[str, Any] = {}
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if param.name == "quiet" or value is None or value is False or value in ((), []) or value == param.default:
            continue
        given[str(param.name)] = value
    return given


def _flags(ctx: click.Context) -> dict[str, str]:
    """Each field's name on this command line: its long flag, or an argument's metavar."""
    names: dict[str, str] = {}
    for param in ctx.command.params:
        longs = [opt for opt in param.opts if opt.startswith("--")]
        names[str(param.name)] = longs[0] if isinstance(param, click.Option) and longs else param.human_readable_name
    return names


def _execute(request: Any, progress: ProgressCallback | None, errors: Console, quiet: bool) -> Any:
    """Run a request with the library function of its mode."""
    if isinstance(request, RecipeRequest):
        recipe = load_recipe(request.config)
        for note in () if quiet else recipe.notes:
            errors.print(f"[dim]note: {escape(note)}[/dim]", soft_wrap=True)
        return merge_models(recipe_request(recipe, request), progress=progress)
    if isinstance(request, CombineRequest):
        return combine_partials(request, progress=progress)
    if isinstance(request, AdaptersRequest):
        return (diagnose_adapters if request.diagnose else merge_lora_adapters)(request, progress=progress)
    assert isinstance(request, ModelsRequest)
    return (diagnose_models if request.diagnose else merge_models)(request, progress=progress)


def _run(ctx: click.Context, mode: str | Callable[[Mapping[str, Any]], str]) -> None:
    """Build the mode's request from the options given, run it; one red line and exit 2 for bad input."""
    quiet = bool(ctx.params.get("quiet"))
    errors = Console(stderr=True)
    try:
        given = _given(ctx)
        request = parse_request({"mode": mode if isinstance(mode, str) else mode(given), **given})
        with _progress_bar(not quiet and sys.stderr.isatty()) as progress:
            result = _execute(request, progress, errors, quiet)
    except RequestError as exc:
        _error(errors, exc.render(_flags(ctx)))
        raise typer.Exit(code=2) from None
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


# ---------------------------------------------------------------- the subcommands


def merge_models_command(
    ctx: typer.Context,
    base: Base = None,
    models: Models = None,
    method: Method = None,
    density: Density = None,
    weights: Weights = None,
    lam: Lam = 1.0,
    seed: Seed = 0,
    sparsifier: Sparsifier = None,
    gamma: Gamma = None,
    epsilon: Epsilon = None,
    rescale: Rescale = None,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    vote: Vote = None,
    params: Params = None,
    sparsifier_params: SparsifierParams = None,
    fishers: Fishers = None,
    grams: Grams = None,
    out: Out = None,
    max_shard_size: MaxShardSize = "5GB",
    partial_out: PartialOut = None,
    first_model_index: FirstModelIndex = 0,
    force: Force = False,
    quiet: Quiet = False,
    allow_non_finite: AllowNonFinite = False,
    diagnose: Diagnose = False,
) -> None:
    """``fedfuse merge models``; its help is its declaration in :data:`fedfuse.cli.merge_group.MERGE_COMMANDS`."""
    _run(ctx, "models")


def merge_adapters_command(
    ctx: typer.Context,
    base: Base = None,
    adapters: Adapters = None,
    method: Method = None,
    density: Density = None,
    weights: Weights = None,
    lam: Lam = 1.0,
    seed: Seed = 0,
    sparsifier: Sparsifier = None,
    gamma: Gamma = None,
    epsilon: Epsilon = None,
    rescale: Rescale = None,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    vote: Vote = None,
    params: Params = None,
    sparsifier_params: SparsifierParams = None,
    out: Out = None,
    out_adapter: OutAdapter = False,
    rank: Rank = None,
    max_shard_size: MaxShardSize = "5GB",
    first_model_index: FirstModelIndex = 0,
    force: Force = False,
    quiet: Quiet = False,
    allow_non_finite: AllowNonFinite = False,
    diagnose: Diagnose = False,
) -> None:
    """``fedfuse merge adapters``; its help is its declaration in :data:`fedfuse.cli.merge_group.MERGE_COMMANDS`."""
    _run(ctx, "adapters")


def combine_command(
    ctx: typer.Context,
    partials: Annotated[list[Path] | None, typer.Argument(help=field_help("partials"), show_default=False)] = None,
    base: Base = None,
    out: Out = None,
    partial_out: PartialOut = None,
    device: Device = "cpu",
    max_shard_size: MaxShardSize = "5GB",
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """``fedfuse merge combine``; its help is its declaration in :data:`fedfuse.cli.merge_group.MERGE_COMMANDS`."""
    _run(ctx, "combine")


def recipe_command(
    ctx: typer.Context,
    config: Annotated[Path, typer.Argument(help=field_help("config"), show_default=False)],
    out: Out = None,
    seed: Seed = 0,
    device: Device = "cpu",
    max_shard_size: MaxShardSize = "5GB",
    force: Force = False,
    quiet: Quiet = False,
    allow_non_finite: AllowNonFinite = False,
) -> None:
    """``fedfuse merge recipe``; its help is its declaration in :data:`fedfuse.cli.merge_group.MERGE_COMMANDS`."""
    _run(ctx, "recipe")


def _flag_form_mode(given: Mapping[str, Any]) -> str:
    """The mode today's flags select: --config, else --combine, else --adapter/--out-adapter/--rank, else models."""
    if "config" in given:
        return "recipe"
    if "base" not in given:
        raise RequestError("give the base model ({base}), or a mergekit recipe ({config})")
    if "partials" in given:
        return "combine"
    return "adapters" if {"adapters", "out_adapter", "rank"} & set(given) else "models"


def merge(
    ctx: typer.Context,
    base: Base = None,
    models: Models = None,
    method: Method = None,
    density: Density = None,
    weights: Weights = None,
    lam: Lam = 1.0,
    seed: Seed = 0,
    sparsifier: Sparsifier = None,
    gamma: Gamma = None,
    epsilon: Epsilon = None,
    rescale: Rescale = None,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    vote: Vote = None,
    params: Params = None,
    sparsifier_params: SparsifierParams = None,
    fishers: Fishers = None,
    grams: Grams = None,
    out: Out = None,
    max_shard_size: MaxShardSize = "5GB",
    partial_out: PartialOut = None,
    partials: Annotated[
        list[Path] | None, typer.Option("--combine", help="A partial-state file to fold in (repeat); replaces --model.")
    ] = None,
    adapters: Adapters = None,
    out_adapter: OutAdapter = False,
    rank: Rank = None,
    first_model_index: FirstModelIndex = 0,
    force: Force = False,
    quiet: Quiet = False,
    allow_non_finite: AllowNonFinite = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="A mergekit recipe (YAML) to run instead of --base/--model.")
    ] = None,
    diagnose: Diagnose = False,
) -> None:
    """Today's flag form (``fedfuse merge --base ...``); its help is its declaration in
    :data:`fedfuse.cli.merge_group.MERGE_COMMANDS`."""
    _run(ctx, _flag_form_mode)
