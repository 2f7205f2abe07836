"""Writes the two institutions' synthetic triage notes used by tests/test_deployment.py (deterministic).

Each hospital gets its own file, size, label mix and phrasing, so a node's data fingerprint, row count and
label set tell which file it trained on. The notes are made up from templates: no real patient data.

    python tests/data/deploy/generate.py      # rewrites hospital-a.jsonl (48 rows) and hospital-b.jsonl (64 rows)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
LABELS = ("cardiac", "respiratory", "musculoskeletal")
FINDINGS = {
    "cardiac": (
        "chest pain radiating to the left arm",
        "palpitations at rest",
        "an irregular pulse",
        "ankle swelling and breathlessness lying flat",
        "pressure behind the sternum on exertion",
        "a new heart murmur",
        "fainting after climbing stairs",
        "racing heartbeat with sweating",
    ),
    "respiratory": (
        "a productive cough for two weeks",
        "wheezing at night",
        "shortness of breath on mild effort",
        "fever with crackles at the lung base",
        "coughing up blood-streaked sputum",
        "low oxygen saturation on room air",
        "a sore throat and hoarse voice",
        "tight chest after a cold",
    ),
    "musculoskeletal": (
        "lower back pain after lifting",
        "a swollen knee after a fall",
        "stiff shoulder for months",
        "wrist pain after a sports injury",
        "hip pain when walking",
        "a sprained ankle",
        "neck pain with limited rotation",
        "painful swollen finger joints in the morning",
    ),
}
STYLES = {
    "hospital-a": (
        "Patient presents with {f}.",
        "Referred for {f}.",
        "{a}-year-old reports {f}.",
        "Seen in clinic today with {f}.",
    ),
    "hospital-b": (
        "Pt c/o {f}, onset {d} days ago.",
        "ED triage: {f}.",
        "Walk-in, {a} y/o, {f}.",
        "Follow-up call: still {f}.",
    ),
}
MIX = {"hospital-a": (0.5, 0.3, 0.2), "hospital-b": (0.2, 0.3, 0.5)}  # non-IID: different label shares
ROWS = {"hospital-a": 48, "hospital-b": 64}


def notes(institution: str, seed: int) -> list[dict[str, str]]:
    """``ROWS[institution]`` distinct notes as {"text", "label"} rows, drawn with ``random.Random(seed)``."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < ROWS[institution]:
        label = rng.choices(LABELS, weights=MIX[institution])[0]
        text = rng.choice(STYLES[institution]).format(
            f=rng.choice(FINDINGS[label]), a=rng.randint(18, 90), d=rng.randint(1, 14)
        )
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    return rows


def main() -> None:
    for seed, institution in enumerate(ROWS):
        path = HERE / f"{institution}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in notes(institution, seed)))


if __name__ == "__main__":
    main()
