"""The offline merge engine (mergekit-like): merge finished checkpoints tensor by tensor with any strategy.

Memory stays at one tensor: for each tensor name the base tensor is read, then each model's tensor
in turn; its task vector τ is formed in fp32, sparsified, folded into a merge state for that tensor
and dropped. The finalized state (already × λ) is added to the base, cast to the base dtype and
streamed to disk. Every input is checked from the headers before anything is written.

Tiers: ``partial_out`` writes a group's sufficient statistics instead of a model, one tensor's
state at a time; :func:`combine_partials` folds such files (any grouping) into the same model a
flat merge gives.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from fedfuse import __version__
from fedfuse.algebra import Sparsifier, apply_task_vector, dare_seed_fn, sparsify_update, task_vector
from fedfuse.checkpoints import (
    DTYPE_CODES,
    Checkpoint,
    CheckpointError,
    SafetensorsStreamWriter,
    ShardedWriter,
    TensorInfo,
    TensorSpec,
    atomic_output,
    check_target,
    is_weight_file,
    open_checkpoint,
    parse_size,
)
from fedfuse.strategies import MergeState, MergeStrategy, available_strategies, get_strategy
from fedfuse.strategies.base import STAT_SEPARATOR

PathLike = str | Path
PARTIAL_FORMAT = "1"
"""Version of the partial-statistics file layout (header key ``fedfuse_partial``)."""


class MergeInputError(CheckpointError):
    """Bad input to an offline merge: the message names the file, tensor or option at fault."""


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote: the output path, its files, and what went into it."""

    out: Path
    kind: Literal["model", "partial"]
    files: list[Path]
    method: str
    num_tensors: int
    num_updates: int
    nbytes: int


@dataclass
class _Plan:
    """Everything the per-tensor loop needs, settled before anything is written."""

    base: Checkpoint
    layout: dict[str, TensorInfo]
    strategy: MergeStrategy
    target: Path
    kind: Literal["model", "partial"]
    force: bool
    max_shard_size: str | int
    total_weight: float
    num_updates: int
    partial_metadata: dict[str, str]


StateFor = Callable[[str, torch.Tensor], MergeState]
"""Builds the merge state of one floating tensor, given its name and the base tensor."""


# ---------------------------------------------------------------- input checks


@contextmanager
def _input_errors() -> Iterator[None]:
    """Report every problem found while checking inputs as a :class:`MergeInputError`."""
    try:
        yield
    except MergeInputError:
        raise
    except (CheckpointError, ValueError) as exc:
        raise MergeInputError(str(exc)) from exc


def _open(stack: ExitStack, role: str, path: PathLike) -> Checkpoint:
    try:
        return stack.enter_context(open_checkpoint(path))
    except CheckpointError as exc:
        raise MergeInputError(f"{role}: {exc}") from exc


def _build_strategy(method: str | None, lam: float, device: str, dtype: str, vote: str | None) -> MergeStrategy:
    if not method:
        raise MergeInputError(f"choose a merge method; available: {', '.join(available_strategies())}")
    own = {} if vote is None else {"vote": vote}
    return get_strategy(method, lam=lam, device=device, dtype=dtype, **own)


def _build_sparsifier(strategy: MergeStrategy, kind: str | None, density: float | None) -> Sparsifier:
    kind = kind or strategy.default_sparsifier
    if kind == "none":
        if density is not None and density != 1.0:
            raise MergeInputError(
                f"density {density} was given but method {strategy.name!r} uses no sparsifier "
                "(choose one with --sparsifier trim|dare)"
            )
        return Sparsifier("none")
    if kind not in ("trim", "dare"):
        raise MergeInputError(f"unknown sparsifier {kind!r}: choose none, trim or dare")
    if density is None:
        raise MergeInputError(
            f"method {strategy.name!r} sparsifies with {kind!r}: give --density (the kept fraction, e.g. 0.2)"
        )
    return Sparsifier(kind, density)  # type: ignore[arg-type]


def _check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None or len(weights) == 0:
        return [1.0] * count
    if len(weights) != count:
        raise MergeInputError(
            f"got {len(weights)} weight(s) for {count} model(s): give one --weight per --model, or none"
        )
    checked = [float(w) for w in weights]
    for i, w in enumerate(checked):
        if not math.isfinite(w) or w < 0:
            raise MergeInputError(f"weight {i + 1} must be finite and >= 0, got {w}")
    if sum(checked) <= 0:
        raise MergeInputError("all weights are 0: at least one model must have a positive weight")
    return checked


