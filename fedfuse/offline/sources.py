"""Tensor sources: what each base tensor's merge state is built from (fine-tuned models, or partial states).

A source is opened and checked from headers only (names, shapes, dtypes, strategy identities) before
anything is written; then :meth:`state_for` builds one tensor's state at a time. :class:`ModelSource`
folds each model's task vector τ = θ − θ_base (fp32, sparsified) with its weight and Fisher diagonal;
:class:`PartialSource` reads each partial file's statistics of that tensor and combines them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import torch

from fedfuse.algebra import dare_seed_fn, sparsify_update, task_vector
from fedfuse.checkpoints import CheckpointReader, TensorInfo, open_checkpoint
from fedfuse.offline.errors import MergeInputError, input_errors
from fedfuse.offline.plan import MergePlan, check_mergeable
from fedfuse.offline.request import RequestError
from fedfuse.strategies import MergeState, MergeStrategy, build_strategy, method_spec
from fedfuse.strategies.base import STAT_SEPARATOR
from fedfuse.wire import Expectation, UpdateRejected, fingerprint
from fedfuse.wire.partial_file import PartialFile, open_partial


class TensorSource(Protocol):
    """Builds the merge state of each floating base tensor it covers."""

    strategy: MergeStrategy
    total_weight: float
    num_updates: int

    def covers(self, name: str) -> bool:
        """Whether tensor ``name`` is merged (else it is the base's, unchanged)."""

    def state_for(self, name: str, base_tensor: torch.Tensor) -> MergeState:
        """The merge state of tensor ``name`` (``base_tensor`` is the base's, on CPU)."""


# ---------------------------------------------------------------- header checks


def open_input(stack: ExitStack, role: str, path: str | Path) -> CheckpointReader:
    """Open a checkpoint for the whole merge; a problem is a :class:`MergeInputError` naming ``role``."""
    with input_errors(role):
        return stack.enter_context(open_checkpoint(path))


def base_layout(base: CheckpointReader) -> dict[str, TensorInfo]:
    """Every base tensor's shape and dtype, in the order the merge visits them."""
    if not base.names:
        raise MergeInputError(f"base {base.path} holds no tensors")
    return {name: base.info(name) for name in base.names}


def _first_few(names: list[str]) -> str:
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return f"{names[0]!r}{more}"


def check_layout(
    expected: dict[str, TensorInfo], ckpt: CheckpointReader, role: str, source: str, *, dtypes: bool = True
) -> None:
    """Names, shapes and (with ``dtypes``) dtypes of ``ckpt`` must be those of ``expected``; headers only."""
    missing = [name for name in expected if name not in ckpt]
    if missing:
        raise MergeInputError(f"{role} {ckpt.path} lacks tensor {_first_few(missing)} that {source} has")
    extra = [name for name in ckpt.names if name not in expected]
    if extra:
        raise MergeInputError(f"{role} {ckpt.path} has tensor {_first_few(extra)} that {source} lacks")
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


def check_gram_layout(layout: dict[str, TensorInfo], ckpt: CheckpointReader, role: str, source: str) -> None:
    """A Gram file holds, for some 2-D floating tensors of the base, one float in × in matrix each."""
    for name in ckpt.names:
        info, gram = layout.get(name), ckpt.info(name)
        if info is None:
            raise MergeInputError(f"{role} {ckpt.path} has a Gram matrix for {name!r}, which {source} lacks")
        if len(info.shape) != 2 or not info.is_floating_point:
            raise MergeInputError(f"{role} {ckpt.path}: {name!r} is not a 2-D floating weight in {source}")
        size = info.shape[-1]
        if tuple(gram.shape) != (size, size) or not gram.dtype.is_floating_point:
            raise MergeInputError(
                f"{role} {ckpt.path}: the Gram matrix of {name!r} is {gram.dtype} {list(gram.shape)}, "
                f"expected floating point [{size}, {size}] (the weight's input size)"
            )
    if not ckpt.names:
        raise MergeInputError(f"{role} {ckpt.path} holds no Gram matrix")


class _LazyTensors(Mapping[str, torch.Tensor]):
    """A checkpoint as a mapping that loads each tensor when it is looked up (one at a time)."""

    def __init__(self, ckpt: CheckpointReader) -> None:
        self._ckpt = ckpt

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._ckpt:
            raise KeyError(name)
        return self._ckpt.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ckpt.names)

    def __len__(self) -> int:
        return len(self._ckpt)


