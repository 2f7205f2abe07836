"""What a coefficient vector is trained or scored on: labelled loss or prediction entropy, with its gradient.

Rows are tokenized once into :class:`Rows` (fixed-length ids, masks, and per-token targets for causal LMs
or class ids for classifiers). For a causal LM the scored positions are the answer's tokens (the assistant
turn of a chat): ``loss`` is their cross-entropy, ``entropy`` the entropy of the model's next-token
distribution at the same positions — the answer's tokens are never read, so unlabeled prompts work with any
continuation (AdaMerging on a causal LM uses the merged model's own greedy answers:
:func:`pseudo_answers`). For a classifier, ``loss`` is cross-entropy against the labels and ``entropy`` that
of the predicted class distribution. Values are means over scored positions (rows for classifiers).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fedfuse.automerge.coefficients import CoefficientModel
from fedfuse.training.tasks import IGNORE, encode_chats, ensure_pad_token

Objective = Literal["loss", "entropy"]
OBJECTIVES: tuple[Objective, ...] = ("loss", "entropy")


@dataclass(frozen=True)
class Rows:
    """Tokenized rows: ids and masks (N×T), and targets (N×T token ids, −100 where unscored; or N class ids)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    causal: bool

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batches(self, size: int) -> Iterator[Rows]:
        """Consecutive batches of at most ``size`` rows."""
        for start in range(0, len(self), size):
            end = start + size
            yield Rows(self.input_ids[start:end], self.attention_mask[start:end], self.targets[start:end], self.causal)

    @property
    def scored(self) -> int:
        """Scored positions (causal) or rows (classifier)."""
        return int((self.targets[:, 1:] != IGNORE).sum()) if self.causal else len(self)


def chat_rows(tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int = 128) -> Rows:
    """(prompt, answer) chats through the tokenizer's chat template; the answer's tokens are the scored ones."""
    ensure_pad_token(tokenizer)
    chats = [
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}] for prompt, answer in pairs
    ]
    ids, mask, targets = encode_chats(tokenizer, chats, max_length)
    if len(pairs) and int((targets != IGNORE).sum()) == 0:
        raise ValueError(f"max_length {max_length} cuts off every answer; raise it")
    return Rows(ids, mask, targets, causal=True)


def class_rows(tokenizer: Any, texts: Sequence[str], labels: Sequence[int], max_length: int = 128) -> Rows:
    """Texts for a sequence classifier, with their class ids."""
    encoded = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return Rows(encoded["input_ids"], encoded["attention_mask"], torch.tensor(list(labels)), causal=False)


def _summed(logits: torch.Tensor, rows: Rows, objective: Objective) -> torch.Tensor:
    """The objective summed over the batch's scored positions (or rows), in float32 at least."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if rows.causal:
        scored = rows.targets[:, 1:] != IGNORE
        logits = logits[:, :-1][scored]
        if objective == "loss":
            return torch.nn.functional.cross_entropy(logits, rows.targets[:, 1:][scored], reduction="sum")
    elif objective == "loss":
        return torch.nn.functional.cross_entropy(logits, rows.targets, reduction="sum")
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum()


def _check(objective: str) -> Objective:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    return objective


def value_and_gradient(
    model: CoefficientModel, coefficients: torch.Tensor, rows: Rows, objective: str, batch_size: int = 8
) -> tuple[float, torch.Tensor, int]:
    """The objective's mean over ``rows`` at ``coefficients``, its gradient (K×G), and the positions scored.

    Summed batch by batch (one backward each), so memory is one batch's graph whatever the number of rows.
    """
    chosen = _check(objective)
    c = model.candidates.check(coefficients).detach().clone().requires_grad_(True)
    total, count = 0.0, rows.scored
    if count == 0:
        raise ValueError("no scored position in these rows (empty, or every answer cut off)")
    for batch in rows.batches(batch_size):
        logits = model.forward(c, input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        summed = _summed(logits, batch, chosen)
        summed.backward()
        total += float(summed.detach())
    assert c.grad is not None
    return total / count, c.grad.detach() / count, count


@torch.no_grad()
def value(
    model: CoefficientModel, coefficients: torch.Tensor | None, rows: Rows, objective: str, batch_size: int = 8
) -> float:
    """The objective's mean over ``rows`` at ``coefficients`` (None: the base model), without a gradient."""
    model.load(coefficients)
    return loaded_value(model.model, rows, objective, batch_size)


@torch.no_grad()
def loaded_value(model: torch.nn.Module, rows: Rows, objective: str, batch_size: int = 8) -> float:
    """The objective's mean over ``rows`` for the model's weights as they are (a scorer's view)."""
    chosen = _check(objective)
    total = 0.0
    for batch in rows.batches(batch_size):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        total += float(_summed(logits, batch, chosen))
    return total / max(rows.scored, 1)


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy answers to ``prompts`` as single user turns (chat template, left padding, batched).

    The one decoding loop of exact-match scoring (the merge-quality benchmark's scorer can call it too).
    """
    ensure_pad_token(tokenizer)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chats = [[{"role": "user", "content": p}] for p in prompts[start : start + batch_size]]
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            device = next(model.parameters()).device
            generated = model.generate(  # type: ignore[operator]
                input_ids=encoded["input_ids"].to(device),
                attention_mask=encoded["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,  # training may have turned the config's cache off (gradient checkpointing)
            )
            width = encoded["input_ids"].shape[1]
            out.extend(tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return out


def pseudo_answers(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16
) -> list[tuple[str, str]]:
    """(prompt, the model's own greedy answer) pairs: unlabeled prompts made into rows for ``entropy``."""
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    return [(p, a.strip() or ".") for p, a in zip(prompts, answers, strict=True)]
