"""AdaMerging (Yang et al., ICLR 2024): merge coefficients learned without labels, by entropy minimisation.

The merged model θ = θ_base + Σₖ c[k, g]·τₖ has one coefficient per candidate (task-wise, G = 1) or per
candidate and transformer block (layer-wise, G = number of blocks). Starting from task arithmetic's usual
c = 0.3, Adam (:class:`~fedfuse.automerge.learn.CoefficientOptimizer`, the one step rule, clipped to
``bounds``) lowers the Shannon entropy of the merged model's predictions over unlabeled local inputs: a
confident merge is, empirically, an accurate one (the paper's premise). Each step costs one forward and one
backward pass over the rows (or ``rows_per_step`` of them); no label is read.

- Classifiers: the inputs are texts; the entropy is that of the predicted class distribution.
- Causal LMs: the inputs are prompts; the entropy is that of the next-token distribution at the positions
  of an answer. The answers are the current merge's own greedy answers (:func:`objectives.pseudo_answers`),
  regenerated every ``refresh_every`` steps from the current coefficients: the positions whose entropy is
  lowered should be the ones the merged model actually generates, and those move as the coefficients move
  (answers from the starting merge alone would tune the merge to continuations it no longer writes).

:func:`save_adamerging` writes the merged model as ``fedfuse merge`` does (base + Σ c·τ per tensor in the
base's dtype, config and tokenizer copied, all inside one atomic folder) plus ``adamerging.json`` and
``adamerging.png``. Adapter candidates are merged into the full model the same way (ΔWₖ = sₖ·Bₖ·Aₖ).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedfuse import __version__
from fedfuse.algebra.low_rank import LowRank
from fedfuse.automerge.coefficients import Candidates, CoefficientModel, Direction, layer_groups, layer_index
from fedfuse.automerge.inputs import MergeInputs, PathLike
from fedfuse.automerge.learn import CoefficientOptimizer
from fedfuse.automerge.objectives import Rows, chat_rows, class_rows, pseudo_answers, value, value_and_gradient
from fedfuse.automerge.output import write_merged_tensors
from fedfuse.checkpoints import atomic_output
from fedfuse.data.files import DataError, read_table

PROMPT_COLUMNS = ("messages", "prompt", "text")
"""Columns an unlabeled input file may hold, in the order they are looked for."""

REPORT_JSON = "adamerging.json"
REPORT_PNG = "adamerging.png"


@dataclass(frozen=True)
class AdaMergingSettings:
    """How coefficients are learned (the CLI's options; recorded in ``adamerging.json``)."""

    layer_wise: bool = True
    steps: int = 50
    learning_rate: float = 0.05
    init: float = 0.3
    bounds: tuple[float, float] = (0.0, 1.0)
    batch_size: int = 8
    max_new_tokens: int = 32
    max_length: int = 256
    refresh_every: int = 10
    rows_per_step: int | None = None
    seed: int = 0
    device: str | None = None
    """Where the model runs (``cuda``, ``cuda:1``, ``cpu``); None: where the model already is."""

    def check(self) -> AdaMergingSettings:
        """Refuse settings no run can use, in one line each."""
        lower, upper = self.bounds
        problems = [
            (self.steps < 1, f"steps must be at least 1, got {self.steps}"),
            (self.learning_rate <= 0, f"learning rate must be positive, got {self.learning_rate}"),
            (lower >= upper, f"bounds must be LO,HI with LO < HI, got {lower},{upper}"),
            (not lower <= self.init <= upper, f"init {self.init} lies outside the bounds [{lower}, {upper}]"),
            (self.batch_size < 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.max_new_tokens < 1, f"max new tokens must be at least 1, got {self.max_new_tokens}"),
            (self.refresh_every < 0, f"refresh every must be 0 (never) or more, got {self.refresh_every}"),
            (self.rows_per_step is not None and self.rows_per_step < 1, "rows per step must be at least 1"),
        ]
        for failed, message in problems:
            if failed:
                raise ValueError(message)
        if self.device is None:
            return self
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: no CUDA device is available")
        return self


@dataclass(frozen=True)
class AdaMergingResult:
    """Learned K×G coefficients, the entropy before each step and after the last, and how groups map to blocks."""

    coefficients: torch.Tensor
    history: list[float]
    labels: tuple[str, ...]
    final_entropy: float
    group_blocks: list[list[int]]
    trajectory: list[list[list[float]]] = field(default_factory=list)
    refreshed_at: list[int] = field(default_factory=list)
    rows: int = 0

    def to_json(self, settings: AdaMergingSettings) -> dict[str, Any]:
        """The record written to ``adamerging.json``."""
        c = self.coefficients.tolist()
        return {
            "method": "adamerging",
            "fedfuse_version": __version__,
            "settings": {**settings.__dict__, "bounds": list(settings.bounds)},
            "labels": list(self.labels),
            "groups": [{"group": g, "blocks": blocks} for g, blocks in enumerate(self.group_blocks)],
            "coefficients": {label: row for label, row in zip(self.labels, c, strict=True)},
            "entropy": {"per_step": self.history, "final": self.final_entropy, "refreshed_at": self.refreshed_at},
            "trajectory": self.trajectory,
            "rows": self.rows,
        }


def read_prompts(path: PathLike) -> list[str]:
    """Unlabeled inputs from a JSONL/CSV/Parquet file, per row: ``messages`` (user turns), ``prompt`` or ``text``."""
    table = read_table(path)
    columns = [name for name in PROMPT_COLUMNS if name in table.column_names]
    if not columns:
        raise DataError(f"{path} needs a column {', '.join(PROMPT_COLUMNS)}; it has {', '.join(table.column_names)}")
    prompts = [_prompt_of(row, columns, path, number) for number, row in enumerate(table, start=1)]
    if not prompts:
        raise DataError(f"{path} holds no rows")
    return prompts


def _prompt_of(row: Mapping[str, Any], columns: Sequence[str], path: PathLike, number: int) -> str:
    """The row's first non-empty column among ``columns``: a chat's user turns joined by newlines, or the text."""
    for column in columns:
        cell = row.get(column)
        if column == "messages":
            turns = cell if isinstance(cell, list) else []
            text = "\n".join(
                str(t.get("content") or "") for t in turns if isinstance(t, dict) and t.get("role") == "user"
            )
        else:
            text = "" if cell is None else str(cell)
        if text.strip():
            return text
    raise DataError(f"{path} row {number}: no text in {', '.join(columns)} (a chat needs a user turn)")


def model_blocks(model: torch.nn.Module) -> int:
    """How many transformer blocks ``model`` has (the layer-wise group count; at least 1)."""
    return max(1, len({i for name, _ in model.named_parameters() if (i := layer_index(name)) is not None}))


def group_blocks(candidates: Candidates) -> list[list[int]]:
    """The transformer blocks in each layer group (embeddings join the first, the head the last)."""
    blocks: list[set[int]] = [set() for _ in range(candidates.num_groups)]
    for name, group in candidates.groups.items():
        if (index := layer_index(name)) is not None:
            blocks[group].add(index)
    return [sorted(b) for b in blocks]


def regrouped(
    candidates: Candidates, model: torch.nn.Module, groups: int, device: torch.device | None = None
) -> Candidates:
    """``candidates`` in ``groups`` layer groups, names in the model's order (their tensors on ``device``).

    The model's order puts the head after the last block whichever candidate names it first (the order of
    first appearance would put a head that only the first candidate changes in group 0).
    """
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    names = sorted(candidates.names, key=lambda name: order.get(name, len(order)))
    assigned = layer_groups(names, groups)
    vectors = candidates.vectors
    if device is not None and device.type != "cpu":
        vectors = tuple({name: _moved(d, device) for name, d in vector.items()} for vector in vectors)
    return Candidates(candidates.labels, vectors, assigned, 1 + max(assigned.values(), default=0))


def _moved(direction: Direction, device: torch.device) -> Direction:
    if isinstance(direction, LowRank):
        return LowRank(direction.b.to(device), direction.a.to(device))
    return direction.to(device)


def _on(rows: Rows, device: torch.device) -> Rows:
    """``rows`` on ``device`` (where the model runs)."""
    return Rows(rows.input_ids.to(device), rows.attention_mask.to(device), rows.targets.to(device), rows.causal)


def _rows_at(
    inputs: MergeInputs, model: CoefficientModel, c: torch.Tensor, texts: Sequence[str], settings: AdaMergingSettings
) -> Rows:
    """Rows to score at coefficients ``c``: texts with dummy labels, or prompts with the merge's own answers."""
    if not inputs.causal:
        return _trimmed(class_rows(inputs.tokenizer, texts, [0] * len(texts), settings.max_length))
    model.load(c)
    pairs = pseudo_answers(model.model, inputs.tokenizer, texts, settings.max_new_tokens, settings.batch_size)
    return _trimmed(chat_rows(inputs.tokenizer, pairs, settings.max_length))


def _trimmed(rows: Rows) -> Rows:
    """``rows`` without the padding columns every row has (right padding: the same logits, less compute)."""
    width = max(int(rows.attention_mask.sum(dim=1).max()), 2)
    if bool(rows.attention_mask[:, width:].any()):  # left padding: keep the rows as they are
        return rows
    targets = rows.targets[:, :width] if rows.causal else rows.targets  # a classifier's are one class per row
    return Rows(rows.input_ids[:, :width], rows.attention_mask[:, :width], targets, rows.causal)


def _subset(rows: Rows, size: int | None, generator: torch.Generator) -> Rows:
    if size is None or size >= len(rows):
        return rows
    keep = torch.randperm(len(rows), generator=generator)[:size].sort().values
    return Rows(rows.input_ids[keep], rows.attention_mask[keep], rows.targets[keep], rows.causal)


def adamerging(
    inputs: MergeInputs,
    prompts_or_rows: Sequence[str] | Rows,
    settings: AdaMergingSettings | None = None,
    *,
    on_step: Callable[[int, float], None] | None = None,
) -> AdaMergingResult:
    """Learn K×G coefficients that minimise the merged model's prediction entropy on unlabeled inputs.

    ``prompts_or_rows``: prompts (causal LM) or texts (classifier), or ready :class:`Rows` (scored as they
    are, never refreshed). ``on_step(step, entropy)`` is called before each step. The model is left as the
    base, on ``settings.device``.
    """
    settings = (settings or AdaMergingSettings()).check()
    if len(prompts_or_rows) == 0:
        raise ValueError("AdaMerging needs at least one unlabeled input")
    groups = model_blocks(inputs.model) if settings.layer_wise else 1
    device = torch.device(settings.device) if settings.device else next(inputs.model.parameters()).device
    candidates = regrouped(inputs.candidates, inputs.model.to(device), groups, device)
    model = CoefficientModel(inputs.model, candidates)
    optimizer = CoefficientOptimizer(
        candidates.uniform(settings.init), settings.learning_rate, lower=settings.bounds[0], upper=settings.bounds[1]
    )
    generator = torch.Generator().manual_seed(settings.seed)
    rows: Rows | None = _on(prompts_or_rows, device) if isinstance(prompts_or_rows, Rows) else None
    texts: Sequence[str] = () if isinstance(prompts_or_rows, Rows) else prompts_or_rows
    history: list[float] = []
    trajectory: list[list[list[float]]] = []
    refreshed: list[int] = []
    try:
        for step in range(settings.steps):
            c = optimizer.coefficients.to(torch.float32)
            if texts and (rows is None or (settings.refresh_every and step % settings.refresh_every == 0)):
                rows = _on(_rows_at(inputs, model, c, texts, settings), device)
                refreshed.append(step)
            assert rows is not None
            trajectory.append(c.tolist())
            batch = _subset(rows, settings.rows_per_step, generator)
            entropy, gradient, _ = value_and_gradient(model, c, batch, "entropy", settings.batch_size)
            history.append(entropy)
            if on_step is not None:
                on_step(step, entropy)
            optimizer.step(gradient)
        learned = optimizer.coefficients.to(torch.float32)
        assert rows is not None
        final = value(model, learned, rows, "entropy", settings.batch_size)
    finally:
        model.load(None)
    trajectory.append(learned.tolist())
    return AdaMergingResult(
        learned, history, candidates.labels, final, group_blocks(candidates), trajectory, refreshed, len(rows)
    )


def save_adamerging(
    inputs: MergeInputs,
    base: PathLike,
    result: AdaMergingResult,
    settings: AdaMergingSettings,
    out: PathLike,
    *,
    force: bool = False,
) -> Path:
    """Write the merged model, ``adamerging.json`` and ``adamerging.png`` into ``out`` atomically.

    A local base folder is streamed tensor by tensor in its own dtypes; a hub base is saved from the loaded
    (fp32) model with the merge written into it. Nothing is left at ``out`` if anything fails.
    """
    from fedfuse.models.loading import resolve_model_source

    candidates = regrouped(inputs.candidates, inputs.model, result.coefficients.shape[1])
    changes = candidates.merged(result.coefficients)
    source = resolve_model_source(base)
    with atomic_output(out, directory=True, overwrite=force) as temp:
        if isinstance(source, Path):
            write_merged_tensors(source, changes, temp, "adamerging")
        else:
            device = next(inputs.model.parameters()).device
            model = CoefficientModel(inputs.model, regrouped(candidates, inputs.model, candidates.num_groups, device))
            model.load(result.coefficients)
            try:
                inputs.model.save_pretrained(temp)  # type: ignore[operator]
            finally:
                model.load(None)
            inputs.tokenizer.save_pretrained(temp)
        (temp / REPORT_JSON).write_text(json.dumps(result.to_json(settings), indent=2) + "\n", encoding="utf-8")
        plot_adamerging(result, temp / REPORT_PNG)
    return Path(out)


def plot_adamerging(result: AdaMergingResult, path: Path) -> None:
    """Entropy per step (refreshes marked) beside the coefficients: per step (task-wise) or a K×G heatmap."""
    import numpy
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4))
    FigureCanvasAgg(figure)
    entropy, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    entropy.plot(range(len(result.history)), result.history, marker=".", label="before the step")
    entropy.axhline(result.final_entropy, color="grey", linestyle=":", label="after the last step")
    for step in result.refreshed_at[1:]:
        entropy.axvline(step, color="orange", alpha=0.4)
    entropy.set(xlabel="step (orange: answers regenerated)", ylabel="mean prediction entropy (nats)")
    entropy.set_title("AdaMerging objective")
    entropy.legend(fontsize=8)
    coefficients = result.coefficients.numpy()
    if coefficients.shape[1] == 1:
        steps = torch.tensor(result.trajectory)[:, :, 0]
        for k, label in enumerate(result.labels):
            right.plot(range(steps.shape[0]), steps[:, k].numpy(), label=label)
        right.set(xlabel="step", ylabel="coefficient")
        right.legend(fontsize=8)
        right.set_title("task-wise coefficients")
    else:
        low, high = min(0.0, float(coefficients.min())), max(1.0, float(coefficients.max()))
        image = right.imshow(coefficients, aspect="auto", cmap="viridis", vmin=low, vmax=high)
        right.set_yticks(range(len(result.labels)), result.labels)
        blocks = [f"{b[0]}–{b[-1]}" if len(b) > 1 else (str(b[0]) if b else "—") for b in result.group_blocks]
        right.set_xticks(range(len(blocks)), blocks, rotation=90 if len(blocks) > 12 else 0, fontsize=8)
        right.set_xlabel("transformer block")
        if coefficients.size <= 64:
            for (k, g), c in numpy.ndenumerate(coefficients):
                right.text(g, k, f"{c:.2f}", ha="center", va="center", color="white", fontsize=8)
        figure.colorbar(image, ax=right, label="learned coefficient")
        right.set_title("layer-wise coefficients")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
