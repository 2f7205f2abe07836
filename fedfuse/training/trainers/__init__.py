"""Local training behind one small protocol: built-in trainers, or the user's (entry point or module:function)."""

from fedfuse.training.trainers.protocol import (
    Trainer,
    TrainerSettings,
    TrainingRound,
    TrainResult,
    as_result,
)
from fedfuse.training.trainers.registry import (
    ENTRY_POINT_GROUP,
    TrainerNotFound,
    available_trainers,
    resolve_trainer,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "TrainResult",
    "Trainer",
    "TrainerNotFound",
    "TrainerSettings",
    "TrainingRound",
    "as_result",
    "available_trainers",
    "resolve_trainer",
]
