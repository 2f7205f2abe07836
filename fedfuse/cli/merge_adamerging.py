"""``fedfuse merge adamerging``: merge coefficients learned from unlabeled prompts (AdaMerging), then the merge.

Loads the base and the candidates (fine-tuned models, or PEFT LoRA adapters) once, learns task-wise or
layer-wise coefficients by Adam on the merged model's prediction entropy over ``--prompts``
(:mod:`fedfuse.automerge.adamerging`), and writes the merged model folder with ``adamerging.json`` and
``adamerging.png``. A user's mistake (a missing file, bad bounds, an output folder in the way) is one red line
and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedfuse.automerge.adamerging import AdaMergingResult, AdaMergingSettings, adamerging, read_prompts, save_adamerging
from fedfuse.automerge.inputs import load_inputs
from fedfuse.checkpoints import CheckpointWriteError, check_target
from fedfuse.data.files import DataError
from fedfuse.offline.errors import MergeInputError

DEFAULTS = AdaMergingSettings()


class UsageError(ValueError):
    """An option's value no run can use (bounds that do not parse, no prompts file)."""


def parse_bounds(text: str) -> tuple[float, float]:
    """``"LO,HI"`` → (LO, HI), LO < HI."""
    parts = text.split(",")
    try:
        lower, upper = (float(part) for part in parts)
    except ValueError:
        raise UsageError(f"--bounds must be LO,HI (two numbers), got {text!r}") from None
    if lower >= upper:
        raise UsageError(f"--bounds must have LO < HI, got {text!r}")
    return lower, upper


@contextmanager
def _progress(enabled: bool, steps: int) -> Iterator[Callable[[int, float], None] | None]:
    """A rich progress bar over the steps on stderr, showing the entropy before each step."""
    if not enabled:
        yield None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("learning coefficients", total=steps)

        def advance(step: int, entropy: float) -> None:
            bar.update(task, completed=step + 1, description=f"entropy {entropy:.4f}")

        yield advance


def _summary(result: AdaMergingResult, out: Path) -> str:
    shown = ", ".join(
        f"{label} {row.mean():.3f}" + (f" ({row.min():.2f}–{row.max():.2f})" if row.numel() > 1 else "")
        for label, row in zip(result.labels, result.coefficients, strict=True)
    )
    return (
        f"wrote {out}: AdaMerging {result.coefficients.shape[0]}×{result.coefficients.shape[1]} coefficients, "
        f"entropy {result.history[0]:.4f} → {result.final_entropy:.4f}; mean coefficient {shown}"
    )


Base = Annotated[str, typer.Option("--base", help="The base model: a folder, smollm2, or a hub id.")]
Models = Annotated[list[Path] | None, typer.Option("--model", "-m", help="A fine-tuned model of BASE (repeat).")]
Adapters = Annotated[list[Path] | None, typer.Option("--adapter", help="A PEFT LoRA adapter of BASE (repeat).")]
Prompts = Annotated[
    Path,
    typer.Option(
        "--prompts", help="Unlabeled inputs (JSONL/CSV/Parquet): a messages (user turns), prompt or text column."
    ),
]
LayerWise = Annotated[
    bool, typer.Option("--layer-wise/--task-wise", help="One coefficient per candidate and block, or per candidate.")
]
Out = Annotated[Path, typer.Option("--out", "-o", help="The merged model folder to write.")]
Init = Annotated[float, typer.Option("--init", help="Every coefficient's start (task arithmetic's λ).")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Rows per forward/backward pass.")]
MaxLength = Annotated[int, typer.Option("--max-length", help="Tokens per row (prompt + answer).")]


def adamerging_command(
    base: Base,
    prompts: Prompts,
    out: Out,
    models: Models = None,
    adapters: Adapters = None,
    layer_wise: LayerWise = DEFAULTS.layer_wise,
    steps: Annotated[int, typer.Option("--steps", help="Adam steps.", min=1)] = DEFAULTS.steps,
    learning_rate: Annotated[float, typer.Option("--learning-rate", help="Adam's step size.")] = DEFAULTS.learning_rate,
    init: Init = DEFAULTS.init,
    bounds: Annotated[str, typer.Option("--bounds", help="LO,HI: coefficients are clipped to them.")] = "0,1",
    batch_size: BatchSize = DEFAULTS.batch_size,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Length of the merge's own answers (causal LMs).")
    ] = DEFAULTS.max_new_tokens,
    max_length: MaxLength = DEFAULTS.max_length,
    refresh_every: Annotated[
        int, typer.Option("--refresh-every", help="Regenerate the answers every N steps (0: never).")
    ] = DEFAULTS.refresh_every,
    rows_per_step: Annotated[
        int | None, typer.Option("--rows-per-step", help="Rows drawn per step (default: all).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the rows drawn per step.")] = DEFAULTS.seed,
    device: Annotated[str, typer.Option("--device", help="Where the model runs: cpu, cuda, cuda:1, mps.")] = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")] = False,
) -> None:
    """``fedfuse merge adamerging``; its help is its declaration in :data:`fedfuse.cli.merge_group.MERGE_COMMANDS`."""
    errors = Console(stderr=True)
    try:
        settings = AdaMergingSettings(
            layer_wise=layer_wise,
            steps=steps,
            learning_rate=learning_rate,
            init=init,
            bounds=parse_bounds(bounds),
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            refresh_every=refresh_every,
            rows_per_step=rows_per_step,
            seed=seed,
            device=device,
        ).check()
        check_target(out, directory=True, overwrite=force)
        texts = read_prompts(prompts)
        inputs = load_inputs(base, models=models or (), adapters=adapters or ())
        with _progress(not quiet and sys.stderr.isatty(), steps) as on_step:
            result = adamerging(inputs, texts, settings, on_step=on_step)
        save_adamerging(inputs, base, result, settings, out, force=force)
    except (UsageError, DataError, MergeInputError, CheckpointWriteError, ValueError) as exc:
        errors.print(f"[bold red]error:[/bold red] [red]{escape(str(exc))}[/red]", soft_wrap=True)
        raise typer.Exit(code=2) from None
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        errors.print(
            f"[bold red]error:[/bold red] [red]cannot write{escape(where)}: {escape(str(exc.strerror or exc))}[/red]"
        )
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        errors.print("[bold red]error:[/bold red] [red]interrupted, nothing written[/red]")
        raise typer.Exit(code=130) from None
    if not quiet:
        Console().print(escape(_summary(result, out)), soft_wrap=True, highlight=False)
