"""``fedfuse export``: a run's global model as a Hugging Face folder, or a LoRA run's ΔW as a PEFT adapter."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape

if TYPE_CHECKING:
    from fedfuse.export import ExportResult


def _report(result: ExportResult, console: Console) -> None:
    what = f"rank-{result.rank} LoRA adapter" if result.kind == "adapter" else "model"
    count = "adapter parameters" if result.kind == "adapter" else "parameters"
    console.print(
        f"[green]wrote[/green] {what} of round {result.round} to {escape(str(result.out))}: "
        f"{result.parameters:,} {count}, {decimal(result.nbytes)} ({escape(', '.join(result.files))})",
        soft_wrap=True,
        highlight=False,
    )
    if result.kind == "adapter":
        module, worst = result.worst_module or ("-", 0.0)
        console.print(
            f"relative error ‖ΔW − B·A‖/‖ΔW‖: {result.relative_error:.3g} over all modules, "
            f"max {worst:.3g} ({escape(module)})",
            soft_wrap=True,
            highlight=False,
        )
        if result.num_labels is not None:
            console.print(
                f"load its base with num_labels={result.num_labels}, then PeftModel.from_pretrained(base, "
                f"{escape(repr(str(result.out)))})",
                soft_wrap=True,
                highlight=False,
            )


def export(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (--output-dir), its checkpoint/ folder or state.json.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The folder to write (atomically).")],
    round_number: Annotated[
        int | None,
        typer.Option("--round", help="A kept round (default: the last; keep-checkpoints=0 keeps every round)."),
    ] = None,
    adapter: Annotated[
        bool, typer.Option("--adapter", help="Write a PEFT LoRA adapter of ΔW = W_round − W_base (LoRA runs).")
    ] = False,
    rank: Annotated[int | None, typer.Option("--rank", help="Rank of the adapter (truncated SVD of each ΔW).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out folder.")] = False,
) -> None:
    """Export RUN_DIR's global model after a round as a Hugging Face folder, or as a PEFT LoRA adapter.

    Examples: fedfuse export runs/fedfuse --out exported/model;
    fedfuse export runs/fedfuse --adapter --rank 16 --out exported/adapter
    """
    from fedfuse.export import (  # torch and PEFT only when used
        ExportError,
        export_adapter,
        export_model,
    )
    from fedfuse.known_warnings import known_warnings_silenced

    try:
        with known_warnings_silenced():  # PEFT reads a deprecated transformers property when it wraps a model
            if adapter:
                if rank is None:
                    raise ExportError("--adapter needs --rank r (the rank of the exported LoRA factors)")
                result = export_adapter(run_dir, out, rank=rank, round_number=round_number, force=force)
            else:
                if rank is not None:
                    raise ExportError("--rank applies to --adapter only")
                result = export_model(run_dir, out, round_number=round_number, force=force)
    except ExportError as exc:
        Console(stderr=True).print(f"[bold red]error:[/bold red] [red]{escape(str(exc))}[/red]", soft_wrap=True)
        raise typer.Exit(code=1) from None
    _report(result, Console())
