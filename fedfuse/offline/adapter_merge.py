"""``fedfuse merge --adapter``: merge PEFT LoRA adapters exactly in ΔW space, into a model or an adapter.

Each adapter's ΔWₖ per target module (:mod:`fedfuse.offline.adapters`) goes through the same plan,
per-tensor loop and strategy as a model merge, so every registered method and sparsifier applies.
The output is the merged full model (base + merged ΔW, written by the model merge's own sink), or,
with ``out_adapter``, a PEFT LoRA adapter: the best rank-``rank`` factors of each merged ΔW
(:func:`fedfuse.algebra.svd_refactor`, zero-padded where a module is narrower than ``rank``) with
``lora_alpha = rank`` (scale 1), plus the merged ``modules_to_save`` tensors. Its relative error
‖ΔW − B·A‖_F / ‖ΔW‖_F is reported per module (max and mean).

>>> from fedfuse.offline import merge_adapters
>>> # merge_adapters("base", ["ad-a", "ad-b"], method="ties", density=0.2, out="merged")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedfuse.algebra import apply_task_vector, svd_refactor
from fedfuse.algebra.lora import pad_factors
from fedfuse.checkpoints import TensorInfo, atomic_output
from fedfuse.offline.adapters import (
    ADAPTER_WEIGHTS,
    LORA_A_KEY,
    LORA_B_KEY,
    PEFT_KEY_PREFIX,
    AdapterSource,
    LoraModule,
)
from fedfuse.offline.errors import MergeInputError
from fedfuse.offline.execute import Progress, execute
from fedfuse.offline.plan import Output, PathLike, plan_merge
from fedfuse.offline.sinks import MergeResult, ModelSink
from fedfuse.offline.sources import base_layout, open_input
from fedfuse.strategies import MergeState, MergeStrategy, method_spec


@dataclass(frozen=True)
class AdapterMergeResult:
    """What an adapter output holds: its files, rank and the SVD truncation's relative errors."""

    out: Path
    files: list[Path]
    method: str
    num_updates: int
    num_modules: int
    rank: int
    max_error: float
    mean_error: float
    worst_module: str
    nbytes: int

    def summary(self) -> str:
        """One line for the terminal."""
        worst = f" ({self.worst_module})" if self.worst_module else ""
        return (
            f"wrote LoRA adapter to {self.out}: {self.method}, {self.num_updates} adapter(s), {self.num_modules} "
            f"module(s) at rank {self.rank}; relative error max {self.max_error:.3g}{worst}, mean {self.mean_error:.3g}"
        )