def _first_few(names: list[str]) -> str:
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return f"{names[0]!r}{more}"


def _check_names(expected: dict[str, TensorInfo], ckpt: Checkpoint, role: str, source: str) -> None:
    missing = [name for name in expected if name not in ckpt]
    if missing:
        raise MergeInputError(f"{role} {ckpt.path} lacks tensor {_first_few(missing)} that {source} has")
    extra = [name for name in ckpt.names if name not in expected]
    if extra:
        raise MergeInputError(f"{role} {ckpt.path} has tensor {_first_few(extra)} that {source} lacks")


def _check_layout(
    expected: dict[str, TensorInfo], ckpt: Checkpoint, role: str, source: str, *, dtypes: bool = True
) -> None:
    """Names, shapes and (with ``dtypes``) dtypes of ``ckpt`` must be those of ``expected``; headers only."""
    _check_names(expected, ckpt, role, source)
    for name, info in expected.items():
        other = ckpt.info(name)
        if other.shape != info.shape:
            raise MergeInputError(
                f"tensor {name!r}: shape {list(other.shape)} in {role} {ckpt.path} but {list(info.shape)} in {source}"
            )
        if dtypes and other.dtype != info.dtype:
            raise MergeInputError(
                f"tensor {name!r}: dtype {other.dtype} in {role} {ckpt.path} but {info.dtype} in {source}"
            )
        if not dtypes and not other.is_floating_point:
            raise MergeInputError(f"tensor {name!r}: {role} {ckpt.path} holds {other.dtype}, expected floating point")


def _check_not_an_input(target: Path, inputs: Sequence[PathLike]) -> None:
    resolved = target.resolve()
    for item in inputs:
        path = Path(item).resolve()
        if path == resolved or resolved in path.parents:
            raise MergeInputError(f"output {target} would overwrite the input {item}")


def _layout(base: Checkpoint) -> dict[str, TensorInfo]:
    if not base.names:
        raise MergeInputError(f"base {base.path} holds no tensors")
    return {name: base.info(name) for name in base.names}


def _layout_fingerprint(layout: dict[str, TensorInfo]) -> str:
    """A hash of the base's names, shapes and dtypes: partials must come from the same layout."""
    text = json.dumps([[name, list(info.shape), DTYPE_CODES[info.dtype]] for name, info in layout.items()])
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _output_target(
    out: PathLike | None, partial_out: PathLike | None, force: bool
) -> tuple[Path, Literal["model", "partial"]]:
    if out is not None and partial_out is not None:
        raise MergeInputError(
            "give either an output folder (--out) or a partial-statistics file (--partial-out), not both"
        )
    if out is None and partial_out is None:
        raise MergeInputError("give an output folder (--out) or a partial-statistics file (--partial-out)")
    if partial_out is not None:
        return check_target(partial_out, directory=False, overwrite=force), "partial"
    assert out is not None
    return check_target(out, directory=True, overwrite=force), "model"


def _scalars(strategy: MergeStrategy, total_weight: float, num_updates: int) -> dict[str, str]:
    """The metadata every per-tensor state of this merge has (the same scalars for every tensor)."""
    state = strategy.new_state()
    state.total_weight = total_weight
    state.num_updates = num_updates
    return state.metadata()


# ---------------------------------------------------------------- the per-tensor loop


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=True,
    )


def _run_loop(
    plan: _Plan, state_for: StateFor, emit: Callable[[str, torch.Tensor, MergeState | None], None], progress: bool
) -> None:
    """The one per-tensor loop: read the base tensor, build its state, hand both to ``emit``, drop them."""
    with _progress(progress) as bar:
        task = bar.add_task("merging", total=sum(info.nbytes for info in plan.layout.values()))
        for name, info in plan.layout.items():
            bar.update(task, description=name)
            base_tensor = plan.base.get(name)
            state = state_for(name, base_tensor) if info.is_floating_point else None
            emit(name, base_tensor, state)
            del base_tensor, state
            bar.advance(task, info.nbytes)


def _copy_config_files(base: Checkpoint, folder: Path) -> None:
    """Copy every non-weight file of the base folder (config, tokenizer, …) so the output loads."""
    if base.folder is None:
        return
    for item in sorted(base.folder.iterdir()):
        if item.is_file() and not is_weight_file(item):
            shutil.copy2(item, folder / item.name)


