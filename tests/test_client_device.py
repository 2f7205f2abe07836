"""GPU clients without a GPU: device choice, mixed precision, gradient checkpointing and QLoRA's refusals on CPU.

CI has no GPU, so these pin the CPU behaviour and the errors; CUDA paths are exercised on a lent GPU only.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_llama
from transformers import LlamaForCausalLM

from fedfuse.settings import RunSettings, SettingsError
from fedfuse.training.device import (
    autocast_dtype,
    client_device,
    enable_gradient_checkpointing,
    quantize_4bit,
)
from fedfuse.training.federated_dataset import Tokenized
from fedfuse.training.loop import train

pytestmark = pytest.mark.unit

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


@needs_no_gpu
def test_auto_device_and_precision_are_cpu_and_fp32_without_cuda():
    settings = RunSettings()
    device = client_device(settings)
    assert device.type == "cpu" and autocast_dtype(settings, device) is None
    assert autocast_dtype(settings.replace(precision="bf16"), device) is torch.bfloat16


@needs_no_gpu
def test_asking_for_cuda_or_fp16_or_4bit_without_a_gpu_is_a_clear_error():
    with pytest.raises(SettingsError, match="client-device 'cuda' asks for a GPU, but torch sees no CUDA device"):
        client_device(RunSettings.from_run_config(client_device="cuda"))
    with pytest.raises(SettingsError, match="precision 'fp16' needs a CUDA device"):
        autocast_dtype(RunSettings.from_run_config(precision="fp16"), torch.device("cpu"))
    with pytest.raises(SettingsError, match="quantization '4bit' needs a CUDA GPU"):
        quantize_4bit(torch.nn.Linear(2, 2), torch.device("cpu"))


def test_4bit_quantization_is_lora_only():
    with pytest.raises(SettingsError, match="quantization '4bit' \\(QLoRA\\) needs mode 'lora'"):
        RunSettings.from_run_config(quantization="4bit", mode="full")


def _tiny_llama() -> LlamaForCausalLM:
    sizes = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}
    return tiny_llama(**sizes, max_position_embeddings=32)


def _tokens() -> Tokenized:
    ids = torch.randint(1, 64, (8, 12), generator=torch.Generator().manual_seed(1))
    return Tokenized(ids, torch.ones_like(ids), ids.clone(), torch.zeros(8, dtype=torch.long).numpy())


def test_gradient_checkpointing_changes_memory_not_the_update():
    plain, checkpointed = _tiny_llama(), _tiny_llama()
    enable_gradient_checkpointing(checkpointed)
    assert checkpointed.is_activation_checkpointing
    for model in (plain, checkpointed):
        train(model, _tokens(), steps=3, batch_size=4, learning_rate=1e-2, seed=5)
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=False):
        assert torch.allclose(a, b, atol=1e-6), name


def test_bf16_autocast_trains_on_cpu_and_keeps_fp32_weights():
    model = _tiny_llama()
    loss = train(model, _tokens(), steps=2, batch_size=4, learning_rate=1e-2, seed=5, dtype=torch.bfloat16)
    assert math.isfinite(loss) and all(p.dtype == torch.float32 for p in model.parameters())


def test_trimming_padding_columns_leaves_the_token_loss_unchanged():
    from fedfuse.training.loop import evaluate, right_trimmed

    model = _tiny_llama().eval()
    tokens = _tokens()
    padded = Tokenized(
        torch.cat([tokens.input_ids, torch.zeros(8, 6, dtype=torch.long)], 1),
        torch.cat([tokens.attention_mask, torch.zeros(8, 6, dtype=torch.long)], 1),
        torch.cat([tokens.labels, torch.full((8, 6), -100)], 1),
        tokens.domains,
    )
    assert right_trimmed(padded).input_ids.shape == (8, 12)
    with torch.no_grad():
        logits = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask).logits
    untrimmed = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), padded.labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert evaluate(model, padded, ("all",)).loss == pytest.approx(float(untrimmed), rel=1e-5)
