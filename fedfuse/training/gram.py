"""Gram matrices XᵀX of the inputs of a model's linear layers, over local data (what RegMean merges with).

A forward pre-hook on each target layer adds XᵀX of the inputs it sees; padding positions are left
out (token-level inputs are masked by the batch's attention mask), so a Gram matrix counts real
tokens only. For a LoRA module the target is the PEFT layer, whose input is its base layer's: the
Gram matrix of the ΔW the server forms. Keys are the update's names (a LoRA module's A factor, or a
full weight), so the Gram matrices travel beside the tensors they weight.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import cast

import torch

from fedfuse.algebra import factor_names
from fedfuse.algebra.regmean import gram_of
from fedfuse.training.federated_dataset import Tokenized
from fedfuse.training.loop import batches, model_device, right_trimmed
from fedfuse.training.run_model import PEFT_PREFIX, lora_layers


def gram_targets(model: torch.nn.Module, update_names: Collection[str]) -> dict[str, torch.nn.Module]:
    """Update name → the layer whose inputs weight it: LoRA modules (by their A factor) and plain linears."""
    names = set(update_names)
    targets: dict[str, torch.nn.Module] = {}
    for module, layer in lora_layers(model).items():
        a_name = factor_names(module)[0]
        if a_name in names:
            targets[a_name] = cast(torch.nn.Module, layer)
    for name, module in model.named_modules():
        weight = name.removeprefix(PEFT_PREFIX) + ".weight"
        if isinstance(module, torch.nn.Linear) and weight in names:
            targets[weight] = module
    return targets


@torch.no_grad()
def gram_matrices(
    model: torch.nn.Module,
    data: Tokenized,
    targets: Mapping[str, torch.nn.Module],
    *,
    num_batches: int,
    batch_size: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Σ XᵀX (float32, on CPU) of each target layer's inputs over ``num_batches`` seeded batches of ``data``."""
    grams: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor] = []

    def recorder(name: str):
        def record(module: torch.nn.Module, args: tuple) -> None:
            inputs = args[0].detach().float()
            if mask and inputs.dim() == 3 and tuple(inputs.shape[:2]) == tuple(mask[0].shape):
                inputs = inputs[mask[0].bool()]
            gram = gram_of(inputs)
            grams[name] = gram if name not in grams else grams[name].add_(gram)

        return record

    handles = [layer.register_forward_pre_hook(recorder(name)) for name, layer in targets.items()]
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        for batch in batches(data, batch_size, num_batches, seed):
            on_device = right_trimmed(batch).to(device)
            mask[:] = [on_device.attention_mask]
            model(input_ids=on_device.input_ids, attention_mask=on_device.attention_mask)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: gram.cpu() for name, gram in grams.items()}