def _write_model(plan: _Plan, state_for: StateFor, progress: bool) -> MergeResult:
    specs = [TensorSpec(name, info.shape, info.dtype) for name, info in plan.layout.items()]
    metadata = {"format": "pt", "fedfuse_method": plan.strategy.name, "fedfuse_version": __version__}
    device = plan.strategy.device

    with atomic_output(plan.target, directory=True, overwrite=plan.force) as folder:
        writer = ShardedWriter(folder, specs, metadata=metadata, max_shard_size=plan.max_shard_size)

        def emit(name: str, base_tensor: torch.Tensor, state: MergeState | None) -> None:
            if state is None:
                writer.write(name, base_tensor)
                return
            merged = state.finalize()
            theta = apply_task_vector({name: base_tensor.to(device)}, merged)[name]
            writer.write(name, theta.cpu())

        _run_loop(plan, state_for, emit, progress)
        names = [path.name for path in writer.close()]
        _copy_config_files(plan.base, folder)
    return MergeResult(
        out=plan.target,
        kind="model",
        files=[plan.target / name for name in names],
        method=plan.strategy.name,
        num_tensors=len(specs),
        num_updates=plan.num_updates,
        nbytes=sum(spec.nbytes for spec in specs),
    )


def _write_partial(plan: _Plan, state_for: StateFor, progress: bool) -> MergeResult:
    strategy = plan.strategy
    specs = [
        TensorSpec(f"{name}{STAT_SEPARATOR}{stat}", info.shape, strategy.dtype)
        for name, info in plan.layout.items()
        if info.is_floating_point
        for stat in strategy.statistics
    ]
    expected = _scalars(strategy, plan.total_weight, plan.num_updates)

    with atomic_output(plan.target, directory=False, overwrite=plan.force) as path:
        with SafetensorsStreamWriter(path, specs, {**plan.partial_metadata, **expected}) as writer:

            def emit(name: str, base_tensor: torch.Tensor, state: MergeState | None) -> None:
                if state is None:
                    return
                if state.metadata() != expected:
                    raise RuntimeError(
                        f"tensor {name!r}: state scalars {state.metadata()} differ from the header's {expected}"
                    )
                tensors = state.to_tensors()
                for stat in strategy.statistics:
                    key = f"{name}{STAT_SEPARATOR}{stat}"
                    writer.write(key, tensors[key].cpu())

            _run_loop(plan, state_for, emit, progress)
    return MergeResult(
        out=plan.target,
        kind="partial",
        files=[plan.target],
        method=strategy.name,
        num_tensors=len(specs),
        num_updates=plan.num_updates,
        nbytes=sum(spec.nbytes for spec in specs),
    )


def _write(plan: _Plan, state_for: StateFor, progress: bool) -> MergeResult:
    if plan.kind == "partial":
        return _write_partial(plan, state_for, progress)
    return _write_model(plan, state_for, progress)


# ---------------------------------------------------------------- public entry points


