"""``fedfuse merge … --diagnose``: mergeability diagnostics of the inputs of a merge, writing no model.

The inputs are read as a merge reads them — each model's task vector τ = θ − θ_base (or each adapter's ΔW),
sparsified as the merge would, tensor by tensor — and each goes into one fixed-size sketch
(:class:`~fedfuse.algebra.diagnostics.MergeDiagnostics`); the merge the request describes is computed tensor by
tensor too and sketched, never written. The report (norms, cosines to the merge and between inputs,
sign-conflict mass, magnitude disparity, outlier scores) is returned and, with ``out``, written as
``diagnostics.json``, ``diagnostics.md`` and ``diagnostics.png`` into that folder. Each input tensor is read
twice (once for the merge, once for its own sketch); memory stays at one tensor plus K sketches.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedfuse.algebra import dare_seed_fn, sparsify_update, task_vector
from fedfuse.algebra.diagnostics import DiagnosticsReport, MergeDiagnostics, heatmap_figure
from fedfuse.algebra.sketch import DEFAULT_DIM, DEFAULT_SAMPLES, UpdateSketch
from fedfuse.checkpoints import CheckpointReader, TensorInfo, atomic_output, check_target
from fedfuse.offline.adapters import AdapterSource
from fedfuse.offline.errors import input_errors
from fedfuse.offline.execute import Progress, execute
from fedfuse.offline.plan import MergePlan, PathLike, check_not_an_input, plan_merge
from fedfuse.offline.request import AdaptersRequest, ModelsRequest, RequestError, as_request
from fedfuse.offline.sources import ModelSource, open_input
from fedfuse.strategies import MergeState

DIAGNOSTICS_FILES = ("diagnostics.json", "diagnostics.md", "diagnostics.png")
"""What ``--diagnose`` writes into ``out``."""

DEFAULT_METHOD = "task_arithmetic"
"""The merge the inputs are compared with when no method is given: Σ wₖ·τₖ."""

DeltaOf = Callable[[str, torch.Tensor], torch.Tensor]
"""``delta(name, base_tensor)``: one input's change to tensor ``name``, as the merge folds it."""


@dataclass(frozen=True)
class DiagnosisResult:
    """A diagnosis: the report, the merge it describes, and the files written (none without ``out``)."""

    report: DiagnosticsReport
    method: str
    inputs: tuple[Path, ...]
    out: Path | None
    files: tuple[Path, ...]

    def to_json(self) -> dict[str, Any]:
        """The report's JSON with the merge it was made for (what ``diagnostics.json`` holds)."""
        return {"method": self.method, "inputs": [str(p) for p in self.inputs], **self.report.to_json()}


class _SketchSink:
    """A sink that writes nothing: it sketches each merged tensor and each input's change to it."""

    def __init__(self, deltas: Sequence[DeltaOf], sketches: Sequence[UpdateSketch], merged: UpdateSketch) -> None:
        self._deltas, self._sketches, self._merged = deltas, sketches, merged

    def write(self, name: str, base_tensor: torch.Tensor, state: MergeState | None) -> None:
        if state is None:
            return
        strategy = state.strategy
        merged = state.finalize(base={name: base_tensor} if strategy.capabilities.needs_base else None)
        self._merged.add_tensor(name, merged[name])
        del merged, state
        for delta_of, sketch in zip(self._deltas, self._sketches, strict=True):
            sketch.add_tensor(name, delta_of(name, base_tensor))


