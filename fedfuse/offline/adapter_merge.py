"""``fedfuse merge adapters``: merge PEFT LoRA adapters exactly in ΔW space, into a model or an adapter.

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
from fedfuse.offline.execute import Progress, execute
from fedfuse.offline.plan import Output, PathLike, plan_merge
from fedfuse.offline.request import AdaptersRequest, RequestError, as_request
from fedfuse.offline.sinks import MergeResult, ModelSink
from fedfuse.offline.sources import base_layout, open_input
from fedfuse.strategies import MergeState, MergeStrategy


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
        merged = state.finalize(base={name: base_tensor} if self._strategy.capabilities.needs_base else None)
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


def merge_adapters(
    base: AdaptersRequest | PathLike,
    adapters: Sequence[PathLike] = (),
    /,
    *,
    progress: Progress | None = None,
    **fields: Any,
) -> MergeResult | AdapterMergeResult:
    """Merge PEFT LoRA adapters of ``base`` in ΔW space into a model folder, or (``out_adapter``) an adapter.

    ``merge_adapters(request)`` runs an :class:`~fedfuse.offline.request.AdaptersRequest`;
    ``merge_adapters(base, adapters, method="ties", density=0.2, out="merged")`` builds one from its
    fields (the method fields as for :func:`fedfuse.offline.merge_models`, one weight per adapter, DARE
    seeds per adapter index; ``out_adapter`` with ``rank`` writes an adapter). Adapters are PEFT LoRA
    folders (``adapter_config.json`` + ``adapter_model.safetensors``); ranks, alphas, ``use_rslora`` and
    target modules may differ between them. Methods needing Fisher diagonals or Gram matrices, and
    ``partial_out``, are refused.

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
    request = as_request(AdaptersRequest, base, "base", {"adapters": adapters, **fields} if adapters else fields)
    if request.diagnose:
        raise RequestError("{diagnose} writes a report, not a model: call fedfuse.offline.diagnose_adapters")
    plan = plan_merge(request)
    with ExitStack() as stack:
        base_ckpt = open_input(stack, "base", plan.base)
        layout = base_layout(base_ckpt)
        source = AdapterSource(stack, plan, base_ckpt, layout)
        if request.out_adapter:
            assert request.rank is not None
            sink = AdapterSink(plan.output, plan.strategy, source, request.rank)
            changed = {name: info for name, info in layout.items() if source.covers(name)}
            execute(base_ckpt, changed, source, sink, progress or None)
            return sink.save(layout, plan.base)
        model_sink = ModelSink(plan.output, base_ckpt, layout, plan.strategy, len(plan.models))
        with model_sink:
            execute(base_ckpt, layout, source, model_sink, progress or None)
        return model_sink.result()
