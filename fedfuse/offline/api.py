"""The offline merge's entry points: plan → open and check the sources → execute into a sink."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch

from fedfuse.algebra import Sparsifier
from fedfuse.checkpoints import CheckpointReader, TensorInfo
from fedfuse.offline.errors import MergeInputError
from fedfuse.offline.execute import Progress, execute
from fedfuse.offline.plan import Output, PathLike, TensorSettingsFn, plan_combine, plan_merge
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


OUT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
"""The output dtypes a merge can write its floating tensors in (``out_dtype``)."""


def merge_models(
    base: PathLike,
    models: Sequence[PathLike],
    *,
    method: str,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    sparsifier: str | None = None,
    sparsifier_options: Mapping[str, Any] | None = None,
    lam: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    vote: str | None = None,
    params: Mapping[str, Any] | None = None,
    fishers: Sequence[PathLike] | None = None,
    grams: Sequence[PathLike] | None = None,
    out: PathLike | None = None,
    max_shard_size: str | int = "5GB",
    partial_out: PathLike | None = None,
    force: bool = False,
    progress: Progress | None = None,
    first_model_index: int = 0,
    allow_non_finite: bool = False,
    tensor_settings: TensorSettingsFn | None = None,
    out_dtype: str | None = None,
) -> MergeResult:
    """Merge fine-tuned checkpoints of ``base`` into a model folder ``out`` (or a partial-state file).

    Parameters
    ----------
    base, models : path
        A ``.safetensors`` file or an HF model folder (single file or sharded) each.
    method : str
        Any registered strategy (``fedfuse.strategies.available_strategies()``).
    weights : list of float, optional
        One per model (default all 1.0).
    density : float, optional
        Kept fraction for the sparsifier; required unless the sparsifier is ``"none"``.
    sparsifier : {"none", "trim", "dare", "breadcrumbs", "della"}, optional
        Overrides the method's declared default (ties → trim, dare_* → dare, else none).
    sparsifier_options : mapping, optional
        ``gamma`` (breadcrumbs' outlier fraction), ``epsilon`` (DELLA's spread) and ``rescale``
        (``inverse``, ``l1`` or ``none``; see :class:`fedfuse.algebra.Sparsifier`).
    lam : float
        λ, the scale of the merged task vector.
    seed : int
        DARE seed: model i's tensor ``name`` uses ``derive_seed(seed, 0, first_model_index + i, name)``.
    device, dtype : str
        Where and at what precision the statistics accumulate (``cpu|cuda|auto``, ``float32|float64``).
    vote : {"mass", "count"}, optional
        TIES sign election (ties and dare_ties only).
    params : mapping, optional
        Further declared strategy parameters by name (values may be strings, e.g. ``{"eps": "1e-8"}``).
    fishers : list of path, optional
        One safetensors file of Fisher diagonals per model (the ``fisher`` method needs them).
    grams : list of path, optional
        One safetensors file of Gram matrices per model (``regmean`` needs them; see
        :func:`fedfuse.offline.grams.compute_grams`).
    out : path, optional
        Output model folder (``model.safetensors`` or shards + index, plus the base's config files).
    max_shard_size : str or int
        Shard limit, e.g. ``"5GB"``, ``"500MB"`` or bytes.
    partial_out : path, optional
        Instead of a model, write this group's partial state (the format gateways send, any file
        name) for :func:`combine_partials`.
    force : bool
        Replace a non-empty ``out`` (or an existing ``partial_out``).
    progress : callable, optional
        Called after each tensor with ``(name, bytes_done, bytes_total)`` (the CLI draws a bar with it).
    first_model_index : int
        Index of the first model in DARE seeds, so groups merged separately draw the masks a flat
        merge would (give group 2 the number of models in group 1).
    allow_non_finite : bool
        Merge NaN/Inf values as they are; by default a base, model or Fisher tensor holding one is an
        error naming it, and nothing is written.
    tensor_settings : callable, optional
        Tensor name → its own :class:`~fedfuse.offline.plan.TensorSettings` (strategy, weights, one
        sparsifier per model) or None for the plan's; :mod:`fedfuse.offline.recipe` builds it from a
        mergekit recipe's per-model and per-layer values. Model output only.
    out_dtype : {"float16", "bfloat16", "float32", "float64"}, optional
        Write the model's floating tensors in this dtype (default: each base tensor's own).

    Raises
    ------
    MergeInputError
        For any bad input, before anything is written.
    """
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise MergeInputError(f"unknown output dtype {out_dtype!r}: choose {', '.join(OUT_DTYPES)}")
    if out_dtype is not None and partial_out is not None:
        raise MergeInputError("an output dtype applies to a model (--out), not to partial statistics")
    plan = plan_merge(
        base,
        models,
        method=method,
        params=params,
        lam=lam,
        vote=vote,
        weights=weights,
        density=density,
        sparsifier=sparsifier,
        sparsifier_options=sparsifier_options,
        seed=seed,
        device=device,
        dtype=dtype,
        fishers=fishers,
        grams=grams,
        out=out,
        partial_out=partial_out,
        max_shard_size=max_shard_size,
        force=force,
        first_model_index=first_model_index,
        allow_non_finite=allow_non_finite,
        tensor_settings=tensor_settings,
    )
    with ExitStack() as stack:
        base_ckpt = open_input(stack, "base", plan.base)
        layout = base_layout(base_ckpt)
        source = ModelSource(stack, plan, base_ckpt, layout)
        header = None
        if plan.output.kind == "partial":
            metrics: dict[str, int | float | str] = {"models": len(plan.models)}
            if plan.sparsifier.seeded:
                metrics.update(seed=plan.seed, first_model_index=plan.first_model_index)
            header = UpdateHeader(
                run_id=OFFLINE_RUN,
                round=0,
                base_fingerprint=base_fingerprint(base_ckpt),
                node_id=OFFLINE_NODE,
                sparsifier=plan.sparsifier,
                metrics=metrics,
            )
        sink = _sink(
            plan.output,
            base_ckpt,
            layout,
            plan.strategy,
            plan.total_weight,
            len(plan.models),
            header,
            None if out_dtype is None else OUT_DTYPES[out_dtype],
        )
        with sink:
            execute(base_ckpt, layout, source, sink, progress or None)
        return sink.result()


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
    partials: Sequence[PathLike],
    *,
    base: PathLike,
    out: PathLike | None = None,
    partial_out: PathLike | None = None,
    device: str = "cpu",
    max_shard_size: str | int = "5GB",
    force: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Fold partial states (``merge_models(..., partial_out=...)`` files or gateways' payloads) into one merge.

    Writes the merged model to ``out`` exactly as :func:`merge_models` does, or (``partial_out``)
    the combined state, for a further tier. Partials must come from the same strategy and
    parameters, cover the same tensors and have been made against these base weights (their
    base fingerprint); anything else raises :class:`MergeInputError` before anything is written.
    """
    plan = plan_combine(
        partials,
        base=base,
        out=out,
        partial_out=partial_out,
        device=device,
        max_shard_size=max_shard_size,
        force=force,
    )
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


__all__ = ["MergeInputError", "MergeResult", "combine_partials", "merge_models"]
