"""Prompt, target and exact-match metric of the fedfuse skill tasks (the YAMLs' ``!function`` entries).

lm-evaluation-harness imports this file by path from the folder of the YAML that names it. A row is
a chat record ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], ...}`` (the last
user turn is the prompt, the last assistant turn the answer) or a ``{"prompt", "response"}`` pair.
The metric is computed here, so nothing is fetched from the Hugging Face ``evaluate`` hub: a
generation counts when :func:`fedfuse.data.skills.is_correct` accepts it (first line, outer quotes,
a final period and case ignored), the same check the merge benchmark uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedfuse.data.skills import is_correct


def _turns(doc: Mapping[str, Any]) -> tuple[str, str]:
    messages = doc.get("messages")
    if isinstance(messages, Sequence) and messages:
        answer_at = max((i for i, message in enumerate(messages) if message.get("role") == "assistant"), default=None)
        if answer_at is not None:
            users = [m for m in messages[:answer_at] if m.get("role") == "user"]
            if users:
                return str(users[-1]["content"]), str(messages[answer_at]["content"])
    if "prompt" in doc and "response" in doc:
        return str(doc["prompt"]), str(doc["response"])
    raise ValueError(f"a row needs 'messages' with a user and an assistant turn, or 'prompt' and 'response': {doc!r}")


def doc_to_text(doc: Mapping[str, Any]) -> str:
    """The prompt: the last user turn before the last assistant turn (or ``prompt``)."""
    return _turns(doc)[0]


def doc_to_target(doc: Mapping[str, Any]) -> str:
    """The expected answer: the last assistant turn (or ``response``)."""
    return _turns(doc)[1]


def process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
    """``{"exact_match": 1.0}`` when the greedy generation matches the answer, else ``0.0``."""
    return {"exact_match": float(is_correct(results[0], doc_to_target(doc)))}
