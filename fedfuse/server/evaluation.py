"""Server-side evaluation of the merged model: the built-in task's held-out split, or the run's ``eval-data``.

Real federations have no central test set, so a run on users' data evaluates on the server only when
``eval-data`` names a held-out file; otherwise the clients' local evaluation (federated, example-
weighted) is the run's measure. The built-in task keeps its held-out split, overall and per domain.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import MetricRecord

from fedfuse.settings import RunSettings
from fedfuse.training.client_datasets import FILE_DOMAIN, server_eval_tokens
from fedfuse.training.federated_dataset import capped, data_for, tokenize
from fedfuse.training.loop import evaluate
from fedfuse.training.run_model import fresh_base_model


def has_server_evaluation(settings: RunSettings) -> bool:
    """Whether the server evaluates: on ``eval-data`` when given, else only on the built-in task's split.

    The server never sees nodes' own files, so "no run data" is the built-in task only for the
    tasks it has (topics, lm); classify/sft runs on nodes' files evaluate federatedly.
    """
    return bool(settings.source.eval_data) or (
        settings.source.uses_builtin_data and settings.source.task in ("topics", "lm")
    )


class ServerEvaluator:
    """Callable: the run's change to the base model → MetricRecord with ``accuracy``, ``loss``, ``accuracy.<domain>``.

    Holds one copy of the model, and the base values of the parameters the run changes (read once), so
    the model evaluated is base + change. The built-in test split does not depend on the partition, so it
    is the same for any number of clients; ``eval-examples`` > 0 evaluates on a fixed seeded sample.
    """

    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings
        self.model, tokenizer = fresh_base_model(settings)
        self.parameters = dict(self.model.named_parameters())
        self.base: dict[str, torch.Tensor] = {}
        if settings.source.eval_data:
            self.tokens = server_eval_tokens(settings, tokenizer)
            self.domain_names: tuple[str, ...] = FILE_DOMAIN
        else:
            data = data_for(settings, 1)
            test = data.test.subset(capped(len(data.test), settings.run.eval_examples, settings.run.seed))
            self.tokens = tokenize(test, tokenizer, settings.source.sequence_length, settings.source.task)
            self.domain_names = data.domain_names

    def __call__(self, change: Mapping[str, torch.Tensor]) -> MetricRecord:
        self._load(change)
        result = evaluate(self.model, self.tokens, self.domain_names)
        per_domain: dict[str, float] = {}
        if len(self.domain_names) > 1:
            per_domain = {f"accuracy.{name}": value for name, value in result.per_domain.items()}
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss, **per_domain})

    def of_weights(self, weights: Mapping[str, torch.Tensor]) -> MetricRecord:
        """Evaluate given weights (absolute values of some parameters; the others stay at the base)."""
        return self({name: w.float() - self._base_value(name).float() for name, w in weights.items()})

    def _base_value(self, name: str) -> torch.Tensor:
        if name not in self.base:
            self.base[name] = self.parameters[name].detach().clone()
        return self.base[name]

    @torch.no_grad()
    def _load(self, change: Mapping[str, torch.Tensor]) -> None:
        """Set the model to base + ``change`` (parameters the change lacks keep their base values)."""
        unknown = sorted(set(change) - set(self.parameters))
        if unknown:
            raise ValueError(f"the model change names parameters the model lacks: {', '.join(unknown[:3])}")
        for name, delta in change.items():
            self.parameters[name].copy_(self._base_value(name).float() + delta)
