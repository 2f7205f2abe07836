"""``fedfuse eval``: a local model on lm-evaluation-harness tasks (fedfuse's skill tasks or the user's), offline."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from fedfuse.eval import EvalReport

ERROR_EXIT = 2
"""Exit status of every error ``fedfuse eval`` can explain in one line."""


def _fail(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/bold red] [red]{escape(message)}[/red]", soft_wrap=True)
    raise typer.Exit(ERROR_EXIT)


class _Display:
    """A transient rich progress bar over the tasks on stderr (a no-op when stderr is not a terminal)."""

    def __init__(self, bar: Progress | None) -> None:
        self.bar = bar
        self.task = bar.add_task("starting", total=None) if bar is not None else None

    def stage(self, description: str, total: int | None = None) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, description=description, total=total, completed=0)

    def done(self, name: str) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=1, description=f"finished {name}")


@contextmanager
def _display(enabled: bool) -> Iterator[_Display]:
    if not enabled:
        yield _Display(None)
        return
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        yield _Display(bar)


def _table(report: EvalReport) -> Table:
    table = Table(title=f"{report.model} ({report.device}, chat template: {'yes' if report.chat_template else 'no'})")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("± stderr", justify="right")
    table.add_column("examples", justify="right")
    for task, metrics in report.tasks.items():
        count = metrics.get("samples")
        for metric, value in metrics.items():
            if metric == "samples" or metric.endswith("_stderr") or "_stderr," in metric:
                continue
            name, _, filter_name = metric.partition(",")
            stderr = metrics.get(f"{name}_stderr" + (f",{filter_name}" if filter_name else ""))
            table.add_row(
                task,
                metric,
                "-" if value is None else f"{value:.4f}",
                "-" if stderr is None else f"{stderr:.4f}",
                "-" if count is None else str(count),
            )
    return table


def eval_command(
    model: Annotated[
        str, typer.Argument(help="A Hugging Face model folder (e.g. a fedfuse merge/export output), or smollm2.")
    ],
    tasks: Annotated[
        str,
        typer.Option(
            "--tasks",
            "-t",
            help="Comma-separated lm-eval task names: fedfuse_<skill> (fedfuse_skills: all), or any lm-eval task.",
        ),
    ],
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Folder of <skill>-test.jsonl files (fedfuse_* tasks).", file_okay=False),
    ] = None,
    include_path: Annotated[
        list[Path] | None,
        typer.Option("--include-path", help="A folder of your own lm-eval task YAMLs (repeatable).", file_okay=False),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most N examples per task.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts generated per batch.")] = 8,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the results as JSON to this file.")] = None,
    samples: Annotated[
        bool, typer.Option("--samples", help="Put every prompt, target and generation into the --out JSON.")
    ] = False,
) -> None:
    """Evaluate MODEL on lm-evaluation-harness tasks, offline, and print (and optionally write) the metrics.

    fedfuse's skill tasks decode greedily through the model's chat template and score exact match.
    Examples: fedfuse eval merged/ --tasks fedfuse_arithmetic,fedfuse_sort --data-dir skills/ --out results.json;
    fedfuse eval smollm2 --tasks my_task --include-path my_tasks/ --limit 50
    """
    from fedfuse.eval import EvalError, evaluate, load_model, offline, pick_device, require_lm_eval, resolve_model
    from fedfuse.eval import select as select_tasks

    console = Console()
    try:
        require_lm_eval()
        with offline(), _display(sys.stderr.isatty()) as display:
            display.stage("checking the model folder")
            folder = resolve_model(model, on_prepare=lambda: display.stage("converting SmolLM2 once (~1 min)"))
            display.stage("indexing tasks")
            selection = select_tasks(
                tasks.split(","),
                data_dir=data_dir,
                include_paths=include_path or (),
                on_index=lambda: display.stage("indexing lm-eval's built-in tasks (~10 s)"),
            )
            target = pick_device(device)
            display.stage(f"loading {folder.name} on {target}")
            lm = load_model(folder, device=target, batch_size=batch_size)
            display.stage(f"evaluating {', '.join(selection.names)}", total=len(selection.specs))
            report = evaluate(
                lm,
                selection,
                model=str(folder),
                device=target,
                limit=limit,
                log_samples=samples,
                on_task=display.done,
            )
    except EvalError as exc:
        _fail(str(exc))
        return
    console.print(_table(report))
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n", encoding="utf-8")
        except OSError as exc:
            _fail(f"cannot write {out}: {exc.strerror or exc}")
        console.print(f"[green]wrote[/green] {escape(str(out))}", highlight=False)
