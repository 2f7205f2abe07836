"""Rows of a user's dataset → fixed-length token tensors for the run's task (classify, lm, sft).

``sft`` renders each conversation with the tokenizer's chat template and keeps labels only on the
assistant turns: the character span of every assistant turn is found by rendering the conversation
up to that turn with and without it, and tokens whose offsets fall inside a span keep their id as
label; every other token (system, user, template markup, padding) is -100 and carries no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedfuse.data.files import (
    DataError,
    conversation,
    label_ids,
    require_columns,
    sft_columns,
)
from fedfuse.settings import RunSettings
from fedfuse.training.federated_dataset import Tokenized

if TYPE_CHECKING:
    import datasets

IGNORE = -100


def ensure_pad_token(tokenizer: Any) -> None:
    """Give a tokenizer without a pad token its eos (or unk) token as pad."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token


def tokenize_rows(
    rows: datasets.Dataset,
    tokenizer: Any,
    settings: RunSettings,
    *,
    label_names: Sequence[str],
    source: str,
) -> Tokenized:
    """Tokenize ``rows`` for ``settings.source.task``; ``source`` names the file in error messages."""
    ensure_pad_token(tokenizer)
    domains = np.zeros(len(rows), dtype=np.int64)
    if settings.source.task == "sft":
        return _tokenize_chats(rows, tokenizer, settings, source, domains)
    require_columns(rows, [settings.source.text_column], source=source, why="the text column; set text-column")
    texts = [str(text) for text in rows[settings.source.text_column]]
    encoded = tokenizer(
        texts, padding="max_length", truncation=True, max_length=settings.source.sequence_length, return_tensors="pt"
    )
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    if settings.source.task == "lm":
        return Tokenized(ids, mask, ids.masked_fill(mask == 0, IGNORE), domains)
    require_columns(rows, [settings.source.label_column], source=source, why="the label column; set label-column")
    labels = label_ids(
        rows[settings.source.label_column], label_names, source=source, column=settings.source.label_column
    )
    return Tokenized(ids, mask, torch.tensor(labels, dtype=torch.long), domains)


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt))


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (content + end marker)."""
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:turn], generation_prompt=True) if turn else ""
        through = _render(tokenizer, messages[: turn + 1], generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError("the tokenizer's chat template does not render conversations prefix by prefix")
        spans.append((len(before), len(through)))
    return text, spans


def encode_chats(
    tokenizer: Any, conversations: Sequence[list[dict[str, str]]], length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chats through the chat template at a fixed ``length``: ids, attention mask, and the assistant turns'
    token ids as labels (−100 elsewhere, so only the answers are learned or scored)."""
    ids = torch.full((len(conversations), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(conversations), length), dtype=torch.long)
    labels = torch.full((len(conversations), length), IGNORE, dtype=torch.long)
    for number, messages in enumerate(conversations):
        text, spans = assistant_spans(tokenizer, messages)
        encoded = tokenizer(
            text, add_special_tokens=False, truncation=True, max_length=length, return_offsets_mapping=True
        )
        n = len(encoded["input_ids"])
        ids[number, :n] = torch.tensor(encoded["input_ids"])
        mask[number, :n] = 1
        for position, (start, _) in enumerate(encoded["offset_mapping"]):
            if any(lo <= start < hi for lo, hi in spans):
                labels[number, position] = encoded["input_ids"][position]
    return ids, mask, labels


def _tokenize_chats(
    rows: datasets.Dataset, tokenizer: Any, settings: RunSettings, source: str, domains: np.ndarray
) -> Tokenized:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "task 'sft' renders chats with the tokenizer's chat template, "
            f"and the model {settings.source.model!r} has none"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"task 'sft' needs a fast tokenizer (character offsets); {settings.source.model!r} has a slow one"
        )
    sft_columns(
        rows,
        messages=settings.source.messages_column,
        prompt=settings.source.prompt_column,
        response=settings.source.response_column,
        source=source,
    )
    length = settings.source.sequence_length
    conversations = [
        conversation(
            row,
            messages=settings.source.messages_column,
            prompt=settings.source.prompt_column,
            response=settings.source.response_column,
            source=source,
            number=number,
        )
        for number, row in enumerate(rows)
    ]
    ids, mask, labels = encode_chats(tokenizer, conversations, length)
    if len(rows) and int((labels != IGNORE).any(dim=1).sum()) == 0:
        raise DataError(f"{source}: max-length {length} cuts off every assistant answer; raise max-length")
    return Tokenized(ids, mask, labels, domains)