def merge_models(
    base: PathLike,
    models: Sequence[PathLike],
    *,
    method: str,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    sparsifier: str | None = None,
    lam: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    vote: str | None = None,
    fishers: Sequence[PathLike] | None = None,
    out: PathLike | None = None,
    max_shard_size: str | int = "5GB",
    partial_out: PathLike | None = None,
    force: bool = False,
    progress: bool = False,
    first_model_index: int = 0,
) -> MergeResult:
    """Merge fine-tuned checkpoints of ``base`` into a model folder ``out`` (or a partial file).

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
    sparsifier : {"none", "trim", "dare"}, optional
        Overrides the method's default (ties → trim, dare_* → dare, else none).
    lam : float
        λ, the scale of the merged task vector.
    seed : int
        DARE seed: model i's tensor ``name`` uses ``derive_seed(seed, 0, first_model_index + i, name)``.
    device, dtype : str
        Where and at what precision the statistics accumulate (``cpu|cuda|auto``, ``float32|float64``).
    vote : {"mass", "count"}, optional
        TIES sign election (ties and dare_ties only).
    fishers : list of path, optional
        One safetensors file of Fisher diagonals per model (the ``fisher`` method needs them).
    out : path, optional
        Output model folder (``model.safetensors`` or shards + index, plus the base's config files).
    max_shard_size : str or int
        Shard limit, e.g. ``"5GB"``, ``"500MB"`` or bytes.
    partial_out : path, optional
        Instead of a model, write this group's partial statistics for :func:`combine_partials`.
    force : bool
        Replace a non-empty ``out`` (or an existing ``partial_out``).
    progress : bool
        Show a rich progress bar on stderr.
    first_model_index : int
        Index of the first model in DARE seeds, so groups merged separately draw the masks a flat
        merge would (give group 2 the number of models in group 1).

    Raises
    ------
    MergeInputError
        For any bad input, before anything is written.
    """
    with ExitStack() as stack:
        with _input_errors():
            strategy = _build_strategy(method, lam, device, dtype, vote)
            chosen = _build_sparsifier(strategy, sparsifier, density)
            if not models:
                raise MergeInputError("give at least one model to merge (--model)")
            checked_weights = _check_weights(weights, len(models))
            fisher_paths = list(fishers or [])
            if strategy.needs_fisher and not fisher_paths:
                raise MergeInputError(f"method {strategy.name!r} needs a Fisher diagonal file per model (--fisher)")
            if fisher_paths and not strategy.needs_fisher:
                raise MergeInputError(f"--fisher was given but method {strategy.name!r} does not use Fisher diagonals")
            if fisher_paths and len(fisher_paths) != len(models):
                raise MergeInputError(
                    f"got {len(fisher_paths)} Fisher file(s) for {len(models)} model(s): give one per model"
                )
            target, kind = _output_target(out, partial_out, force)
            _check_not_an_input(target, [base, *models, *fisher_paths])
            max_shard_size = parse_size(max_shard_size)
            base_ckpt = _open(stack, "base", base)
            layout = _layout(base_ckpt)
            model_ckpts = []
            for i, path in enumerate(models):
                ckpt = _open(stack, f"model {i + 1}", path)
                _check_layout(layout, ckpt, f"model {i + 1}", f"the base {base_ckpt.path}")
                model_ckpts.append(ckpt)
            fisher_ckpts = []
            for i, path in enumerate(fisher_paths):
                ckpt = _open(stack, f"Fisher file {i + 1}", path)
                floating = {name: info for name, info in layout.items() if info.is_floating_point}
                _check_layout(floating, ckpt, f"Fisher file {i + 1}", f"the base {base_ckpt.path}", dtypes=False)
                fisher_ckpts.append(ckpt)

        plan = _Plan(
            base=base_ckpt,
            layout=layout,
            strategy=strategy,
            target=target,
            kind=kind,
            force=force,
            max_shard_size=max_shard_size,
            total_weight=sum(checked_weights),
            num_updates=len(model_ckpts),
            partial_metadata={
                "format": "pt",
                "fedfuse_partial": PARTIAL_FORMAT,
                "fedfuse_version": __version__,
                "fedfuse_strategy": strategy.name,
                "fedfuse_strategy_kwargs": json.dumps(strategy.params(), sort_keys=True),
                "fedfuse_sparsifier": json.dumps({"kind": chosen.kind, "density": chosen.density, "seed": seed}),
                "fedfuse_base_layout": _layout_fingerprint(layout),
            },
        )
        seed_fns = [dare_seed_fn(seed, 0, first_model_index + i) for i in range(len(model_ckpts))]
        compute = strategy.device

        def state_for(name: str, base_tensor: torch.Tensor) -> MergeState:
            state = strategy.new_state()
            base_work = {name: base_tensor.to(compute)}
            for i, ckpt in enumerate(model_ckpts):
                tau = task_vector({name: ckpt.get(name).to(compute)}, base_work)
                update = sparsify_update(tau, chosen, seed_fns[i])
                del tau
                fisher = {name: fisher_ckpts[i].get(name)} if fisher_ckpts else None
                state.add(update, weight=checked_weights[i], fisher=fisher)
                del update, fisher
            return state

        return _write(plan, state_for, progress)


_CARRIED_KEYS = ("format", "fedfuse_partial", "fedfuse_strategy", "fedfuse_strategy_kwargs", "fedfuse_base_layout")
"""Partial-file header entries a combined partial keeps from its inputs (they agree across inputs)."""