def base_fingerprint(base: CheckpointReader) -> str:
    """:func:`fedfuse.wire.fingerprint` of the base's weights, streamed (memory: one tensor; one read)."""
    return fingerprint(_LazyTensors(base))


# ---------------------------------------------------------------- fine-tuned models


class ModelSource:
    """Each tensor's state from the fine-tuned models (and their Fisher diagonals) of a plan."""

    def __init__(self, stack: ExitStack, plan: MergePlan, base: CheckpointReader, layout: dict[str, TensorInfo]):
        self.strategy = plan.strategy
        self.total_weight = plan.total_weight
        self.num_updates = len(plan.models)
        self._settings_for = plan.settings_for
        source = f"the base {base.path}"
        self._models = []
        for i, path in enumerate(plan.models):
            ckpt = open_input(stack, f"model {i + 1}", path)
            check_layout(layout, ckpt, f"model {i + 1}", source)
            self._models.append(ckpt)
        floating = {name: info for name, info in layout.items() if info.is_floating_point}
        self._fishers = []
        for i, path in enumerate(plan.fishers):
            ckpt = open_input(stack, f"Fisher file {i + 1}", path)
            check_layout(floating, ckpt, f"Fisher file {i + 1}", source, dtypes=False)
            self._fishers.append(ckpt)
        self._grams = [open_input(stack, f"Gram file {i + 1}", path) for i, path in enumerate(plan.grams)]
        for i, ckpt in enumerate(self._grams):
            check_gram_layout(layout, ckpt, f"Gram file {i + 1}", source)
        self._seed_fns = [dare_seed_fn(plan.seed, 0, plan.first_model_index + i) for i in range(len(plan.models))]
        self._paths = {"base": base.path, **{f"model {i + 1}": path for i, path in enumerate(plan.models)}}
        self._allow_non_finite = plan.allow_non_finite

    def _finite(self, tensor: torch.Tensor, name: str, which: str) -> torch.Tensor:
        if not self._allow_non_finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RequestError(
                f"{which} ({self._paths.get(which, which)}): tensor {name!r} has NaN or infinite values; "
                "nothing was written ({allow_non_finite} merges them as they are)"
            )
        return tensor

    def covers(self, name: str) -> bool:
        return True

    def state_for(self, name: str, base_tensor: torch.Tensor) -> MergeState:
        compute = self.strategy.device
        settings = self._settings_for(name)  # the plan's, or this tensor's own (a recipe's per-layer values)
        state = settings.strategy.new_state()
        base_work = {name: self._finite(base_tensor, name, "base").to(compute)}
        for i, ckpt in enumerate(self._models):
            tuned = self._finite(ckpt.get(name), name, f"model {i + 1}")
            tau = task_vector({name: tuned.to(compute)}, base_work)
            update = sparsify_update(tau, settings.sparsifiers[i], self._seed_fns[i])
            del tau, tuned
            fisher = (
                {name: self._finite(self._fishers[i].get(name), name, f"Fisher file {i + 1}")}
                if self._fishers
                else None
            )
            gram = (
                {name: self._finite(self._grams[i].get(name), name, f"Gram file {i + 1}").float()}
                if self._grams and name in self._grams[i]
                else None
            )
            state.add(update, weight=settings.weights[i], fisher=fisher, gram=gram)
            del update, fisher, gram
        return state


# ---------------------------------------------------------------- partial states


def _describe_difference(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys)


def _open_partial(stack: ExitStack, role: str, path: Path) -> PartialFile:
    with input_errors(role):
        try:
            return stack.enter_context(open_partial(path))
        except UpdateRejected as exc:
            if exc.reason in ("malformed_header", "unsupported_version", "wrong_dtype"):
                raise RequestError(
                    f"{path} is not a fedfuse partial-statistics file (made with {{partial_out}}, or a gateway's "
                    f"encode_partial payload): {exc.detail}"
                ) from exc
            raise MergeInputError(f"{path}: {exc.detail} ({exc.reason})") from exc


