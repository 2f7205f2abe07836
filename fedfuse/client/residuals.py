"""Error-feedback residuals kept in a Flower ``Context.state`` between rounds, one ArrayRecord per store.

The fedfuse ClientApp (and each tier-gateway member) and ``task_vector_mod`` keep their residuals here.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context

from fedfuse.algebra import Sparsifier
from fedfuse.client.error_feedback import ErrorFeedback


def restore_feedback(context: Context, record: str, sparsifier: Sparsifier) -> ErrorFeedback:
    """The residual store under ``record`` in ``context.state`` (empty in a node's first round)."""
    feedback = ErrorFeedback(sparsifier)
    stored = context.state.array_records.get(record)
    if stored is not None:
        feedback.load_state_dict(stored.to_torch_state_dict())
    return feedback


def keep_feedback(context: Context, record: str, feedback: ErrorFeedback) -> None:
    """Store ``feedback``'s residual under ``record`` for the node's next round."""
    context.state.array_records[record] = ArrayRecord(feedback.state_dict())
