"""The causal-LM path: a tiny Llama built from a config, LoRA on its attention projections, through Flower."""

from __future__ import annotations

import pytest
import torch
from tiny_runs import TINY_RUN
from transformers import LlamaForCausalLM

from fedfuse.server.run_checkpoint import load_checkpoint
from fedfuse.simulation import simulate

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_llama(tiny_chat_llama_dir):
    return tiny_chat_llama_dir


def test_lora_on_attention_projections_of_a_local_causal_lm(tiny_llama, tmp_path):
    overrides = {
        "model": str(tiny_llama),
        "task": "lm",
        **{key: value for key, value in TINY_RUN.items() if key != "fraction-evaluate"},
        "num-server-rounds": 2,
        "local-steps": 3,
        "learning-rate": 1e-2,
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
