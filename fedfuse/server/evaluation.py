"""Server-side evaluation of the merged model on the held-out test split, overall and per domain."""

from __future__ import annotations

from flwr.app import ArrayRecord, MetricRecord

from fedfuse.settings import RunSettings
from fedfuse.training.data import capped, data_for, tokenize
from fedfuse.training.loop import evaluate
from fedfuse.training.models import base_model, load_global_state


class ServerEvaluator:
    """Callable: the global weights → MetricRecord with ``accuracy``, ``loss`` and ``accuracy.<domain>``.

    The test split does not depend on the partition, so it is the same for any number of clients;
    ``eval-examples`` > 0 evaluates on a fixed seeded sample of that many test examples.
    """

    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings
        self.model, tokenizer = base_model(settings)
        data = data_for(settings, 1)
        test = data.test.subset(capped(len(data.test), settings.eval_examples, settings.seed))
        self.tokens = tokenize(test, tokenizer, settings.max_length, settings.task)
        self.domain_names = data.domain_names

    def __call__(self, arrays: ArrayRecord) -> MetricRecord:
        load_global_state(self.model, dict(arrays.to_torch_state_dict()))
        result = evaluate(self.model, self.tokens, self.domain_names)
        per_domain = {f"accuracy.{name}": value for name, value in result.per_domain.items()}
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss, **per_domain})
