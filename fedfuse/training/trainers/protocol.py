"""The local-training protocol: what fedfuse hands a trainer, and what a trainer gives back.

A trainer is any callable ``trainer(model, data, settings, round) -> TrainResult | float | None``
that trains ``model`` **in place**. ``settings`` is a :class:`TrainerSettings`: the run's training
section (``settings.training``: batch size, learning rate, precision, …) plus the task and model
names — not the whole run configuration, so a trainer depends on what training means and nothing
else. The model arrives as the round's model: LoRA adapters already attached (only their
parameters, and a classification head, require grad) or full weights, on ``round.device``.
fedfuse does everything after training itself — the task vector, sparsification, error feedback,
the Fisher diagonal, encoding and signing — so a trainer never sees the wire.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedfuse.settings import TrainingSettings
from fedfuse.training.client_datasets import ClientDatasets


@dataclass(frozen=True)
class TrainerSettings:
    """What a trainer receives of the run's settings.

    ``training`` is the run's training section (:class:`fedfuse.settings.TrainingSettings`:
    ``batch_size``, ``lr``, ``local_steps``, ``gradient_checkpointing``, …); ``task`` is the run's
    task (``topics``, ``classify``, ``lm``, ``sft``) and ``model`` the base model it fine-tunes.
    """

    training: TrainingSettings
    task: str
    model: str


@dataclass(frozen=True)
class TrainingRound:
    """The round a trainer works in.

    ``seed`` is derived from (run seed, round, node): seed every random choice with it so a resumed
    run repeats an uninterrupted one. ``steps`` is the optimizer-step budget the settings give
    (``local-steps``, or ``local-epochs`` whole passes); ``dtype`` is the autocast dtype
    (``None`` = full fp32) for ``precision``.
    """

    round_number: int
    node: str
    seed: int
    steps: int
    device: torch.device
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class TrainResult:
    """What a trainer reports: its mean training loss and any extra scalar metrics."""

    loss: float
    metrics: Mapping[str, float] = field(default_factory=dict)


class Trainer(Protocol):
    """Train ``model`` in place on ``data.train`` (or ``data.train_rows``); return the loss."""

    def __call__(
        self, model: torch.nn.Module, data: ClientDatasets, settings: TrainerSettings, round: TrainingRound
    ) -> TrainResult | float | None: ...


def as_result(value: Any) -> TrainResult:
    """A trainer's return value as a :class:`TrainResult` (a bare float is the loss; None is NaN)."""
    if isinstance(value, TrainResult):
        return value
    if value is None:
        return TrainResult(float("nan"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return TrainResult(float(value))
    raise TypeError(f"a trainer must return a TrainResult, a float loss or None; got {type(value).__name__}")
