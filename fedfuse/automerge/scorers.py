"""What a coefficient search maximizes: a score of the model *as currently loaded* (higher is better).

A :class:`Scorer` reads its rows once and then scores whatever merge :class:`CoefficientModel` holds:

* ``loss:FILE`` — validation loss on a chat JSONL/CSV (``messages``, or ``prompt``/``response`` columns),
  on the answer's tokens; the score is −loss.
* ``exact-match:FILE`` — greedy answers to the same file's prompts, compared as the skill benchmark does
  (:func:`fedfuse.data.skills.is_correct`); the score is the fraction right.
* ``accuracy:FILE`` — a sequence classifier's accuracy on ``text``/``label`` columns (label names or ids).
* ``lm-eval:TASK`` — one lm-evaluation-harness task through ``fedfuse eval``'s harness, on the in-memory model.

Options follow the spec after commas: ``loss:val.jsonl,rows=64``, ``exact-match:val.jsonl,max_new_tokens=16``,
``accuracy:val.csv,text=sentence,label=y``, ``lm-eval:fedfuse_sort,metric=exact_match,data=DIR,limit=20``.
:func:`parse_scorer` checks a spec (and its file) with one-line :class:`MergeInputError`\\ s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fedfuse.automerge.coefficients import CoefficientModel
from fedfuse.automerge.objectives import Rows, chat_rows, class_rows, greedy_answers, loaded_value
from fedfuse.offline.errors import MergeInputError

KINDS = ("loss", "exact-match", "accuracy", "lm-eval")
"""The scorer kinds a spec names (``KIND:ARGUMENT[,option=value...]``)."""


class Scorer(Protocol):
    """Scores the merge a :class:`CoefficientModel` holds now; counts its evaluations."""

    name: str
    evaluations: int

    def score(self, cmodel: CoefficientModel) -> float:
        """The loaded model's score (higher is better)."""


# ---------------------------------------------------------------- decoding


# ---------------------------------------------------------------- scorers


@dataclass
class LossScorer:
    """−(mean cross-entropy of the answers' tokens) over fixed chat rows."""

    rows: Rows
    name: str = "loss"
    batch_size: int = 8
    evaluations: int = 0

    def score(self, cmodel: CoefficientModel) -> float:
        self.evaluations += 1
        return -loaded_value(cmodel.model, self.rows, "loss", self.batch_size)


@dataclass
class ExactMatchScorer:
    """The fraction of prompts whose greedy answer matches the reference (normalized as the skills compare)."""

    tokenizer: Any
    pairs: Sequence[tuple[str, str]]
    max_new_tokens: int = 32
    name: str = "exact-match"
    batch_size: int = 16
    evaluations: int = 0

    def score(self, cmodel: CoefficientModel) -> float:
        from fedfuse.data.skills import is_correct

        self.evaluations += 1
        prompts = [p for p, _ in self.pairs]
        answers = greedy_answers(cmodel.model, self.tokenizer, prompts, self.max_new_tokens, self.batch_size)
        right = sum(is_correct(g, a) for g, (_, a) in zip(answers, self.pairs, strict=True))
        return right / len(self.pairs)


@dataclass
class AccuracyScorer:
    """A classifier's accuracy (argmax of the logits) over fixed rows with class ids."""

    rows: Rows
    name: str = "accuracy"
    batch_size: int = 32
    evaluations: int = 0

    @torch.no_grad()
    def score(self, cmodel: CoefficientModel) -> float:
        self.evaluations += 1
        right = 0
        for batch in self.rows.batches(self.batch_size):
            logits = cmodel.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            right += int((logits.argmax(dim=-1) == batch.targets).sum())
        return right / max(len(self.rows), 1)


