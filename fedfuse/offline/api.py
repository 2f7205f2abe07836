"""The offline merge's entry points: plan → open and check the sources → execute into a sink."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch

from fedfuse.algebra import Sparsifier
from fedfuse.checkpoints import CheckpointReader, TensorInfo
from fedfuse.offline.errors import MergeInputError
from fedfuse.offline.execute import Progress, execute
from fedfuse.offline.plan import MergePlan, Output, PathLike, plan_combine, plan_merge
from fedfuse.offline.request import OUT_DTYPES, CombineRequest, ModelsRequest, RequestError, as_request
from fedfuse.offline.sinks import MergeResult, ModelSink, PartialSink
from fedfuse.offline.sources import ModelSource, PartialSource, base_fingerprint, base_layout, open_input
from fedfuse.strategies import MergeStrategy
from fedfuse.wire import MAX_NUM_EXAMPLES, UpdateHeader

OFFLINE_RUN = "offline"
OFFLINE_NODE = "fedfuse-merge"
"""``run_id`` and ``node_id`` of the partial states ``fedfuse merge`` writes (no federated run made them)."""


def _scalars(strategy: MergeStrategy, total_weight: float, num_updates: int) -> dict[str, str]:
    """The state metadata every per-tensor state of this merge has (the same scalars for every tensor)."""
    state = strategy.new_state()
    state.total_weight = total_weight
    state.num_updates = num_updates
    return state.metadata()


def _sink(
    output: Output,
    base: CheckpointReader,
    layout: dict[str, TensorInfo],
    strategy: MergeStrategy,
    total_weight: float,
    num_updates: int,
    header: UpdateHeader | None,
    out_dtype: torch.dtype | None = None,
) -> ModelSink | PartialSink:
    if output.kind == "model":
        return ModelSink(output, base, layout, strategy, num_updates, out_dtype)
    assert header is not None
    return PartialSink(output, strategy, _scalars(strategy, total_weight, num_updates), header)


def merge_models(
    base: ModelsRequest | PathLike,
    models: Sequence[PathLike] = (),
    /,
    *,
    progress: Progress | None = None,
    **fields: Any,
) -> MergeResult:
    """Merge fine-tuned checkpoints of ``base`` into a model folder ``out`` (or a partial-state file).

    ``merge_models(request)`` runs a :class:`~fedfuse.offline.request.ModelsRequest`;
    ``merge_models(base, models, method="ties", density=0.2, out="merged")`` builds one from its fields
    (every field, its meaning and default: :class:`~fedfuse.offline.request.ModelsRequest`). ``progress``
    is called after each tensor with ``(name, bytes_done, bytes_total)`` (the CLI draws a bar with it).
    DARE seeds: model i's tensor ``name`` uses ``derive_seed(seed, 0, first_model_index + i, name)``.

    Raises
    ------
    MergeInputError
        For any bad input (a :class:`~fedfuse.offline.request.RequestError` naming the fields at fault for
        bad options), before anything is written.
    """
    request = as_request(ModelsRequest, base, "base", {"models": models, **fields} if models else fields)
    if request.diagnose:
        raise RequestError("{diagnose} writes a report, not a model: call fedfuse.offline.diagnose_models")
    plan = plan_merge(request)
    with ExitStack() as stack:
        base_ckpt = open_input(stack, "base", plan.base)
        layout = base_layout(base_ckpt)
        source = ModelSource(stack, plan, base_ckpt, layout)
        header = _partial_header(plan, base_ckpt) if plan.output.kind == "partial" else None
        out_dtype = None if request.out_dtype is None else OUT_DTYPES[request.out_dtype]
        sink = _sink(
            plan.output, base_ckpt, layout, plan.strategy, plan.total_weight, len(plan.models), header, out_dtype
        )
        with sink:
            execute(base_ckpt, layout, source, sink, progress or None)
        return sink.result()


def _partial_header(plan: MergePlan, base: CheckpointReader) -> UpdateHeader:
    """The header of a group's partial state: no run made it, its sparsifier and seeds recorded."""
    metrics: dict[str, int | float | str] = {"models": len(plan.models)}
    if plan.sparsifier.seeded:
        metrics.update(seed=plan.seed, first_model_index=plan.first_model_index)
    return UpdateHeader(
        run_id=OFFLINE_RUN,
        round=0,
        base_fingerprint=base_fingerprint(base),
        node_id=OFFLINE_NODE,
        sparsifier=plan.sparsifier,
        metrics=metrics,
    )


def _combined_header(source: PartialSource, fingerprint: str) -> UpdateHeader:
    """The header of a combined partial: what its inputs agree on, their examples summed."""
    headers = [partial.header for partial in source.files]
    first = headers[0]
    agree = all((h.run_id, h.round, h.sparsifier) == (first.run_id, first.round, first.sparsifier) for h in headers)
    return UpdateHeader(
        run_id=first.run_id if agree else OFFLINE_RUN,
        round=first.round if agree else 0,
        base_fingerprint=fingerprint,
        node_id=OFFLINE_NODE,
        num_examples=min(sum(h.num_examples for h in headers), MAX_NUM_EXAMPLES),
        sparsifier=first.sparsifier if agree else Sparsifier(),
        metrics={"partials": len(headers)},
    )


def combine_partials(
    partials: CombineRequest | Sequence[PathLike], /, *, progress: Progress | None = None, **fields: Any
) -> MergeResult:
    """Fold partial states (``merge_models(..., partial_out=...)`` files or gateways' payloads) into one merge.

    ``combine_partials(request)`` runs a :class:`~fedfuse.offline.request.CombineRequest`;
    ``combine_partials([p1, p2], base=..., out=...)`` builds one. Writes the merged model to ``out``
    exactly as :func:`merge_models` does, or (``partial_out``) the combined state, for a further tier.
    Partials must come from the same strategy and parameters, cover the same tensors and have been made
    against these base weights (their base fingerprint); anything else raises :class:`MergeInputError`
    before anything is written.
    """
    plan = plan_combine(as_request(CombineRequest, partials, "partials", fields))
    with ExitStack() as stack:
        base_ckpt = open_input(stack, "base", plan.base)
        layout = base_layout(base_ckpt)
        source = PartialSource(stack, plan.partials, base_ckpt, layout, device=plan.device)
        fingerprint = base_fingerprint(base_ckpt)
        source.check_base(fingerprint)
        header = _combined_header(source, fingerprint) if plan.output.kind == "partial" else None
        sink = _sink(plan.output, base_ckpt, layout, source.strategy, source.total_weight, source.num_updates, header)
        with sink:
            execute(base_ckpt, layout, source, sink, progress or None)
        return sink.result()


__all__ = ["OUT_DTYPES", "MergeInputError", "MergeResult", "combine_partials", "merge_models"]
