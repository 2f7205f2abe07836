"""Local training, evaluation and the diagonal Fisher, for classification ("topics") and causal LM ("lm").

Training draws its batches from a generator seeded by (run seed, round, node), so a client's update
depends only on the round's weights and the settings: a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fedfuse.training.data import Tokenized


def _loss(model: torch.nn.Module, batch: Tokenized) -> torch.Tensor:
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    return out.loss


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
    model: torch.nn.Module, data: Tokenized, *, steps: int, batch_size: int, learning_rate: float, seed: int
) -> float:
    """AdamW on the trainable parameters for ``steps`` batches; returns the mean training loss."""
    if len(data) == 0:
        raise ValueError("no local training examples")
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    model.train()
    total = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % 2**63)
        for batch in batches(data, batch_size, steps, seed):
            loss = _loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
    model.eval()
    return total / max(steps, 1)


@dataclass(frozen=True)
class Evaluation:
    """Accuracy (classification: label; LM: next token), mean loss, and accuracy per domain name."""

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
    correct_by_domain = np.zeros(len(domain_names))
    count_by_domain = np.zeros(len(domain_names))
    loss_sum = 0.0
    for start in range(0, len(data), batch_size):
        batch = data.rows(np.arange(start, min(start + batch_size, len(data))))
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
        if batch.labels.ndim == 1:
            correct = (out.logits.argmax(-1) == batch.labels).double()
            counted = torch.ones_like(correct)
        else:
            predicted = out.logits[:, :-1].argmax(-1)
            target = batch.labels[:, 1:]
            counted = (target != -100).double()
            correct = ((predicted == target).double() * counted).sum(-1)
            counted = counted.sum(-1)
        loss_sum += float(out.loss) * len(batch)
        np.add.at(correct_by_domain, batch.domains, correct.numpy())
        np.add.at(count_by_domain, batch.domains, counted.numpy())
    seen = count_by_domain > 0
    per_domain = {
        name: float(correct_by_domain[i] / count_by_domain[i]) for i, name in enumerate(domain_names) if seen[i]
    }
    accuracy = float(correct_by_domain.sum() / max(count_by_domain.sum(), 1))
    return Evaluation(accuracy, loss_sum / max(len(data), 1), per_domain, len(data))


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
