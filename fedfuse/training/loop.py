"""Local training, evaluation and the diagonal Fisher, for classification and token-level tasks (lm, sft).

Training draws its batches from a generator seeded by (run seed, round, node), so a client's update
depends only on the round's weights and the settings: a resumed run repeats an uninterrupted one.
Batches move to the model's device; ``dtype`` turns on autocast (bf16/fp16 mixed precision).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fedfuse.training.federated_dataset import Tokenized


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed-precision autocast for ``dtype`` on ``device``, or nothing for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _loss(model: torch.nn.Module, batch: Tokenized, dtype: torch.dtype | None = None) -> torch.Tensor:
    device = model_device(model)
    batch = batch.to(device)
    with autocast(device, dtype):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    return out.loss.float()


def batches(data: Tokenized, batch_size: int, steps: int, seed: int) -> Iterator[Tokenized]:
    """``steps`` batches, epoch after epoch of a seeded shuffle (the last batch of an epoch may be short)."""
    rng = np.random.default_rng(seed)
    produced = 0
    while produced < steps:
        order = rng.permutation(len(data))
        for start in range(0, len(order), batch_size):
            if produced == steps:
                return
            yield data.rows(order[start : start + batch_size])
            produced += 1


def steps_for(num_examples: int, batch_size: int, local_steps: int, local_epochs: int) -> int:
    """Optimizer steps of one round: ``local_epochs`` passes if set, else ``local_steps``."""
    if local_epochs > 0:
        return local_epochs * math.ceil(num_examples / batch_size)
    return local_steps


def train(
    model: torch.nn.Module,
    data: Tokenized,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    dtype: torch.dtype | None = None,
) -> float:
    """AdamW on the trainable parameters for ``steps`` batches; returns the mean training loss."""
    if len(data) == 0:
        raise ValueError("no local training examples")
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    scaler = torch.amp.GradScaler(model_device(model).type, enabled=dtype == torch.float16)
    model.train()
    total = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % 2**63)
        for batch in batches(data, batch_size, steps, seed):
            loss = _loss(model, batch, dtype)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += float(loss.detach())
    model.eval()
    return total / max(steps, 1)


def right_trimmed(batch: Tokenized) -> Tokenized:
    """A right-padded token-level batch (lm, sft) without the trailing all-padding columns (same loss)."""
    mask = batch.attention_mask
    if batch.labels.ndim != 2 or mask.shape[1] < 2 or bool((mask[:, 1:] > mask[:, :-1]).any()):
        return batch
    width = max(int(mask.sum(dim=1).max()), 1)
    return Tokenized(batch.input_ids[:, :width], mask[:, :width], batch.labels[:, :width], batch.domains)


@dataclass(frozen=True)
class Evaluation:
    """Accuracy (classification: label; LM/SFT: next token), mean loss, and accuracy per domain name.

    The loss is the mean over examples for classification and the mean over labelled tokens for
    LM/SFT (for SFT: the assistant tokens only), so ``exp(loss)`` is the perplexity.
    """

    accuracy: float
    loss: float
    per_domain: dict[str, float]
    examples: int


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: Tokenized, domain_names: tuple[str, ...], batch_size: int = 128
) -> Evaluation:
    """Evaluate ``model`` on ``data`` in eval mode."""
    model.eval()
    device = model_device(model)
    correct_by_domain = np.zeros(len(domain_names))
    count_by_domain = np.zeros(len(domain_names))
    loss_sum = loss_count = 0.0
    for start in range(0, len(data), batch_size):
        batch = right_trimmed(data.rows(np.arange(start, min(start + batch_size, len(data)))))
        on_device = batch.to(device)
        out = model(input_ids=on_device.input_ids, attention_mask=on_device.attention_mask)
        logits = out.logits.float().cpu()
        if batch.labels.ndim == 1:
            correct = (logits.argmax(-1) == batch.labels).double()
            counted = torch.ones_like(correct)
            loss_sum += float(torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
            loss_count += len(batch)
        else:
            predicted = logits[:, :-1].argmax(-1)
            target = batch.labels[:, 1:]
            counted = (target != -100).double()
            correct = ((predicted == target).double() * counted).sum(-1)
            counted = counted.sum(-1)
            loss_sum += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
                )
            )
            loss_count += float(counted.sum())
        np.add.at(correct_by_domain, batch.domains, correct.numpy())
        np.add.at(count_by_domain, batch.domains, counted.numpy())
    seen = count_by_domain > 0
    per_domain = {
        name: float(correct_by_domain[i] / count_by_domain[i]) for i, name in enumerate(domain_names) if seen[i]
    }
    accuracy = float(correct_by_domain.sum() / max(count_by_domain.sum(), 1))
    return Evaluation(accuracy, loss_sum / max(loss_count, 1), per_domain, len(data))


def fisher_diagonal(
    model: torch.nn.Module, data: Tokenized, *, num_batches: int, batch_size: int, seed: int
) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher of the trainable parameters: mean over batches of (∂ mean loss / ∂θ)².

    The estimator squares the gradient of each batch's mean cross-entropy on the true labels
    (batch-level empirical Fisher): N backward passes instead of one per example. Only ratios of
    Fisher values matter to the Fisher merge, so its overall scale (1/batch size) does no harm.
    """
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}
    model.eval()
    seen = 0
    for batch in batches(data, batch_size, num_batches, seed):
        model.zero_grad(set_to_none=True)
        _loss(model, batch).backward()
        for name, parameter in parameters.items():
            if parameter.grad is not None:
                fisher[name].add_(parameter.grad.float().square())
        seen += 1
    model.zero_grad(set_to_none=True)
    return {name: value.div_(max(seen, 1)) for name, value in fisher.items()}
