"""Simulated attackers (run config ``attack``, ``attackers``, ``attack-scale``): a testing feature.

A client whose partition id is listed in ``attackers`` misbehaves in one chosen way, so a researcher
can measure what a merge strategy withstands (``fedfuse bench robust``). Model attacks change the
task vector before it is sparsified and sent; ``label_flip`` poisons the training labels; and
``inflate_examples`` lies about the number of examples. Every other client is untouched.
"""

from __future__ import annotations

import dataclasses

import torch

from fedfuse.algebra.lora import LORA_A_SUFFIX
from fedfuse.settings.attack import AttackSettings
from fedfuse.training.client_data import ClientDatasets
from fedfuse.wire import MAX_NUM_EXAMPLES

MODEL_ATTACKS = ("sign_flip", "noise", "scale")
"""Attacks on the task vector (the others act on the data or the header)."""


def flipped_labels(data: ClientDatasets) -> ClientDatasets:
    """The training examples with every class label y replaced by L − 1 − y (evaluation data untouched)."""
    count = len(data.label_names)
    labels = data.train.labels
    flipped = torch.where(labels >= 0, count - 1 - labels, labels)
    return dataclasses.replace(data, train=dataclasses.replace(data.train, labels=flipped))


def attacked_tensors(
    tensors: dict[str, torch.Tensor], attack: AttackSettings, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The tensors an attacker sends instead of its true task vector (or LoRA factors).

    ``sign_flip`` sends −s·τ and ``scale`` s·τ (for LoRA, B and the head are scaled, so ΔW = s·B·A
    scales the same way); ``noise`` replaces each tensor by Gaussian noise of s times its norm.
    """
    scale = attack.attack_scale
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if attack.attack == "noise":
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(tensor.dtype)
            out[name] = noise * (scale * float(tensor.norm()) / max(1e-12, float(noise.norm())))
        elif name.endswith(LORA_A_SUFFIX):
            out[name] = tensor
        else:
            out[name] = tensor * (-scale if attack.attack == "sign_flip" else scale)
    return out


def reported_examples(num_examples: int, attack: AttackSettings) -> int:
    """What an ``inflate_examples`` attacker reports: s times its true number of examples."""
    if attack.attack != "inflate_examples":
        return num_examples
    return min(MAX_NUM_EXAMPLES, round(num_examples * attack.attack_scale))
