"""Small, exactly-checkable chat skills for merge benchmarks: one LoRA expert per skill, then merge.

Each skill is a deterministic, standard-library-only generator of (prompt, short answer) pairs —
two-digit addition, sorting three numbers, repeating a word with hyphens, the initials of a
phrase, a phrase in snake_case. Answers are checked by exact match after :func:`normalize_answer`,
so a merged model either keeps a skill or it does not; no judge model, no download.

Splits are disjoint by prompt: a prompt's split is read from its SHA-256 (70 % train, 15 %
validation, 15 % test), so no prompt is ever in two splits, whatever the counts asked for.
Records are chat rows in the format of ``examples/data/instructions.jsonl``::

    {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "skill": NAME, "institution": NAME}

:func:`write_skill_files` writes ``<dir>/<skill>-{train,validation,test}.jsonl`` (the names the
lm-evaluation-harness task files point at); :func:`write_institution_dir` writes one training file
per skill into a folder, the ``data-dir`` form of ``fedfuse simulate`` (one institution per skill).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""The three splits, disjoint by prompt."""
_SPLIT_EDGES = (0.70, 0.85)

# fmt: off
WORDS: tuple[str, ...] = (
    "apple", "river", "stone", "cloud", "tiger", "green", "window", "silver", "garden", "candle",
    "forest", "orange", "pencil", "rocket", "yellow", "dragon", "winter", "basket", "mirror", "planet",
    "bridge", "castle", "danger", "engine", "flower", "guitar", "hammer", "island", "jacket", "kitten",
    "ladder", "marble", "needle", "ocean", "pepper", "quiet", "rabbit", "saddle", "tunnel", "umbrella",
    "valley", "wagon", "anchor", "button", "cotton", "desert", "feather", "ginger", "harbor", "insect",
    "jungle", "kettle", "lemon", "meadow", "nickel", "oyster", "parrot", "quartz", "ribbon", "shadow",
    "ticket", "violet", "walnut", "zipper", "bottle", "copper", "dinner", "falcon", "goblet", "helmet",
    "iron", "jelly", "knight", "lantern", "magnet", "napkin", "orbit", "pillow", "raven", "sugar",
    "table", "velvet", "wizard", "yogurt", "breeze", "cactus", "dolphin", "emerald", "fossil", "glacier",
    "horizon", "lizard", "monkey", "noodle", "pirate", "saturn", "thunder", "voyage", "whisper", "zebra",
)
"""Plain English words the string skills draw from (single tokens or two for most tokenizers)."""
# fmt: on


@dataclass(frozen=True)
class Skill:
    """One skill: a name, a line of help, its generator and how long its answers can be.

    ``sample(rng)`` draws one (prompt, answer) pair; ``max_new_tokens`` bounds greedy decoding.
    """

    name: str
    help: str
    sample: Callable[[random.Random], tuple[str, str]]
    max_new_tokens: int


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}? Answer with the number only.", str(a + b)


def _sort(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), 3)
    listed = ", ".join(map(str, numbers))
    return (
        f"Sort these numbers in ascending order: {listed}. Answer with the sorted list only.",
        ", ".join(map(str, sorted(numbers))),
    )


_JOINERS = {"hyphens": "-", "underscores": "_", "plus signs": "+"}


def _repeat(rng: random.Random) -> tuple[str, str]:
    word, times, joiner = rng.choice(WORDS), rng.randint(2, 4), rng.choice(sorted(_JOINERS))
    return (
        f"Repeat the word {word} {times} times, joined by {joiner}. Answer with the result only.",
        _JOINERS[joiner].join([word] * times),
    )


def _initials(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 4))
    return (
        f'Write the initials of "{" ".join(words)}" as capital letters. Answer with the letters only.',
        "".join(word[0].upper() for word in words),
    )


def _snake_case(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 3))
    title = " ".join(word.capitalize() for word in words)
    return f'Convert "{title}" to snake_case. Answer with the result only.', "_".join(words)