@dataclass
class LmEvalScorer:
    """One lm-eval task's metric on the in-memory model (lm-eval's ``HFLM`` wraps the same module)."""

    task: str
    tokenizer: Any
    metric: str | None = None
    data_dir: Path | None = None
    limit: int | None = None
    batch_size: int = 8
    name: str = "lm-eval"
    evaluations: int = 0
    _lm: Any = field(default=None, repr=False)
    _selection: Any = field(default=None, repr=False)

    def prepare(self, model: torch.nn.Module) -> None:
        """Resolve the task (a bad name or data folder is a one-line error) and wrap ``model`` for lm-eval."""
        from fedfuse.eval.harness import require_lm_eval
        from fedfuse.eval.tasks import EvalError, select

        try:
            require_lm_eval()
            self._selection = select([self.task], data_dir=self.data_dir)
        except EvalError as exc:
            raise MergeInputError(f"scorer lm-eval:{self.task}: {exc}") from None
        if self.tokenizer.eos_token_id is None:
            raise MergeInputError(f"scorer lm-eval:{self.task}: the tokenizer has no eos token, which generation needs")
        from lm_eval.models.huggingface import HFLM

        self._lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size)

    def score(self, cmodel: CoefficientModel) -> float:
        from fedfuse.eval.harness import evaluate

        if self._lm is None:
            self.prepare(cmodel.model)
        self.evaluations += 1
        device = str(next(cmodel.model.parameters()).device)
        report = evaluate(self._lm, self._selection, model="merge", device=device, limit=self.limit)
        return pick_metric(report.tasks, self.task, self.metric)


def pick_metric(tasks: Mapping[str, Mapping[str, Any]], task: str, metric: str | None) -> float:
    """``metric`` of ``task`` in an eval report (default: exact_match, acc or acc_norm, the first present)."""
    values = tasks.get(task) or (next(iter(tasks.values())) if len(tasks) == 1 else {})
    wanted = [metric] if metric else ["exact_match", "acc", "acc_norm"]
    for name in wanted:
        if isinstance(values.get(name), int | float):
            return float(values[name])
    numeric = sorted(k for k, v in values.items() if isinstance(v, int | float) and k != "samples")
    raise MergeInputError(f"scorer lm-eval:{task}: no metric {' / '.join(wanted)}; it reports {', '.join(numeric)}")


# ---------------------------------------------------------------- specs


@dataclass(frozen=True)
class ScorerSpec:
    """A parsed ``KIND:ARGUMENT[,option=value...]`` (checked; the file is read by :func:`build_scorer`)."""

    kind: str
    argument: str
    options: Mapping[str, str]

    def option(self, name: str, default: str | None = None) -> str | None:
        return self.options.get(name, default)

    def number(self, name: str, default: int | None) -> int | None:
        value = self.options.get(name)
        if value is None:
            return default
        if not value.isdigit() or int(value) < 1:
            raise MergeInputError(f"scorer {self.kind}: {name} must be a positive integer, got {value!r}")
        return int(value)


OPTIONS = {
    "loss": ("rows", "max_length", "batch_size", "messages", "prompt", "response"),
    "exact-match": ("rows", "max_new_tokens", "batch_size", "messages", "prompt", "response"),
    "accuracy": ("rows", "max_length", "batch_size", "text", "label"),
    "lm-eval": ("metric", "data", "limit", "batch_size"),
}


def parse_scorer(spec: str) -> ScorerSpec:
    """``KIND:ARGUMENT[,option=value...]`` checked: a known kind, known options, an existing file."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS or not rest:
        raise MergeInputError(
            f"scorer {spec!r}: expected KIND:FILE (or lm-eval:TASK) with KIND one of {', '.join(KINDS)}, "
            "e.g. loss:val.jsonl"
        )
    argument, *pairs = rest.split(",")
    options: dict[str, str] = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or name not in OPTIONS[kind]:
            raise MergeInputError(f"scorer {spec!r}: unknown option {pair!r} (options: {', '.join(OPTIONS[kind])})")
        options[name] = value
    if kind != "lm-eval" and not Path(argument).is_file():
        raise MergeInputError(f"scorer {spec!r}: no such file {argument}")
    if kind == "lm-eval" and "data" in options and not Path(options["data"]).is_dir():
        raise MergeInputError(f"scorer {spec!r}: data folder {options['data']} does not exist")
    return ScorerSpec(kind, argument, options)


def _read(spec: ScorerSpec) -> Any:
    from fedfuse.data.files import DataError, read_table

    try:
        table = read_table(spec.argument)
    except DataError as exc:
        raise MergeInputError(f"scorer {spec.kind}: {exc}") from None
    limit = spec.number("rows", None)
    return table.select(range(min(limit, len(table)))) if limit else table


def chat_pairs(spec: ScorerSpec) -> list[tuple[str, str]]:
    """(prompt, answer) of each row: the last user turn before the last assistant turn, and that turn."""
    from fedfuse.data.files import DataError, conversation, sft_columns

    table, source = _read(spec), spec.argument
    columns = {k: spec.option(k, k) or k for k in ("messages", "prompt", "response")}
    pairs = []
    try:
        sft_columns(table, **columns, source=source)
        for number, row in enumerate(table):
            turns = conversation(row, **columns, source=source, number=number)
            last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
            users = [t["content"] for t in turns[:last] if t["role"] == "user"]
            pairs.append((users[-1] if users else "", turns[last]["content"]))
    except DataError as exc:
        raise MergeInputError(f"scorer {spec.kind}: {exc}") from None
    if not pairs:
        raise MergeInputError(f"scorer {spec.kind}: {source} has no rows")
    return pairs


def class_table(spec: ScorerSpec, label_names: Sequence[str]) -> tuple[list[str], list[int]]:
    """Texts and class ids; labels are the model's label names or integer ids."""
    from fedfuse.data.files import DataError, require_columns

    table, source = _read(spec), spec.argument
    text, label = spec.option("text", "text") or "text", spec.option("label", "label") or "label"
    try:
        require_columns(table, [text, label], source=source, why="set text=/label= in the scorer spec")
    except DataError as exc:
        raise MergeInputError(f"scorer accuracy: {exc}") from None
    index = {name: i for i, name in enumerate(label_names)}
    ids = []
    for number, value in enumerate(table[label]):
        found = index.get(str(value))
        if found is None and str(value).isdigit() and int(value) < len(label_names):
            found = int(value)
        if found is None:
            raise MergeInputError(
                f"scorer accuracy: {source} row {number}: label {value!r} is neither a label name of the model "
                f"({', '.join(label_names)}) nor an id below {len(label_names)}"
            )
        ids.append(found)
    return [str(t) for t in table[text]], ids


