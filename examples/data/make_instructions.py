"""Generate the small instruction dataset ``instructions.jsonl`` (+ ``instructions-eval.jsonl``) for SFT examples.

Four institutions from distinct domains of the Python standard library (networking, email, concurrency,
text processing) each ask short questions about their own modules, classes and functions, answered
with the first sentence of the object's docstring:

    {"messages": [{"role": "user", "content": "In one sentence, what does `json.dumps` do?"},
                  {"role": "assistant", "content": "Serialize `obj` to a JSON formatted `str`."}],
     "institution": "markup"}

Everything comes from the running interpreter's standard library, *parsed* with :mod:`ast` (never
imported) through :func:`fedfuse.data.stdlib_topics.iter_stdlib_sources` and ``clean_docstring``,
so nothing is downloaded. The walk is sorted and every random choice comes from a seeded
:class:`random.Random`, so the same Python version writes the same bytes on every run. The shipped
files were written by Python :data:`GENERATED_WITH`.

Usage::

    python examples/data/make_instructions.py               # rewrites the two files next to this script
    python examples/data/make_instructions.py --out-dir DIR
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

from fedfuse.checkpoints import atomic_output
from fedfuse.data.stdlib_topics import clean_docstring, iter_stdlib_sources

GENERATED_WITH = "3.11"
"""Python major.minor that wrote the shipped files (other versions have other docstrings)."""

INSTITUTIONS: tuple[str, ...] = ("networking", "email", "concurrency", "text_processing")
"""The institutions, one standard-library domain each (see ``fedfuse.data.stdlib_topics.DOMAIN_MODULES``)."""

TRAIN_PER_INSTITUTION = 100
EVAL_PER_INSTITUTION = 15
SEED = 0
MAX_ANSWER_WORDS = 24
"""Answers longer than this (or than :data:`MAX_ANSWER_CHARS`) are dropped: at most ~40 SmolLM2 tokens."""
MAX_ANSWER_CHARS = 150
MIN_ANSWER_WORDS = 4

SKIPPED_PREFIXES: tuple[str, ...] = ("encodings.",)
"""Generated modules with boilerplate docstrings (the ~100 character-map codecs)."""

TRAIN_FILE = "instructions.jsonl"
EVAL_FILE = "instructions-eval.jsonl"

QUESTIONS: dict[str, tuple[str, ...]] = {
    "module": (
        "In one sentence, what is the `{name}` module for?",
        "What does the Python module `{name}` provide? Answer in one sentence.",
        "Briefly, what is `{name}` in the standard library?",
    ),
    "class": (
        "In one sentence, what is `{name}`?",
        "What is the class `{name}` for? Answer in one sentence.",
        "Briefly describe `{name}`.",
    ),
    "attribute": (
        "In one sentence, what is the attribute `{name}`?",
        "What does `{name}` hold? Answer in one sentence.",
    ),
    "function": (
        "In one sentence, what does `{name}` do?",
        "What does the function `{name}` do? Answer in one sentence.",
        "Briefly, what is `{name}` for?",
    ),
}

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`(\"'])")
_DOUBLE_BACKTICKS = re.compile(r"``([^`]+)``")
_SPHINX_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def first_sentence(doc: str) -> str | None:
    """The first sentence of the docstring's first paragraph, tidied (reST roles and ````x```` become ```x```).

    None if it is unusable as a short answer (too short or long, cut off, unbalanced quotes).
    """
    paragraph = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    text = clean_docstring(paragraph, max_chars=400, target_chars=400)
    text = _SPHINX_ROLE.sub(r"`\1`", _DOUBLE_BACKTICKS.sub(r"`\1`", text))
    sentence = _SENTENCE_END.split(text, maxsplit=1)[0].strip()
    if not sentence or not sentence[0].isupper() or sentence.endswith((":", ",", ";")):
        return None
    if not sentence.endswith((".", "!", "?")):
        sentence += "."
    words = len(sentence.split())
    if not MIN_ANSWER_WORDS <= words <= MAX_ANSWER_WORDS or len(sentence) > MAX_ANSWER_CHARS:
        return None
    if sentence.count("`") % 2 or sentence.count("(") != sentence.count(")") or ": -" in sentence:
        return None
    return sentence


def _public(name: str) -> bool:
    return not name.startswith("_")


def _is_property(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(
        (isinstance(d, ast.Name) and d.id in {"property", "cached_property"})
        or (isinstance(d, ast.Attribute) and d.attr in {"setter", "getter", "cached_property"})
        for d in node.decorator_list
    )


def iter_documented(module: str, tree: ast.Module) -> Iterator[tuple[str, str, str]]:
    """(kind, qualified name, docstring) of the module and its public top-level classes, functions and methods."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield "module", module, doc
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(node.name):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield "function", f"{module}.{node.name}", doc
        elif isinstance(node, ast.ClassDef) and _public(node.name):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield "class", f"{module}.{node.name}", doc
            for member in node.body:
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(member.name):
                    doc = ast.get_docstring(member, clean=True)
                    if doc:
                        kind = "attribute" if _is_property(member) else "function"
                        yield kind, f"{module}.{node.name}.{member.name}", doc


