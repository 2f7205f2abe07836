"""``fedfuse bench merge-quality``: does merging LoRA experts keep their skills, on a real chat LLM?

From one base model (default the embedded SmolLM2-135M-Instruct) the benchmark fine-tunes one LoRA
expert per skill of :mod:`fedfuse.data.skills` (fedfuse's own local round and SFT trainer, cached
per seed/skill/steps/config), then merges the *same* experts in ΔW space with every registered
merge method and with the naive factor average (see :mod:`fedfuse.bench.merge_quality_experts`).

Protocol (the model-merging literature's): λ is chosen per method from a small grid on the
validation split, the test split is scored once at that λ, by greedy decoding and exact match.
Reported per skill: the base model, each expert (the interference matrix: expert *i* on skill *j*),
each merge; retention = merged accuracy / own-expert accuracy, summarised by its geometric mean over
skills; over seeds the mean and a 95 % Student-t interval. ``--federated`` also runs seed 0's experts as
institutions of a one-round ``fedfuse simulate`` (one skill file per client, ``data-dir``) and
scores the model the fedfuse server merged. Targets print as PASS/FAIL lines; ``--check`` exits 1 on
a failure. Results land in ``--out``: ``merge-quality.json``, ``.md``, ``.png`` and the expert cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedfuse.bench import merge_quality_auto as auto
from fedfuse.bench import merge_quality_experts as experts
from fedfuse.bench import merge_quality_report as report
from fedfuse.bench.merge_quality_eval import Scorer
from fedfuse.checkpoints import atomic_output
from fedfuse.data import skills as skill_data
from fedfuse.export.run import open_run
from fedfuse.simulation import simulate
from fedfuse.strategies import method_spec
from fedfuse.training.run_model import base_model

FEDERATED_METHODS = ("task_arithmetic", "ties", "regmean", "learned")
"""Rows the ``--federated`` variant runs through the fedfuse server, on seed 0: the methods when among
``--methods``, and ``learned`` (coefficient learning with the institutions) when the automated rows include it."""


def _names(text: str, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise typer.BadParameter(f"give at least one {what}")
    return names


def _choose_lambda(
    scorer: Scorer, tau: dict[str, torch.Tensor], grid: Sequence[float], skills: Sequence[str]
) -> tuple[float, dict[str, float]]:
    """The λ of ``grid`` with the best mean validation accuracy (the smallest on ties), and every score."""
    scores: dict[str, float] = {}
    best, best_score = grid[0], -math.inf
    for lam in grid:
        scorer.use(tau, lam)
        accuracy = scorer.accuracies(skills, "validation")
        score = sum(accuracy.values()) / len(accuracy)
        scores[f"{lam:g}"] = score
        if score > best_score:
            best, best_score = lam, score
    return best, scores


def learning_config(settings: auto.AutoSettings) -> dict[str, Any]:
    """The run config of the ``federated learned`` row: the offline ``learned`` row's objective, steps and groups."""
    return {
        "strategy": "task_arithmetic",
        "coefficient-learning": "loss",
        "coefficient-steps": settings.steps,
        "coefficient-learning-rate": settings.learning_rate,
        "coefficient-groups": settings.groups,
    }


def _federated(
    config: experts.ExpertConfig,
    run: dict[str, Any],
    seed: int,
    institutions: Path,
    folder: Path,
    scorer: Scorer,
    skills: Sequence[str],
) -> dict[str, float]:
    """Test accuracy of the model one fedfuse round merges from one institution per skill (``run``: the merge)."""
    simulate(
        {
            **config.run_config(seed),
            "data-dir": str(institutions),
            "num-server-rounds": 1,
            "lora-aggregation": "exact",
            "weighting": "uniform",
            "fraction-evaluate": 0.0,
            "validation-fraction": 0.05,
            "output-dir": str(folder),
            **run,
        },
        num_clients=len(skills),
    )
    checkpoint = open_run(folder).checkpoint
    scorer.use(checkpoint.weights if checkpoint.kind == "change" else scorer.task_vector(checkpoint.weights))
    return scorer.accuracies(skills, "test")


