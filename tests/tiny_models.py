"""The tiny Llama every test builds on the spot (nothing downloaded): one config, the sizes a test varies.

Defaults: 2 layers, hidden 32, MLP 64, 4 attention heads over 2 key/value heads, a 64-token vocabulary,
untied embeddings. A test passes only the sizes its claim is about (a narrower k/v projection, a third
layer, a tokenizer's vocabulary, …).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_LLAMA: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
"""The tiny Llama's sizes; every keyword of ``LlamaConfig`` may be overridden."""


def tiny_llama_config(**sizes: Any) -> LlamaConfig:
    """:data:`TINY_LLAMA` with ``sizes`` overriding it."""
    return LlamaConfig(**{**TINY_LLAMA, **sizes})


def tiny_llama(seed: int = 0, **sizes: Any) -> LlamaForCausalLM:
    """A tiny Llama with weights drawn after ``torch.manual_seed(seed)`` (the same model for the same seed)."""
    config = tiny_llama_config(**sizes)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_llama(folder: Path, seed: int = 0, **sizes: Any) -> Path:
    """Save :func:`tiny_llama` to ``folder`` (``save_pretrained``) and return the folder."""
    tiny_llama(seed, **sizes).save_pretrained(folder)
    return folder