def candidates() -> dict[str, list[tuple[str, str, str]]]:
    """Institution → (kind, qualified name, answer) for every usable object, in walk order.

    Private modules and names and :data:`SKIPPED_PREFIXES` are skipped, and so is any answer already given for another object
    (overrides repeat their base's docstring), so questions and answers are unique across institutions.
    """
    found: dict[str, list[tuple[str, str, str]]] = {name: [] for name in INSTITUTIONS}
    seen_answers: set[str] = set()
    for module, domain, path in iter_stdlib_sources():
        if domain not in found or not all(_public(part) for part in module.split(".")):
            continue
        if module.startswith(SKIPPED_PREFIXES):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue
        for kind, name, doc in iter_documented(module, tree):
            answer = first_sentence(doc)
            if answer is None or answer.lower() in seen_answers:
                continue
            seen_answers.add(answer.lower())
            found[domain].append((kind, name, answer))
    return found


def _row(kind: str, name: str, answer: str, institution: str, rng: random.Random) -> dict[str, object]:
    question = rng.choice(QUESTIONS[kind]).format(name=name)
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "institution": institution,
    }


def build_rows(seed: int = SEED) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """(train rows, eval rows): per institution a seeded shuffle, the first rows held out for evaluation."""
    train: list[dict[str, object]] = []
    held_out: list[dict[str, object]] = []
    for institution, items in candidates().items():
        rng = random.Random(f"{seed}:{institution}")
        order = sorted(items, key=lambda item: item[1])
        rng.shuffle(order)
        for index, (kind, name, answer) in enumerate(order[: EVAL_PER_INSTITUTION + TRAIN_PER_INSTITUTION]):
            target = held_out if index < EVAL_PER_INSTITUTION else train
            target.append(_row(kind, name, answer, institution, rng))
    return train, held_out


def _jsonl(rows: list[dict[str, object]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write(out_dir: str | Path, seed: int = SEED) -> tuple[Path, Path]:
    """Write ``instructions.jsonl`` and ``instructions-eval.jsonl`` into ``out_dir``; returns their paths."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    train, held_out = build_rows(seed)
    paths = (folder / TRAIN_FILE, folder / EVAL_FILE)
    for path, rows in zip(paths, (train, held_out)):
        with atomic_output(path, directory=False, overwrite=True) as temp:
            temp.write_text(_jsonl(rows), encoding="utf-8")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    for path in write(args.out_dir, args.seed):
        rows = path.read_text(encoding="utf-8").count("\n")
        print(f"wrote {path} ({rows} rows, {path.stat().st_size / 1000:.0f} kB)")


if __name__ == "__main__":
    main()
