"""Where and how a client trains: its device, mixed precision, gradient checkpointing and 4-bit QLoRA.

``client-device = "auto"`` trains on CUDA when torch sees a GPU; ``precision = "auto"`` is bf16
autocast on CUDA and full fp32 on CPU. ``quantization = "4bit"`` reloads the round's model with
bitsandbytes NF4 weights (QLoRA): the LoRA factors stay fp32 and are what the client sends, so the
task vector lives in LoRA space exactly as without quantization. It needs CUDA and the ``qlora`` extra.
"""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING, cast

import torch

from fedfuse.settings import RunSettings, SettingsError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

HEAD_MODULES = ["classifier", "score"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def client_device(settings: RunSettings) -> torch.device:
    """The device this client trains on; asking for CUDA where there is none is an error."""
    if settings.training.client_device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if settings.training.client_device == "cuda":
        raise SettingsError("client-device 'cuda' asks for a GPU, but torch sees no CUDA device on this client")
    return torch.device("cpu")


def autocast_dtype(settings: RunSettings, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for ``precision`` on ``device`` (None = fp32)."""
    if settings.training.precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if settings.training.precision == "fp16" and device.type != "cuda":
        raise SettingsError("precision 'fp16' needs a CUDA device; use bf16 or fp32 on CPU")
    return DTYPES[settings.training.precision]


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise SettingsError(f"gradient-checkpointing: {type(model).__name__} does not support it")
    pretrained = cast("PreTrainedModel", model)  # a transformers model; torch types its attributes as Tensor | Module
    pretrained.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pretrained.config.use_cache = False


def quantize_4bit(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The round's model reloaded with bitsandbytes NF4 weights on ``device`` (QLoRA); heads stay fp32."""
    if device.type != "cuda":
        raise SettingsError("quantization '4bit' needs a CUDA GPU (bitsandbytes 4-bit kernels); this client has none")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            BitsAndBytesConfig,
        )
    except ImportError:
        raise SettingsError("quantization '4bit' needs bitsandbytes: pip install 'fedfuse[qlora]'") from None
    from peft import prepare_model_for_kbit_training

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=HEAD_MODULES,
    )
    pretrained = cast("PreTrainedModel", model)
    architectures = pretrained.config.architectures
    loader = (
        AutoModelForCausalLM if architectures and "CausalLM" in architectures[0] else AutoModelForSequenceClassification
    )
    with tempfile.TemporaryDirectory(prefix="fedfuse-qlora-") as folder:
        pretrained.save_pretrained(folder)
        quantized = loader.from_pretrained(folder, quantization_config=config, device_map={"": device.index or 0})
    return prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False)
