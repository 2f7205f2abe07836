"""The causal-LM path: a tiny Llama built from a config, LoRA on its attention projections, through Flower."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedfuse.models import load_tokenizer
from fedfuse.server.checkpoint import load_checkpoint
from fedfuse.simulation import simulate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_tokenizer("default")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_lora_on_attention_projections_of_a_local_causal_lm(tiny_llama, tmp_path):
    overrides = {
        "model": str(tiny_llama), "task": "lm", "num-server-rounds": 2, "local-steps": 3, "batch-size": 8,
        "max-length": 16, "lora-rank": 2, "eval-examples": 32, "client-eval-examples": 8, "learning-rate": 1e-2,
        "output-dir": str(tmp_path),
    }
    history = simulate(overrides, num_clients=2)
    assert [r["accepted"] for r in history["rounds"]] == [2, 2]
    assert history["rounds"][-1]["loss"] < history["initial"]["loss"]
    base = LlamaForCausalLM.from_pretrained(tiny_llama).state_dict()
    weights = load_checkpoint(tmp_path).weights
    changed = sorted(name for name, tensor in weights.items() if not torch.equal(tensor, base[name]))
    assert changed and all(name.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj"} for name in changed)
    assert {name.split(".")[-2] for name in changed} == {"q_proj", "k_proj", "v_proj", "o_proj"}