def _label_names(model: torch.nn.Module) -> list[str]:
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label[i]) for i in sorted(id2label)] if id2label else [str(i) for i in range(2)]


def check_kind(spec: ScorerSpec, *, causal: bool) -> None:
    """Accuracy needs a sequence classifier, every other scorer a causal LM."""
    if (spec.kind == "accuracy") == causal:
        wants = "a sequence classifier" if spec.kind == "accuracy" else "a causal LM"
        raise MergeInputError(f"scorer {spec.kind} needs {wants} as the base")


def build_scorer(spec: ScorerSpec | str, model: torch.nn.Module, tokenizer: Any, *, causal: bool) -> Scorer:
    """The scorer a spec names, its rows read and tokenized once; checked against the model's kind."""
    parsed = parse_scorer(spec) if isinstance(spec, str) else spec
    check_kind(parsed, causal=causal)
    try:
        return _build(parsed, model, tokenizer)
    except ValueError as exc:  # a tokenization limit that cuts off every answer
        if isinstance(exc, MergeInputError):
            raise
        raise MergeInputError(f"scorer {parsed.kind}: {exc}") from None


def trimmed(rows: Rows) -> Rows:
    """``rows`` without the padding columns no row uses (rows are tokenized to a fixed length)."""
    used = int(rows.attention_mask.any(dim=0).nonzero().max()) + 1 if rows.attention_mask.any() else 1
    targets = rows.targets[:, :used] if rows.causal else rows.targets
    return Rows(rows.input_ids[:, :used], rows.attention_mask[:, :used], targets, rows.causal)


def _build(parsed: ScorerSpec, model: torch.nn.Module, tokenizer: Any) -> Scorer:
    batch = parsed.number("batch_size", None)
    if parsed.kind == "loss":
        rows = chat_rows(tokenizer, chat_pairs(parsed), parsed.number("max_length", 512) or 512)
        return LossScorer(trimmed(rows), batch_size=batch or 8)
    if parsed.kind == "exact-match":
        tokens = parsed.number("max_new_tokens", 32) or 32
        return ExactMatchScorer(tokenizer, chat_pairs(parsed), tokens, batch_size=batch or 16)
    if parsed.kind == "accuracy":
        texts, labels = class_table(parsed, _label_names(model))
        rows = class_rows(tokenizer, texts, labels, parsed.number("max_length", 128) or 128)
        return AccuracyScorer(trimmed(rows), batch_size=batch or 32)
    data = parsed.option("data")
    scorer = LmEvalScorer(
        parsed.argument,
        tokenizer,
        metric=parsed.option("metric"),
        data_dir=Path(data) if data else None,
        limit=parsed.number("limit", None),
        batch_size=batch or 8,
    )
    scorer.prepare(model)
    return scorer
