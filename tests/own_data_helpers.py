"""Small datasets and a tiny chat model for the own-data tests, built on the spot (nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

from tiny_models import save_tiny_llama

from fedfuse.models import load_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
"""A ChatML-like template for the MiniLM WordPiece tokenizer (which ships none)."""

SENTIMENT = {
    "positive": ["the staff were kind and quick", "a clean ward and friendly nurses", "great care, thank you"],
    "negative": ["the wait was far too long", "nobody answered the phone", "the room was cold and dirty"],
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def sentiment_rows(count: int, institutions: int = 2) -> list[dict]:
    """``count`` labelled sentences spread over ``institutions`` sites, deterministic."""
    rows = []
    for i in range(count):
        label = "positive" if i % 2 == 0 else "negative"
        text = SENTIMENT[label][i % 3] + f" (visit {i})"
        rows.append({"text": text, "label": label, "institution": f"site-{i % institutions}"})
    return rows


def chat_rows(count: int, institutions: int = 2) -> list[dict]:
    """Arithmetic questions answered in a fixed pattern, so a tiny model can learn them."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"what is {i} plus one"},
                {"role": "assistant", "content": f"it is {i + 1}"},
            ],
            "institution": f"site-{i % institutions}",
        }
        for i in range(count)
    ]


def tiny_chat_llama(folder: Path) -> Path:
    """A 2-layer Llama with the MiniLM tokenizer and :data:`CHAT_TEMPLATE`, saved to ``folder``."""
    tokenizer = load_tokenizer("default")
    tokenizer.chat_template = CHAT_TEMPLATE
    sizes = {"vocab_size": len(tokenizer), "max_position_embeddings": 128, "pad_token_id": tokenizer.pad_token_id}
    save_tiny_llama(folder, **sizes)
    tokenizer.save_pretrained(folder)
    return folder
