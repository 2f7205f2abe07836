"""A search's outputs: the best merge as a mergekit recipe, the model that recipe makes, the log and its plot.

For fine-tuned models the best point becomes a mergekit YAML recipe (:func:`recipe_document`): each model's
``weight`` (one number, or with layer groups a list of ``{filter, value}`` — the block's name prefix, e.g.
``model.layers.3.``, and the exact names of tensors outside the blocks — a form both mergekit and
``fedfuse merge --config`` read), ``density``, and the merge-wide ``lambda``. The model folder is then
written by fedfuse's own recipe merge (:func:`fedfuse.offline.recipe.merge_recipe`, same seed), so
``fedfuse merge --config OUT/recipe.yaml --seed SEED`` writes it again. Adapters cannot be named in a
mergekit recipe: their best merge is written as the full model, base + merged ΔW in the base's dtypes.
``search.json`` holds every evaluation, ``search.png`` the score per evaluation and the running best.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from fedfuse.automerge.coefficients import Candidates, layer_index
from fedfuse.automerge.output import write_merged_tensors
from fedfuse.automerge.search import Point, SearchResult, task_vector
from fedfuse.offline.errors import MergeInputError

RECIPE = "recipe.yaml"
LOG = "search.json"
PLOT = "search.png"


def group_filters(candidates: Candidates) -> list[tuple[str, int]]:
    """(filter, group) pairs that give every changed tensor its layer group: exact names, then block prefixes."""
    outside: list[tuple[str, int]] = []
    blocks: dict[str, int] = {}
    for name, group in candidates.groups.items():
        index = layer_index(name)
        if index is None:
            outside.append((name, group))
        else:
            marker = name.index(f".{index}.") + len(f".{index}.")
            blocks.setdefault(name[:marker], group)
    return sorted(outside, key=lambda item: -len(item[0])) + list(blocks.items())


def _weight(row: Sequence[float], filters: list[tuple[str, int]]) -> Any:
    if len(set(row)) == 1:
        return float(row[0])
    return [{"filter": f, "value": float(row[g])} for f, g in filters] + [{"value": float(row[0])}]


def recipe_document(
    method: str, base: Path, models: Sequence[Path], point: Point, candidates: Candidates
) -> dict[str, Any]:
    """The mergekit recipe of ``method`` at ``point`` (models of weight 0 in a linear merge left out)."""
    filters = group_filters(candidates)
    entries = []
    for path, row in zip(models, point.weights, strict=True):
        if method == "linear" and not any(row):
            continue
        parameters: dict[str, Any] = {"weight": _weight(row, filters)}
        if method in ("ties", "dare_ties", "dare_linear"):
            parameters["density"] = float(point.density)
        entries.append({"model": str(Path(path).resolve()), "parameters": parameters})
    doc: dict[str, Any] = {"merge_method": method}
    if method != "linear":  # mergekit's linear merge has no reference model
        doc["base_model"] = str(Path(base).resolve())
    doc["models"] = entries
    if method != "linear":
        doc["parameters"] = {"lambda": float(point.lam)}
    return doc


def write_recipe_model(doc: Mapping[str, Any], out: Path, *, seed: int, force: bool) -> Path:
    """Write ``doc`` as ``out/recipe.yaml`` after fedfuse's recipe merge wrote the model into ``out``."""
    from fedfuse.offline.recipe import merge_recipe

    text = yaml.safe_dump(dict(doc), sort_keys=False)
    with tempfile.TemporaryDirectory() as folder:
        staged = Path(folder) / RECIPE
        staged.write_text(text, encoding="utf-8")
        merge_recipe(staged, out=out, seed=seed, force=force)
    (out / RECIPE).write_text(text, encoding="utf-8")
    return out / RECIPE


def write_changes_model(base: Path, changes: Mapping[str, Any], out: Path, *, force: bool) -> Path:
    """base + change for every tensor of the local ``base`` folder, in its dtypes, other files copied (atomic).

    What an adapters' search writes: the full merged model, as ``fedfuse merge adapters`` writes one.
    """
    from fedfuse.checkpoints import atomic_output

    with atomic_output(out, directory=True, overwrite=force) as temp:
        write_merged_tensors(Path(base), changes, temp, "search")
    return out


def local_base(base: str | Path) -> Path:
    """The base's local folder (a path, ``default`` or ``smollm2``); a hub id cannot be written in a recipe."""
    from fedfuse.models.loading import ModelLoadError, resolve_model_source

    try:
        source = resolve_model_source(base)
    except ModelLoadError as exc:
        raise MergeInputError(f"base {base}: {exc}") from None
    if not isinstance(source, Path):
        raise MergeInputError(f"base {base}: a search writes its merge from a local folder; download the model first")
    return source


def write_log(result: SearchResult, out: Path, settings: Mapping[str, Any]) -> Path:
    """``search.json``: the settings, the best point, the baseline and every evaluation."""
    path = out / LOG
    path.write_text(json.dumps({**settings, **result.to_json()}, indent=2) + "\n", encoding="utf-8")
    return path


def write_plot(result: SearchResult, out: Path, title: str) -> Path:
    """``search.png``: each evaluation's score and the running best (matplotlib, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scores = [e.score for e in result.evaluations]
    running = [max(scores[: i + 1]) for i in range(len(scores))]
    figure = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps = list(range(1, len(scores) + 1))
    axes.scatter(steps, scores, s=14, label="evaluation")
    axes.plot(steps, running, color="C1", label="best so far")
    axes.axhline(result.baseline.score, color="grey", linestyle=":", label="baseline")
    axes.set_xlabel("evaluation")
    axes.set_ylabel("score (higher is better)")
    axes.set_title(title)
    axes.legend(loc="lower right")
    figure.tight_layout()
    path = out / PLOT
    figure.savefig(path, dpi=100)
    return path


def write_outputs(
    result: SearchResult,
    inputs: Any,
    *,
    base: str | Path,
    models: Sequence[Path],
    out: Path,
    seed: int,
    force: bool,
    settings: Mapping[str, Any],
) -> list[Path]:
    """The best merge (recipe + model; for adapters the model), ``search.json`` and ``search.png``, into ``out``."""
    best, folder = result.best.point, local_base(base)
    written: list[Path] = []
    if models:
        doc = recipe_document(result.method, folder, models, best, inputs.candidates)
        written.append(write_recipe_model(doc, out, seed=seed, force=force))
    else:
        write_changes_model(folder, task_vector(inputs.candidates, result.method, best, seed), out, force=force)
    written.append(write_log(result, out, settings))
    written.append(write_plot(result, out, f"{settings.get('method', result.method)}: {settings.get('scorer', '')}"))
    return written
