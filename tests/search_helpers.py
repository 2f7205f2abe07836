"""A tiny chat Llama's base with two candidates whose right weights are known (coefficient-search tests).

``good`` is the base after a few Adam steps on the validation chats, on the q/v/down projections (its task
vector lowers the validation loss); ``noise`` is a random task vector on the same tensors, twice the norm of
``good``'s per tensor (it raises the loss).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PAIRS = [(f"Say the word number {i}.", f"word {i}") for i in range(8)]
TARGETS = ("q_proj.weight", "v_proj.weight", "down_proj.weight")


def write_chats(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """Chat JSONL rows (``messages``) of (prompt, answer) pairs."""
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]} for p, a in pairs]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def good_and_noise(base_dir: Path, root: Path) -> dict[str, Path]:
    """``base``, ``good``, ``noise`` folders and the validation chats ``val`` under ``root``."""
    from fedfuse.automerge.objectives import chat_rows
    from fedfuse.models.loading import load_causal_lm, load_tokenizer

    val = write_chats(root / "val.jsonl", PAIRS)
    tokenizer = load_tokenizer(base_dir)
    rows = chat_rows(tokenizer, PAIRS, 48)
    model = load_causal_lm(base_dir, dtype=torch.float32)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = [p for n, p in model.named_parameters() if n.endswith(TARGETS)]
    for p in model.parameters():
        p.requires_grad_(any(p is t for t in tuned))
    optimizer = torch.optim.Adam(tuned, lr=3e-3)
    for _ in range(15):
        optimizer.zero_grad()
        model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, labels=rows.targets).loss.backward()
        optimizer.step()
    model.save_pretrained(root / "good")
    tokenizer.save_pretrained(root / "good")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            delta = p - base[name]
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(base[name] + (noise * 2 * delta.norm() / noise.norm() if name.endswith(TARGETS) else 0))
    model.save_pretrained(root / "noise")
    return {"base": base_dir, "good": root / "good", "noise": root / "noise", "val": val}