def _labels(paths: Sequence[Path]) -> list[str]:
    """Each input's label: its file or folder name (numbered when two share one)."""
    names = [path.stem if path.suffix == ".safetensors" else path.name for path in paths]
    return [f"{i + 1}:{name}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def _model_deltas(stack: ExitStack, plan: MergePlan) -> list[DeltaOf]:
    """Each model's sparsified τ of a tensor, as :class:`ModelSource` folds it."""
    deltas: list[DeltaOf] = []
    for i, path in enumerate(plan.models):
        ckpt = open_input(stack, f"model {i + 1}", path)
        seed_fn = dare_seed_fn(plan.seed, 0, plan.first_model_index + i)

        def delta(name: str, base: torch.Tensor, ckpt: CheckpointReader = ckpt, i: int = i, seed_fn: Any = seed_fn):
            tau = task_vector({name: ckpt.get(name)}, {name: base})
            return sparsify_update(tau, plan.settings_for(name).sparsifiers[i], seed_fn)[name]

        deltas.append(delta)
    return deltas


def _adapter_deltas(source: AdapterSource, plan: MergePlan) -> list[DeltaOf]:
    """Each adapter's sparsified ΔW of a tensor, as :class:`AdapterSource` folds it."""
    deltas: list[DeltaOf] = []
    for i, adapter in enumerate(source.adapters):
        seed_fn = dare_seed_fn(plan.seed, 0, plan.first_model_index + i)

        def delta(name: str, base: torch.Tensor, adapter: Any = adapter, seed_fn: Any = seed_fn) -> Any:
            return sparsify_update({name: adapter.delta(name, base)}, plan.sparsifier, seed_fn)[name]

        deltas.append(delta)
    return deltas


def _run(plan: MergePlan, adapters: bool, dim: int, samples: int, progress: Progress | None) -> DiagnosticsReport:
    """Sketch every input and the merge, tensor by tensor, through the merge's own loop."""
    with ExitStack() as stack:
        base = open_input(stack, "base", plan.base)
        layout = {name: base.info(name) for name in base.names}
        source: ModelSource | AdapterSource
        if adapters:
            source = adapter_source = AdapterSource(stack, plan, base, layout)
            deltas = _adapter_deltas(adapter_source, plan)
        else:
            source = ModelSource(stack, plan, base, layout)
            deltas = _model_deltas(stack, plan)
        merged_layout: dict[str, TensorInfo] = {
            name: info for name, info in layout.items() if info.is_floating_point and source.covers(name)
        }
        shapes = {name: tuple(info.shape) for name, info in merged_layout.items()}
        diagnostics = MergeDiagnostics(dim=dim, samples=samples, seed=plan.seed, shapes=shapes)
        sketches = [diagnostics.start(label, w) for label, w in zip(_labels(plan.models), plan.weights, strict=True)]
        merged = diagnostics.merged_sketch()
        execute(base, merged_layout, source, _SketchSink(deltas, sketches, merged), progress)
        return diagnostics.report(merged)


def _diagnose(
    request: ModelsRequest | AdaptersRequest, dim: int, samples: int, progress: Progress | None
) -> DiagnosisResult:
    if request.partial_out is not None:
        raise RequestError("{diagnose} writes a report into {out}, not partial statistics ({partial_out})")
    if request.out is not None:
        with input_errors():
            check_target(request.out, directory=True, overwrite=request.force)
        check_not_an_input(request.out, [request.base, *request.inputs])
    with tempfile.TemporaryDirectory() as scratch:  # the plan checks an output; the report folder is ours
        update = {"out": Path(scratch) / "report", "force": False, "method": request.method or DEFAULT_METHOD}
        plan = plan_merge(request.model_copy(update=update))
        report = _run(plan, isinstance(request, AdaptersRequest), dim, samples, progress)
    result = DiagnosisResult(report, plan.strategy.name, plan.models, request.out, ())
    if request.out is None:
        return result
    files = write_diagnostics(result, request.out, force=request.force)
    return DiagnosisResult(report, result.method, result.inputs, request.out, files)


def write_diagnostics(result: DiagnosisResult, out: PathLike, *, force: bool = False) -> tuple[Path, ...]:
    """Write ``diagnostics.json``, ``diagnostics.md`` and ``diagnostics.png`` into the folder ``out``, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    folder = Path(out)
    document = result.to_json()
    title = f"# Mergeability diagnostics: {result.method}, {len(result.inputs)} input(s)\n\n"
    with atomic_output(folder, directory=True, overwrite=force) as temp:
        temp.mkdir(parents=True, exist_ok=True)
        (temp / "diagnostics.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        (temp / "diagnostics.md").write_text(title + result.report.markdown() + "\n", encoding="utf-8")
        figure = heatmap_figure(document, f"{result.method}: pairwise cosines of the inputs (sketched)")
        FigureCanvasAgg(figure)
        figure.savefig(temp / "diagnostics.png", format="png", bbox_inches="tight")
    return tuple(folder / name for name in DIAGNOSTICS_FILES)


def diagnose_models(
    base: ModelsRequest | PathLike,
    models: Sequence[PathLike] = (),
    /,
    *,
    dim: int = DEFAULT_DIM,
    samples: int = DEFAULT_SAMPLES,
    progress: Progress | None = None,
    **fields: Any,
) -> DiagnosisResult:
    """Mergeability diagnostics of fine-tuned models of ``base`` under the merge the fields describe; no model.

    Takes what :func:`~fedfuse.offline.merge_models` takes (a request or its fields; ``out`` is the report
    folder, optional here). ``dim`` buckets per sketch (cosine error ≈ 1/√dim), ``samples`` coordinates
    sampled for sign conflicts. Raises :class:`~fedfuse.offline.MergeInputError` for bad inputs.
    """
    given: Mapping[str, Any] = {"models": models, **fields} if models else fields
    request = as_request(ModelsRequest, base, "base", {k: v for k, v in given.items() if k != "diagnose"})
    return _diagnose(request, dim, samples, progress)


def diagnose_adapters(
    base: AdaptersRequest | PathLike,
    adapters: Sequence[PathLike] = (),
    /,
    *,
    dim: int = DEFAULT_DIM,
    samples: int = DEFAULT_SAMPLES,
    progress: Progress | None = None,
    **fields: Any,
) -> DiagnosisResult:
    """Mergeability diagnostics of PEFT LoRA adapters of ``base`` (each adapter's ΔW), as :func:`diagnose_models`."""
    given: Mapping[str, Any] = {"adapters": adapters, **fields} if adapters else fields
    request = as_request(AdaptersRequest, base, "base", {k: v for k, v in given.items() if k != "diagnose"})
    if request.out_adapter:
        raise RequestError("{diagnose} writes a report into {out}, not an adapter ({out_adapter})")
    return _diagnose(request, dim, samples, progress)


__all__ = ["DIAGNOSTICS_FILES", "DiagnosisResult", "diagnose_adapters", "diagnose_models", "write_diagnostics"]
