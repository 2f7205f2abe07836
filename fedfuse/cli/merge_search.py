"""``fedfuse merge search``: search a merge's coefficients (or cook a greedy soup) against a scorer, and write it.

Imported only when the subcommand runs or shows its own help (:mod:`fedfuse.cli.merge_group` lists it lazily).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

GREEDY_SOUP = "greedy_soup"
METHODS = ("task_arithmetic", "linear", "ties", "dare_ties", "dare_linear", GREEDY_SOUP)
DEFAULT_BUDGET = 20


def _check(method: str, optimizer: str | None, budget: int | None, search: str | None, out: Path, force: bool) -> Any:
    """The cheap checks, before any model is loaded; the search space (None for a greedy soup)."""
    from fedfuse.automerge.search import OPTIMIZERS, SearchSpace, require_optimizer
    from fedfuse.offline.errors import MergeInputError

    if method not in METHODS:
        raise MergeInputError(f"--method: choose one of {', '.join(METHODS)}, got {method!r}")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise MergeInputError(f"--optimizer: choose one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if method == GREEDY_SOUP:
        given = [
            flag for flag, value in (("--optimizer", optimizer), ("--budget", budget), ("--search", search)) if value
        ]
        if given:
            raise MergeInputError(
                f"--method greedy_soup searches nothing (it makes 2K − 1 evaluations): drop {', '.join(given)}"
            )
    elif budget is not None and budget < 2:
        raise MergeInputError(f"--budget: at least 2 (the default point and one more), got {budget}")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise MergeInputError(f"--out: {out} exists: pass --force to replace it")
    if method == GREEDY_SOUP:
        return None
    require_optimizer(optimizer or "cma")
    return SearchSpace.parse(search or "weights", method)


def search_command(
    base: Annotated[
        str, typer.Option("--base", help="The base the candidates were tuned from: a folder, default or smollm2.")
    ],
    scorer: Annotated[
        str,
        typer.Option(
            "--scorer",
            help="What to maximize: loss:FILE, exact-match:FILE, accuracy:FILE or lm-eval:TASK "
            "(options after commas, e.g. exact-match:val.jsonl,max_new_tokens=16).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="The output folder: model, recipe.yaml, search.json/png.")],
    model: Annotated[
        list[Path] | None, typer.Option("--model", "-m", help="A fine-tuned model folder (repeat).")
    ] = None,
    adapter: Annotated[
        list[Path] | None, typer.Option("--adapter", help="A PEFT LoRA adapter folder (repeat).")
    ] = None,
    method: Annotated[str, typer.Option("--method", help=f"{' | '.join(METHODS)}.")] = "task_arithmetic",
    optimizer: Annotated[
        str | None, typer.Option("--optimizer", help="cma (CMA-ES, the default) or tpe (Optuna's TPE).")
    ] = None,
    search: Annotated[
        str | None,
        typer.Option("--search", help="What to search: weights, lam, density (comma-separated; default weights)."),
    ] = None,
    layer_groups: Annotated[
        int, typer.Option("--layer-groups", min=1, help="Weights per group of contiguous blocks (1: per model).")
    ] = 1,
    budget: Annotated[
        int | None,
        typer.Option("--budget", help=f"Scorer evaluations, the default point's included (default {DEFAULT_BUDGET})."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seeds the optimizer and the DARE masks.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace the output folder.")] = False,
) -> None:
    """Search per-model (per-layer-group) weights, λ and density against a scorer, or cook a greedy soup."""
    from fedfuse.offline.errors import MergeInputError

    errors = Console(stderr=True)
    try:
        space = _check(method, optimizer, budget, search, out, force)
        _run(base, list(model or []), list(adapter or []), method, optimizer or "cma", space, layer_groups, scorer,
             budget or DEFAULT_BUDGET, seed, out, force)  # fmt: skip
    except MergeInputError as exc:
        errors.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        errors.print("[red]error:[/red] interrupted", soft_wrap=True)
        raise typer.Exit(code=130) from None


def _run(
    base: str,
    models: list[Path],
    adapters: list[Path],
    method: str,
    optimizer: str,
    space: Any,
    groups: int,
    spec: str,
    budget: int,
    seed: int,
    out: Path,
    force: bool,
) -> None:
    """Load, score, search (or soup), write; a progress bar over the evaluations on a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from transformers.utils import logging as transformers_logging

    from fedfuse.automerge import CoefficientModel
    from fedfuse.automerge.inputs import load_inputs, model_kind
    from fedfuse.automerge.recipe_out import write_outputs
    from fedfuse.automerge.scorers import build_scorer, check_kind, parse_scorer
    from fedfuse.automerge.search import search as run_search
    from fedfuse.automerge.soup import greedy_soup

    parsed = parse_scorer(spec)
    if Path(base).is_dir():  # a scorer that does not fit the base is refused before anything is loaded
        check_kind(parsed, causal=model_kind(base) == "causal")
    transformers_logging.disable_progress_bar()  # our own bar counts the evaluations
    inputs = load_inputs(base, models=models, adapters=adapters, layer_groups=groups)
    scorer = build_scorer(parsed, inputs.model, inputs.tokenizer, causal=inputs.causal)
    cmodel = CoefficientModel(inputs.model, inputs.candidates)
    total = 2 * len(inputs.candidates) - 1 if space is None else budget
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("best {task.fields[best]}"),
        console=Console(stderr=True), disable=not sys.stderr.isatty(), transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task(f"{method} ({parsed.kind})", total=total, best="-")
        best: list[float] = []

        def advance(evaluation: Any) -> None:
            best.append(max([evaluation.score, *best[-1:]]))
            bar.update(task, advance=1, best=f"{best[-1]:.4g}")

        if space is None:
            result = greedy_soup(cmodel, scorer, on_evaluation=advance)
        else:
            result = run_search(
                cmodel, scorer, method=method, space=space, budget=budget, optimizer=optimizer, seed=seed,
                on_evaluation=advance,
            )  # fmt: skip
    settings = {
        "base": str(base), "inputs": [str(p) for p in models or adapters], "kind": "models" if models else "adapters",
        "method": method, "optimizer": None if space is None else optimizer, "scorer": spec,
        "search": None if space is None else [k for k in ("weights", "lam", "density") if getattr(space, k)],
        "layer_groups": inputs.candidates.num_groups, "budget": total, "seed": seed,
    }  # fmt: skip
    write_outputs(result, inputs, base=base, models=models, out=out, seed=seed, force=force, settings=settings)
    _summary(result, out, len(result.evaluations))


def _summary(result: Any, out: Path, count: int) -> None:
    console = Console()
    console.print(
        f"{count} evaluations: baseline {result.baseline.score:.6g}, best {result.best.score:.6g}"
        + (f" (soup: {', '.join(result.chosen)})" if result.chosen else ""),
        soft_wrap=True,
    )
    console.print(
        f"wrote {out} (model, {'recipe.yaml, ' if (out / 'recipe.yaml').exists() else ''}search.json, search.png)"
    )