def _partial_header(ckpt: Checkpoint) -> dict[str, str]:
    metadata = ckpt.metadata()
    needed = ("fedfuse_partial", "fedfuse_strategy", "fedfuse_strategy_kwargs", "fedfuse_state", "fedfuse_base_layout")
    missing = [key for key in needed if key not in metadata]
    if missing:
        raise MergeInputError(
            f"{ckpt.path} is not a fedfuse partial-statistics file (made with --partial-out); header lacks {missing}"
        )
    if metadata["fedfuse_partial"] != PARTIAL_FORMAT:
        raise MergeInputError(
            f"{ckpt.path}: partial format {metadata['fedfuse_partial']!r}, this fedfuse reads {PARTIAL_FORMAT!r}"
        )
    return metadata


def _describe_difference(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys)


def combine_partials(
    partials: Sequence[PathLike],
    *,
    base: PathLike,
    out: PathLike | None = None,
    partial_out: PathLike | None = None,
    device: str = "cpu",
    max_shard_size: str | int = "5GB",
    force: bool = False,
    progress: bool = False,
) -> MergeResult:
    """Fold partial-statistics files (from ``merge_models(..., partial_out=...)``) into one merge.

    Writes the merged model to ``out`` exactly as :func:`merge_models` does, or (``partial_out``)
    the combined statistics, for a further tier. Partials must come from the same strategy and
    parameters and the same base layout; anything else raises :class:`MergeInputError` before
    anything is written.
    """
    with ExitStack() as stack:
        with _input_errors():
            if not partials:
                raise MergeInputError("give at least one partial-statistics file (--combine)")
            target, kind = _output_target(out, partial_out, force)
            _check_not_an_input(target, [base, *partials])
            max_shard_size = parse_size(max_shard_size)
            base_ckpt = _open(stack, "base", base)
            layout = _layout(base_ckpt)
            fingerprint = _layout_fingerprint(layout)
            ckpts = [_open(stack, f"partial {i + 1}", path) for i, path in enumerate(partials)]
            headers = [_partial_header(ckpt) for ckpt in ckpts]
            first = json.loads(headers[0]["fedfuse_state"])
            for ckpt, header in zip(ckpts[1:], headers[1:]):
                other = json.loads(header["fedfuse_state"])
                if other != first:
                    raise MergeInputError(
                        f"partials were made with different strategy parameters: {ckpts[0].path} vs {ckpt.path} "
                        f"({_describe_difference(first, other)})"
                    )
            for ckpt, header in zip(ckpts, headers):
                if header["fedfuse_base_layout"] != fingerprint:
                    raise MergeInputError(
                        f"{ckpt.path} was made from a base with other tensors, shapes or dtypes than {base}"
                    )
            kwargs = json.loads(headers[0]["fedfuse_strategy_kwargs"])
            strategy = get_strategy(headers[0]["fedfuse_strategy"], device=device, **kwargs)
            if strategy.identity() != first:
                raise MergeInputError(
                    f"{ckpts[0].path}: rebuilt strategy {strategy.identity()} does not match its state {first}"
                )
            stat_layout = {
                f"{name}{STAT_SEPARATOR}{stat}": TensorInfo(info.shape, strategy.dtype)
                for name, info in layout.items()
                if info.is_floating_point
                for stat in strategy.statistics
            }
            source = f"a {strategy.name} partial of the base {base_ckpt.path}"
            for i, ckpt in enumerate(ckpts):
                _check_layout(stat_layout, ckpt, f"partial {i + 1}", source)
            total_weight = 0.0
            num_updates = 0
            for header in headers:
                total_weight += float(header["total_weight"])
                num_updates += int(header["num_updates"])

        plan = _Plan(
            base=base_ckpt,
            layout=layout,
            strategy=strategy,
            target=target,
            kind=kind,
            force=force,
            max_shard_size=max_shard_size,
            total_weight=total_weight,
            num_updates=num_updates,
            partial_metadata={
                **{key: headers[0][key] for key in _CARRIED_KEYS if key in headers[0]},
                "fedfuse_version": __version__,
                "fedfuse_sparsifier": json.dumps([h.get("fedfuse_sparsifier") for h in headers]),
            },
        )

        def state_for(name: str, base_tensor: torch.Tensor) -> MergeState:
            state: MergeState | None = None
            keys = [f"{name}{STAT_SEPARATOR}{stat}" for stat in strategy.statistics]
            for ckpt, header in zip(ckpts, headers):
                part = MergeState.from_tensors(strategy, {key: ckpt.get(key) for key in keys}, header)
                state = part if state is None else state.combine(part)
            assert state is not None
            return state

        return _write(plan, state_for, progress)
