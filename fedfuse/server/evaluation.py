"""Server-side evaluation of the merged model: the built-in task's held-out split, or the run's ``eval-data``.

Real federations have no central test set, so a run on users' data evaluates on the server only when
``eval-data`` names a held-out file; otherwise the clients' local evaluation (federated, example-
weighted) is the run's measure. The built-in task keeps its held-out split, overall and per domain.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, MetricRecord

from fedfuse.settings import RunSettings
from fedfuse.training.client_datasets import FILE_DOMAIN, server_eval_tokens
from fedfuse.training.federated_dataset import capped, data_for, tokenize
from fedfuse.training.loop import evaluate
from fedfuse.training.run_model import base_model, load_global_state


def has_server_evaluation(settings: RunSettings) -> bool:
    """Whether the server evaluates: on ``eval-data`` when given, else only on the built-in task's split.

    The server never sees nodes' own files, so "no run data" is the built-in task only for the
    tasks it has (topics, lm); classify/sft runs on nodes' files evaluate federatedly.
    """
    return bool(settings.source.eval_data) or (
        settings.source.uses_builtin_data and settings.source.task in ("topics", "lm")
    )


class ServerEvaluator:
    """Callable: the global weights → MetricRecord with ``accuracy``, ``loss`` and ``accuracy.<domain>``.

    The built-in test split does not depend on the partition, so it is the same for any number of
    clients; ``eval-examples`` > 0 evaluates on a fixed seeded sample of that many examples.
    """

    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings
        self.model, tokenizer = base_model(settings)
        if settings.source.eval_data:
            self.tokens = server_eval_tokens(settings, tokenizer)
            self.domain_names: tuple[str, ...] = FILE_DOMAIN
        else:
            data = data_for(settings, 1)
            test = data.test.subset(capped(len(data.test), settings.run.eval_examples, settings.run.seed))
            self.tokens = tokenize(test, tokenizer, settings.source.sequence_length, settings.source.task)
            self.domain_names = data.domain_names

    def __call__(self, arrays: ArrayRecord) -> MetricRecord:
        load_global_state(self.model, dict(arrays.to_torch_state_dict()))
        result = evaluate(self.model, self.tokens, self.domain_names)
        per_domain: dict[str, float] = {}
        if len(self.domain_names) > 1:
            per_domain = {f"accuracy.{name}": value for name, value in result.per_domain.items()}
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss, **per_domain})