def spec_digest(spec: dict[str, Any]) -> str:
    """A short SHA-256 of everything that shapes a cached result (its file name part)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def run_federated(
    result: report.SeedResult,
    config: experts.ExpertConfig,
    skills: list[str],
    methods: list[str],
    scorer: Scorer,
    out: Path,
    progress: Progress,
    task: Any,
    learning: auto.AutoSettings | None = None,
) -> None:
    """Merge seed ``result.seed``'s experts again as institutions of a one-round simulation, per federated method.

    Each method runs at the λ the offline merge chose; its test accuracies are cached beside the run folder.
    With ``learning`` (and task arithmetic's λ known), ``learned`` runs too: the institutions learn the
    coefficients from task arithmetic's λ, with the offline ``learned`` row's objective, steps and groups.
    """
    institutions = out / "data" / "institutions"
    skill_data.write_institution_dir(institutions, skills, count=config.train_rows)
    seed = result.seed
    runs = {m: {"strategy": m, "lam": result.merges[m].lam} for m in methods if m in result.merges}
    if learning is not None and "task_arithmetic" in result.merges:
        runs["learned"] = {**learning_config(learning), "lam": result.merges["task_arithmetic"].lam}
    for method, run in runs.items():
        progress.update(task, description=f"seed {seed}: federated {method}")
        spec = {"experts": [config.key(skill, seed) for skill in skills], "method": method, **run}
        cache = out / "federated" / f"{method}-seed{seed}-{spec_digest(spec)}.json"
        if cache.is_file():
            result.federated[method] = json.loads(cache.read_text())
        else:
            folder = out / "federated" / f"{method}-seed{seed}"
            result.federated[method] = _federated(config, run, seed, institutions, folder, scorer, skills)
            with atomic_output(cache, directory=False, overwrite=True) as temp:
                temp.write_text(json.dumps(result.federated[method]))
        progress.advance(task)
    scorer.use(None)


def seed_cache(
    out: Path, seed: int, config: experts.ExpertConfig, skills: list[str], methods: list[str], extra: dict[str, Any]
) -> Path:
    """Where the scores of one seed are kept: named by the experts' keys, the methods and the scoring setup."""
    spec = {
        "experts": [config.key(skill, seed) for skill in skills],
        "methods": {m: experts.lambda_grid(m, len(skills)) for m in methods},
        "densities": experts.DENSITIES,
        **extra,
    }
    return out / "seeds" / f"seed{seed}-{spec_digest(spec)}.json"


def run_seed(
    seed: int,
    config: experts.ExpertConfig,
    skills: list[str],
    methods: list[str],
    scorer: Scorer,
    base: dict[str, float],
    files: dict[str, dict[str, Path]],
    out: Path,
    progress: Progress,
    task: Any,
) -> report.SeedResult:
    """Train (or load) the experts of ``seed``, score them, merge them with every method, score the merges."""
    started = time.perf_counter()
    scale = experts.expert_scale(config)
    factors = []
    for skill in skills:
        progress.update(task, description=f"seed {seed}: expert {skill}")
        expert, _ = experts.train_expert(config, skill, seed, files[skill], out / "experts")
        factors.append(expert)
        progress.advance(task)
    deltas = [experts.expert_deltas(f, scale) for f in factors]
    result = report.SeedResult(seed, base, {}, train_seconds=time.perf_counter() - started)
    grams = []
    needs_grams = any(method_spec(m).capabilities.needs_gram for m in methods if m != experts.NAIVE)
    for skill, delta in zip(skills, deltas, strict=True):
        progress.update(task, description=f"seed {seed}: scoring expert {skill}")
        scorer.use(delta)
        result.interference[skill] = scorer.accuracies(skills, "test")
        if needs_grams:
            grams.append(
                experts.expert_grams(config, seed, scorer.model, scorer.tokenizer, list(delta), files[skill]["train"])
            )
        progress.advance(task)
    for method in methods:
        progress.update(task, description=f"seed {seed}: {method}")
        merge_started = time.perf_counter()
        tau = (
            experts.naive_merge(factors, scale)
            if method == experts.NAIVE
            else experts.merge(method, deltas, seed, grams if method_spec(method).capabilities.needs_gram else None)
        )
        lam, validation = _choose_lambda(scorer, tau, experts.lambda_grid(method, len(skills)), skills)
        scorer.use(tau, lam)
        test = scorer.accuracies(skills, "test")
        result.merges[method] = report.MergeResult(lam, validation, test, time.perf_counter() - merge_started)
        progress.console.print(
            f"seed {seed} {method}: λ={lam:g} (validation {', '.join(f'{k}: {v:.3f}' for k, v in validation.items())})"
            f" → test geo-mean retention {result.score(test):.3f}"
        )
        progress.advance(task)
    scorer.use(None)
    return result


def run_automated(
    result: report.SeedResult,
    config: experts.ExpertConfig,
    skills: list[str],
    methods: list[str],
    scorer: Scorer,
    files: dict[str, dict[str, Path]],
    out: Path,
    settings: auto.AutoSettings,
    progress: Progress,
    task: Any,
) -> None:
    """Add the rows that choose their own coefficients to ``result`` (each cached under ``<out>/auto/``).

    They start from task arithmetic's validation-chosen λ when that row ran (else 0.5).
    """
    seed = result.seed
    scale = experts.expert_scale(config)
    factors = [experts.train_expert(config, skill, seed, files[skill], out / "experts")[0] for skill in skills]
    lam = result.merges["task_arithmetic"].lam if "task_arithmetic" in result.merges else 0.5
    context = auto.AutoContext(
        seed,
        skills,
        auto.expert_candidates(skills, factors, scale, settings.groups),
        [experts.expert_deltas(f, scale) for f in factors],
        scorer,
        settings,
        lam,
    )
    spec = {
        "experts": [config.key(skill, seed) for skill in skills],
        "lam": lam,
        "rows": {s: [len(scorer.prompts[s]["validation"]), len(scorer.prompts[s]["test"])] for s in skills},
        **settings.spec(),
    }
    for method in methods:
        progress.update(task, description=f"seed {seed}: {method}")
        started = time.perf_counter()
        merged = auto.cached(
            out, method, seed, spec_digest({**spec, "method": method}), partial(auto.RUNNERS[method], context)
        )
        result.merges[method] = merged
        progress.console.print(
            f"seed {seed} {method}: {merged.budget} → test geo-mean retention {result.score(merged.test):.3f}, "
            f"mean normalized {result.normalized(merged.test):.3f} ({time.perf_counter() - started:.0f} s)"
        )
        progress.advance(task)
    scorer.use(None)


def _automated_names(text: str) -> list[str]:
    names = [] if text.strip() in ("", "none") else _names(text, "automated method")
    unknown = [n for n in names if n not in auto.AUTO_METHODS]
    if unknown:
        raise typer.BadParameter(f"--automated: choose among {', '.join(auto.AUTO_METHODS)} or none; got {unknown}")
    return names


def _federated_plan(federated: bool, text: str, automated: list[str], methods: list[str]) -> tuple[list[str], bool]:
    """The methods ``--federated`` runs through the fedfuse server, and whether ``learned`` runs too."""
    if not federated:
        return [], False
    named = _names(text, "federated method")
    unknown = [m for m in named if m not in FEDERATED_METHODS]
    if unknown:
        raise typer.BadParameter(f"--federated-methods: choose among {', '.join(FEDERATED_METHODS)}; got {unknown}")
    learns = "learned" in named and "learned" in automated and "task_arithmetic" in methods
    return [m for m in named if m in methods], learns


def merge_quality(
    model: Annotated[str, typer.Option("--model", help="Base chat model: smollm2, a local folder or a hub id.")] = (
        "smollm2"
    ),
    skills: Annotated[
        str, typer.Option("--skills", help=f"Comma list of skills (available: {', '.join(skill_data.SKILLS)}).")
    ] = ",".join(skill_data.DEFAULT_SKILLS),
    methods: Annotated[
        str,
        typer.Option(
            "--methods",
            help="Comma list of merge methods (default: every registered one of "
            f"{', '.join(experts.CANDIDATE_METHODS)}, plus {experts.NAIVE}).",
        ),
    ] = "",
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps of each expert.", min=1)] = 30,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds (0…N−1): experts, LoRA init, DARE masks.", min=1)] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per training step.", min=1)] = 8,
    learning_rate: Annotated[float, typer.Option("--learning-rate", help="AdamW learning rate.", min=0.0)] = 3e-3,
    lora_rank: Annotated[int, typer.Option("--lora-rank", help="LoRA rank r.", min=1)] = 8,
    lora_alpha: Annotated[float, typer.Option("--lora-alpha", help="LoRA α (scale α / r).", min=0.0)] = 16.0,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per training chat.", min=8)] = 96,
    train_rows: Annotated[int, typer.Option("--train-rows", help="Training prompts per skill.", min=1)] = 256,
    validation_rows: Annotated[
        int, typer.Option("--validation-rows", help="Validation prompts per skill (λ choice).", min=1)
    ] = 24,
    test_rows: Annotated[int, typer.Option("--test-rows", help="Test prompts per skill.", min=1)] = 48,
    eval_batch: Annotated[int, typer.Option("--eval-batch", help="Prompts per generate call.", min=1)] = 48,
    threads: Annotated[int, typer.Option("--threads", help="torch CPU threads.", min=1)] = 2,
    federated: Annotated[
        bool,
        typer.Option(
            "--federated",
            help="Also merge seed 0's experts as institutions of a one-round simulation (fedfuse server).",
        ),
    ] = False,
    federated_methods: Annotated[
        str,
        typer.Option("--federated-methods", help="Comma list of the rows --federated runs (of the default)."),
    ] = ",".join(FEDERATED_METHODS),
    automated: Annotated[
        str,
        typer.Option(
            "--automated",
            help=f"Comma list of rows that choose their own coefficients ({', '.join(auto.AUTO_METHODS)}), or none.",
        ),
    ] = ",".join(auto.AUTO_METHODS),
    automated_seeds: Annotated[
        int, typer.Option("--automated-seeds", help="Seeds (0…N−1) the automated rows run on.", min=0)
    ] = 1,
    search_budget: Annotated[
        int, typer.Option("--search-budget", help="Validation evaluations of the searched row (CMA-ES).", min=2)
    ] = auto.AutoSettings.budget,
    layer_groups: Annotated[
        int, typer.Option("--layer-groups", help="Layer groups of the searched and learned rows.", min=1)
    ] = auto.AutoSettings.groups,
    learn_steps: Annotated[
        int, typer.Option("--learn-steps", help="Gradient steps of the AdaMerging and learned rows.", min=1)
    ] = auto.AutoSettings.steps,
    learn_rows: Annotated[
        int, typer.Option("--learn-rows", help="Validation rows per skill the learned rows train on.", min=1)
    ] = auto.AutoSettings.learn_rows,
    out: Annotated[Path, typer.Option("--out", help="Folder for results and the expert cache.")] = Path(
        "bench-results/merge-quality"
    ),
    check: Annotated[bool, typer.Option("--check", help="Exit with status 1 when a target fails.")] = False,
) -> None:
    """LoRA experts per skill merged by every registered method: exact match, retention, interference."""
    console = Console()
    torch.set_num_threads(threads)
    names = _names(skills, "skill")
    unknown = [n for n in names if n not in skill_data.SKILLS]
    if unknown or len(set(names)) != len(names):
        raise typer.BadParameter(f"skills must be distinct names among {', '.join(skill_data.SKILLS)}; got {names}")
    try:
        chosen = experts.check_methods(
            _names(methods, "method") if methods else [*experts.default_methods(), experts.NAIVE]
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    config = experts.ExpertConfig(
        model, steps, batch_size, learning_rate, lora_rank, lora_alpha, max_length, train_rows, threads
    )
    auto_methods = _automated_names(automated)
    auto_settings = auto.AutoSettings(
        search_budget, layer_groups, learn_steps, learn_rows=min(learn_rows, validation_rows)
    )
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": train_rows, "validation": validation_rows, "test": test_rows}
    try:
        files = skill_data.write_skill_files(out / "data", names, counts=counts)
        prompts = experts.skill_prompts(names, validation_rows, test_rows)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    lm, tokenizer = base_model(config.settings(0))
    scorer = Scorer(lm, tokenizer, prompts, batch_size=eval_batch)
    console.print(
        f"base {model}; skills {', '.join(names)}; methods {', '.join(chosen)}; {steps} steps × {seeds} seed(s)"
    )
    scoring = {"validation-rows": validation_rows, "test-rows": test_rows}
    caches = [seed_cache(out, seed, config, names, chosen, scoring) for seed in range(seeds)]
    results: list[report.SeedResult | None] = [
        report.SeedResult.from_dict(json.loads(path.read_text())) if path.is_file() else None for path in caches
    ]
    base = next((r.base for r in results if r is not None), None)
    if base is None or any(r is None for r in results):
        console.print("scoring the base model on the test split")
        base = base or scorer.accuracies(names, "test")
    console.print("base model test exact match: " + ", ".join(f"{k} {v:.3f}" for k, v in base.items()))
    per_seed = 2 * len(names) + len(chosen)
    federated_runs, learns = _federated_plan(federated, federated_methods, auto_methods, chosen)
    federated_steps = len(federated_runs) + int(learns)
    auto_seeds = min(automated_seeds, seeds) if auto_methods else 0
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        total = per_seed * results.count(None) + federated_steps + auto_seeds * len(auto_methods)
        task = progress.add_task("merge-quality", total=total)
        for seed, (cached, path) in enumerate(zip(results, caches, strict=True)):
            if cached is not None:
                progress.console.print(f"seed {seed}: scores read from {path}")
                continue
            fresh = run_seed(seed, config, names, chosen, scorer, base, files, out, progress, task)
            with atomic_output(path, directory=False, overwrite=True) as temp:
                temp.write_text(json.dumps(asdict(fresh), indent=2))
            results[seed] = fresh
        done = [r for r in results if r is not None]
        for result in done[:auto_seeds]:
            run_automated(result, config, names, auto_methods, scorer, files, out, auto_settings, progress, task)
        if federated:
            learning = auto_settings if learns else None
            run_federated(done[0], config, names, federated_runs, scorer, out, progress, task, learning)
    rows = report.summarise(done)
    targets = report.checks(rows, done)
    console.print(report.main_table(rows, names, seeds))
    console.print(report.interference_table(done))
    for ok, text in targets:
        console.print(f"{'[green]PASS' if ok else '[red]FAIL'}[/] {text}")
    settings = {
        **asdict(config),
        "seeds": seeds,
        "validation-rows": validation_rows,
        "test-rows": test_rows,
        **(
            {"automated": ",".join(auto_methods), "automated-seeds": auto_seeds, **auto_settings.spec()}
            if auto_methods
            else {}
        ),
    }
    document = {
        "settings": settings,
        "skills": names,
        "methods": chosen,
        "seeds": [asdict(r) for r in done],
        "rows": [{**asdict(r), "mean_score": r.mean_score} for r in rows],
        "checks": [{"pass": ok, "check": text} for ok, text in targets],
    }
    writers: dict[str, Callable[[Path], Any]] = {
        "merge-quality.md": lambda path: path.write_text(report.markdown(rows, done, targets, settings)),
        "merge-quality.json": lambda path: path.write_text(json.dumps(document, indent=2)),
        "merge-quality.png": lambda path: report.plot(rows, done, path),
    }
    for name, write in writers.items():
        with atomic_output(out / name, directory=False, overwrite=True) as temp:
            write(temp)
    console.print(f"saved {out / 'merge-quality.md'}, {out / 'merge-quality.json'}, {out / 'merge-quality.png'}")
    if check and not all(ok for ok, _ in targets):
        raise typer.Exit(code=1)