SKILLS: dict[str, Skill] = {
    skill.name: skill
    for skill in (
        Skill("arithmetic", "two-digit addition, the sum as a number", _arithmetic, 6),
        Skill("sort", "three numbers in ascending order, comma-separated", _sort, 12),
        Skill("repeat", "a word repeated 2–4 times, joined by hyphens, underscores or plus signs", _repeat, 16),
        Skill("initials", "the initials of a 3–4 word phrase, in capitals", _initials, 6),
        Skill("snake_case", "a Title Case phrase in snake_case", _snake_case, 12),
    )
}
"""Every skill by name."""
DEFAULT_SKILLS: tuple[str, ...] = ("arithmetic", "sort", "repeat", "initials")
"""The skills the merge benchmark uses unless told otherwise."""


def skill(name: str) -> Skill:
    """The skill called ``name``; a ``ValueError`` listing the skills when there is none."""
    if name not in SKILLS:
        raise ValueError(f"unknown skill {name!r}; choose from {', '.join(SKILLS)}")
    return SKILLS[name]


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, read from its SHA-256 (so splits never share a prompt)."""
    fraction = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") / 2**64
    if fraction < _SPLIT_EDGES[0]:
        return "train"
    return "validation" if fraction < _SPLIT_EDGES[1] else "test"


def examples(name: str, split: str, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` distinct (prompt, answer) pairs of skill ``name`` in ``split``, the same on every call.

    Raises ``ValueError`` for an unknown skill or split, or when the skill has too few distinct
    prompts in that split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    generator = skill(name).sample
    rng = random.Random(f"fedfuse-skill|{name}|{seed}")
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for _ in range(200 * count + 1000):
        if len(out) == count:
            return out
        prompt, answer = generator(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        if split_of(prompt) == split:
            out.append((prompt, answer))
    if len(out) == count:
        return out
    raise ValueError(f"skill {name!r} has only {len(out)} distinct {split} prompts, {count} were asked for")


def chat_record(name: str, prompt: str, answer: str) -> dict[str, object]:
    """One chat row: the user prompt, the assistant answer, and the skill (also as its institution)."""
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        "skill": name,
        "institution": name,
    }


def records(name: str, split: str, count: int, seed: int = 0) -> list[dict[str, object]]:
    """:func:`examples` as chat rows."""
    return [chat_record(name, prompt, answer) for prompt, answer in examples(name, split, count, seed)]


def _write_jsonl(path: Path, rows: Sequence[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def skill_file(folder: str | Path, name: str, split: str) -> Path:
    """Where :func:`write_skill_files` puts skill ``name``'s ``split``: ``<folder>/<name>-<split>.jsonl``."""
    return Path(folder) / f"{name}-{split}.jsonl"


def write_skill_files(
    folder: str | Path,
    names: Sequence[str] = DEFAULT_SKILLS,
    *,
    counts: dict[str, int] | None = None,
    seed: int = 0,
) -> dict[str, dict[str, Path]]:
    """Write ``<folder>/<skill>-{train,validation,test}.jsonl`` for every skill; returns skill → split → path.

    ``counts`` gives the rows per split (default 256 train, 48 validation, 64 test).
    """
    sizes = {"train": 256, "validation": 48, "test": 64, **(counts or {})}
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    return {
        name: {
            split: _write_jsonl(skill_file(out, name, split), records(name, split, sizes[split], seed))
            for split in SPLITS
        }
        for name in names
    }


def write_institution_dir(
    folder: str | Path, names: Sequence[str] = DEFAULT_SKILLS, *, count: int = 256, seed: int = 0
) -> list[Path]:
    """One training file per skill, ``<folder>/<skill>.jsonl``: the ``data-dir`` of ``fedfuse simulate``.

    Files sort by name, so with ``data-dir`` client *i* trains on the *i*-th skill in sorted order.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    return [_write_jsonl(out / f"{name}.jsonl", records(name, "train", count, seed)) for name in sorted(names)]


_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """A generated answer as compared: its first line without outer quotes or a final period, spaces collapsed,
    casefolded (so "The answer." and "the answer" match, "85" and "85." too)."""
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    first = first.strip().strip("\"'`").strip()
    first = first.removesuffix(".").strip()
    return _SPACES.sub(" ", first).casefold()


def is_correct(generated: str, answer: str) -> bool:
    """Exact match of the normalized generation and the normalized answer."""
    return normalize_answer(generated) == normalize_answer(answer)