def strategy_of(identity: Mapping[str, Any], *, device: str, where: Path) -> MergeStrategy:
    """Rebuild the strategy a partial state names (its declared parameters; presets imply the rest)."""
    name = str(identity["strategy"])
    with input_errors(str(where)):
        spec = method_spec(name)
        params = {k: v for k, v in identity.items() if k not in ("strategy", "dtype") and spec.declares(k)}
        strategy = build_strategy(name, params, device=device, dtype=str(identity.get("dtype", "float32")))
    if strategy.identity() != dict(identity):
        raise MergeInputError(f"{where}: rebuilt strategy {strategy.identity()} does not match its state {identity}")
    return strategy


class PartialSource:
    """Each tensor's state as the combination of the partial files' statistics of that tensor.

    Every partial must name the same strategy and parameters, cover the same tensors (each a
    floating base tensor of the same shape) and carry the base's weight fingerprint; base tensors
    no partial covers (frozen, tied or buffers, for a gateway's payload) stay the base's.
    """

    def __init__(
        self,
        stack: ExitStack,
        paths: tuple[Path, ...],
        base: CheckpointReader,
        layout: dict[str, TensorInfo],
        *,
        device: str,
    ) -> None:
        self._base_path = base.path
        self._files = [_open_partial(stack, f"partial {i + 1}", path) for i, path in enumerate(paths)]
        first = self._files[0]
        for other in self._files[1:]:
            if other.identity != first.identity:
                raise MergeInputError(
                    f"partials were made with different strategy parameters: {first.path} vs {other.path} "
                    f"({_describe_difference(first.identity, other.identity)})"
                )
        check_mergeable(str(first.identity["strategy"]), "{partials}")
        self.strategy = strategy_of(first.identity, device=device, where=first.path)
        floating = {name: info.shape for name, info in layout.items() if info.is_floating_point}
        expect = Expectation(floating, allow_missing=True)
        covered: list[set[str]] = []
        for partial in self._files:
            try:
                covered.append(set(partial.check(self.strategy, expect)))
            except UpdateRejected as exc:
                if exc.reason in ("unexpected_tensor", "wrong_shape"):
                    raise MergeInputError(
                        f"{partial.path} was made from a base with other tensors, shapes or dtypes than {base.path}: "
                        f"{exc.detail}"
                    ) from exc
                raise MergeInputError(f"{partial.path}: {exc.detail} ({exc.reason})") from exc
        self._covered = set().union(*covered)
        for i, names in enumerate(covered):
            lacking = sorted(self._covered - names)
            if lacking:
                j = next(k for k, other in enumerate(covered) if lacking[0] in other)
                stat = f"{lacking[0]}{STAT_SEPARATOR}{self.strategy.statistics[0]}"
                more = f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""
                raise MergeInputError(
                    f"partial {i + 1} {self._files[i].path} lacks tensor {stat!r}{more} that partial {j + 1} "
                    f"{self._files[j].path} has"
                )
        self.total_weight = sum(float(p.metadata["total_weight"]) for p in self._files)
        self.num_updates = sum(int(p.metadata["num_updates"]) for p in self._files)

    @property
    def files(self) -> list[PartialFile]:
        """The opened partial files, in the order given."""
        return list(self._files)

    def check_base(self, fingerprint_of_base: str) -> None:
        """Every partial must have been made against these base weights (same fingerprint)."""
        for partial in self._files:
            if partial.header.base_fingerprint != fingerprint_of_base:
                raise MergeInputError(
                    f"{partial.path} was made against other base weights than {self._base_path} (its base "
                    f"fingerprint {partial.header.base_fingerprint} is not the base's {fingerprint_of_base})"
                )

    def covers(self, name: str) -> bool:
        return name in self._covered

    def state_for(self, name: str, base_tensor: torch.Tensor) -> MergeState:
        state = self.strategy.new_state()
        for partial in self._files:
            with input_errors(str(partial.path)):
                state.combine(partial.state_of([name]))
        return state
