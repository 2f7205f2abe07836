"""Find the trainer a run names: a built-in, an entry point of group ``fedfuse.trainers``, or ``module:function``.

``trainer = "auto"`` picks the built-in trainer of the task (``classification`` for topics/classify,
``lm`` for lm, ``sft`` for sft). A package registers its own trainer with an entry point::

    [project.entry-points."fedfuse.trainers"]
    my-trainer = "my_package.training:train"

and a run selects it with ``trainer = "my-trainer"``; ``trainer = "my_package.training:train"`` works
without registering anything (the module must be importable on every client).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points

from fedfuse.training.trainers.builtin import loop_trainer, sft_trainer

ENTRY_POINT_GROUP = "fedfuse.trainers"
BUILTIN_TRAINERS: dict[str, Callable] = {"classification": loop_trainer, "lm": loop_trainer, "sft": sft_trainer}
TASK_TRAINERS = {"topics": "classification", "classify": "classification", "lm": "lm", "sft": "sft"}


class TrainerNotFound(LookupError):
    """The ``trainer`` run-config value names nothing loadable; the message says what was tried."""


def available_trainers() -> list[str]:
    """Built-in names and the entry points installed in this environment."""
    return sorted({*BUILTIN_TRAINERS, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})


def resolve_trainer(name: str, task: str) -> Callable:
    """The trainer callable ``name`` stands for (see the module docstring)."""
    if name == "auto":
        return BUILTIN_TRAINERS[TASK_TRAINERS[task]]
    if name in BUILTIN_TRAINERS:
        return BUILTIN_TRAINERS[name]
    if ":" in name:
        return _import(name)
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        raise TrainerNotFound(
            f"trainer {name!r} is neither built in nor an installed {ENTRY_POINT_GROUP!r} entry point "
            f"(available: {', '.join(available_trainers())}; or give module:function)"
        )
    try:
        trainer = found[0].load()
    except Exception as exc:
        raise TrainerNotFound(f"trainer entry point {name!r} ({found[0].value}) failed to load: {exc}") from None
    return _callable(trainer, name)


def _import(path: str) -> Callable:
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TrainerNotFound(f"trainer {path!r}: cannot import module {module_name!r} ({exc})") from None
    if not hasattr(module, attribute):
        raise TrainerNotFound(f"trainer {path!r}: module {module_name!r} has no attribute {attribute!r}")
    return _callable(getattr(module, attribute), path)


def _callable(trainer: object, name: str) -> Callable:
    if not callable(trainer):
        raise TrainerNotFound(f"trainer {name!r} is not callable")
    return trainer
