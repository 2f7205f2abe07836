"""``fedfuse eval``: local models through lm-evaluation-harness on fedfuse's skill tasks or any lm-eval task.

The ``eval`` extra (``pip install "fedfuse[eval]"``) provides lm-eval; this package imports it lazily.
"""

from fedfuse.eval.harness import (
    INSTALL_HINT,
    SMOLLM2_ALIAS,
    EvalReport,
    evaluate,
    load_model,
    offline,
    pick_device,
    require_lm_eval,
    resolve_model,
)
from fedfuse.eval.tasks import TASKS_DIR, EvalError, Selection, select, shipped_tasks

__all__ = [
    "INSTALL_HINT",
    "SMOLLM2_ALIAS",
    "TASKS_DIR",
    "EvalError",
    "EvalReport",
    "Selection",
    "evaluate",
    "load_model",
    "offline",
    "pick_device",
    "require_lm_eval",
    "resolve_model",
    "select",
    "shipped_tasks",
]