class AdapterSink:
    """Collects each merged ΔW's rank-``rank`` factors and the merged saved tensors; writes the adapter at the end.

    Only factors (r × (in + out) per module) and ``modules_to_save`` tensors are kept, never a ΔW.
    """

    def __init__(self, output: Output, strategy: MergeStrategy, source: AdapterSource, rank: int) -> None:
        self.output = output
        self._strategy = strategy
        self._source = source
        self._rank = rank
        self._tensors: dict[str, torch.Tensor] = {}
        self._errors: dict[str, float] = {}

    def write(self, name: str, base_tensor: torch.Tensor, state: MergeState | None) -> None:
        if state is None:
            return
        merged = state.finalize(base={name: base_tensor} if self._strategy.needs_base else None)
        module: LoraModule | None = self._source.lora_weights.get(name)
        if module is None:
            theta = apply_task_vector({name: base_tensor.to(self._strategy.device)}, merged)[name]
            self._tensors[PEFT_KEY_PREFIX + name] = theta.cpu().to(base_tensor.dtype).contiguous()
            return
        delta = merged[name].float().cpu()
        refactored = svd_refactor(delta.T if module.transpose else delta, self._rank)
        lora_a, lora_b = pad_factors(refactored.lora_a, refactored.lora_b, self._rank)
        prefix = PEFT_KEY_PREFIX + name.removesuffix(".weight")
        self._tensors[prefix + LORA_A_KEY] = lora_a.contiguous()
        self._tensors[prefix + LORA_B_KEY] = lora_b.contiguous()
        self._errors[name.removesuffix(".weight")] = refactored.relative_error

    def save(self, layout: Mapping[str, TensorInfo], base_path: Path) -> AdapterMergeResult:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` atomically into the output folder."""
        from peft import LoraConfig
        from safetensors.torch import save_file

        adapters = self._source.adapters
        config = LoraConfig(
            r=self._rank,
            lora_alpha=self._rank,
            target_modules=_target_modules(sorted(self._errors), layout),
            lora_dropout=0.0,
            bias="none",
            fan_in_fan_out=any(m.transpose for m in self._source.lora_weights.values()),
            modules_to_save=sorted({m for a in adapters for m in a.config.get("modules_to_save") or []}) or None,
            task_type=_agreed([a.config.get("task_type") for a in adapters]),
            base_model_name_or_path=_agreed([a.base_model for a in adapters]) or str(base_path),
        )
        target = self.output.target
        with atomic_output(target, directory=True, overwrite=self.output.force) as temp:
            config.save_pretrained(str(temp))
            save_file(self._tensors, str(temp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        files = sorted(p for p in target.iterdir() if p.is_file())
        errors = self._errors
        worst = max(errors, key=lambda m: errors[m]) if errors else ""
        return AdapterMergeResult(
            out=target,
            files=files,
            method=self._strategy.name,
            num_updates=len(adapters),
            num_modules=len(errors),
            rank=self._rank,
            max_error=errors[worst] if errors else 0.0,
            mean_error=sum(errors.values()) / len(errors) if errors else 0.0,
            worst_module=worst,
            nbytes=sum(p.stat().st_size for p in files),
        )


def _agreed(values: Sequence[Any]) -> Any:
    """The one value every adapter gives (None where they differ or none gives one)."""
    given = {v for v in values if v}
    return given.pop() if len(given) == 1 else None


def _target_modules(modules: list[str], layout: Mapping[str, TensorInfo]) -> list[str]:
    """The leaf names (``q_proj``, …) when they pick exactly ``modules`` in the base, else the full module names."""
    leaves = {m.rsplit(".", 1)[-1] for m in modules}
    matrices = [
        name[: -len(".weight")] for name, info in layout.items() if name.endswith(".weight") and len(info.shape) == 2
    ]
    picked = {m for m in matrices if m.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if picked == set(modules) else modules


def _check_adapter_options(
    adapters: Sequence[PathLike],
    method: str | None,
    weights: Sequence[float] | None,
    out_adapter: bool,
    rank: int | None,
    partial_out: PathLike | None,
) -> None:
    if not adapters:
        raise MergeInputError("give at least one PEFT LoRA adapter folder to merge (--adapter)")
    if weights and len(weights) != len(adapters):
        raise MergeInputError(
            f"got {len(weights)} weight(s) for {len(adapters)} adapter(s): give one --weight per --adapter, or none"
        )
    if partial_out is not None:
        raise MergeInputError("--partial-out is not supported with --adapter: merge into --out")
    if out_adapter and rank is None:
        raise MergeInputError("--out-adapter needs --rank (the rank of the merged adapter's factors)")
    if rank is not None and not out_adapter:
        raise MergeInputError("--rank applies only with --out-adapter (the merged full model needs no rank)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MergeInputError(f"--rank must be an integer >= 1, got {rank!r}")
    if method:
        try:
            spec = method_spec(method)
        except (KeyError, ValueError):
            return  # the plan names the available methods
        if spec.needs_fisher:
            raise MergeInputError(f"method {method!r} needs Fisher diagonals, which LoRA adapters do not carry")
        if spec.needs_gram:
            raise MergeInputError(
                f"method {method!r} needs Gram matrices of each model's inputs: merge the models with --model and "
                "--gram (fedfuse grams computes them), not adapters"
            )


def merge_adapters(
    base: PathLike,
    adapters: Sequence[PathLike],
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
    out: PathLike | None = None,
    out_adapter: bool = False,
    rank: int | None = None,
    max_shard_size: str | int = "5GB",
    partial_out: PathLike | None = None,
    force: bool = False,
    progress: Progress | None = None,
    first_model_index: int = 0,
    allow_non_finite: bool = False,
) -> MergeResult | AdapterMergeResult:
    """Merge PEFT LoRA adapters of ``base`` in ΔW space into a model folder, or (``out_adapter``) an adapter.

    Parameters
    ----------
    base : path
        The base checkpoint every adapter was trained on (a ``.safetensors`` file or an HF model folder).
    adapters : list of path
        PEFT LoRA adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``); ranks,
        alphas, ``use_rslora`` and target modules may differ between them.
    method, weights, density, sparsifier, sparsifier_options, lam, seed, device, dtype, vote, params
        As for :func:`fedfuse.offline.merge_models` (one weight per adapter; DARE seeds per adapter
        index as per model index). Methods needing Fisher diagonals are refused.
    out : path
        The output folder: the merged model (as :func:`~fedfuse.offline.merge_models` writes it) or
        the merged adapter.
    out_adapter : bool
        Write a PEFT LoRA adapter of rank ``rank`` instead of the full model.
    rank : int, optional
        The merged adapter's rank (required with, and only with, ``out_adapter``).
    max_shard_size, force, progress, first_model_index, allow_non_finite
        As for :func:`~fedfuse.offline.merge_models`.
    partial_out : path, optional
        Not supported for adapters (refused).

    Returns
    -------
    MergeResult or AdapterMergeResult
        The model written, or the adapter with its SVD relative errors (max and mean over modules).

    Raises
    ------
    MergeInputError
        For any bad input (missing ``adapter_config.json``, DoRA, shapes that do not fit the base, …),
        before anything is written.
    """
    _check_adapter_options(adapters, method, weights, out_adapter, rank, partial_out)
    plan = plan_merge(
        base,
        adapters,
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
        out=out,
        max_shard_size=max_shard_size,
        force=force,
        first_model_index=first_model_index,
        allow_non_finite=allow_non_finite,
    )
    with ExitStack() as stack:
        base_ckpt = open_input(stack, "base", plan.base)
        layout = base_layout(base_ckpt)
        source = AdapterSource(stack, plan, base_ckpt, layout)
        if out_adapter:
            assert rank is not None
            sink = AdapterSink(plan.output, plan.strategy, source, rank)
            changed = {name: info for name, info in layout.items() if source.covers(name)}
            execute(base_ckpt, changed, source, sink, progress or None)
            return sink.save(layout, plan.base)
        model_sink = ModelSink(plan.output, base_ckpt, layout, plan.strategy, len(plan.models))
        with model_sink:
            execute(base_ckpt, layout, source, model_sink, progress or None)
        return model_sink.result()
