"""``fedfuse bench aggregate``: server-side aggregation time and memory against Flower and PEFT.

K updates of P fp32 parameters (split into a few tensors) are merged by fedfuse FedAvg, Fisher and
TIES — on dense updates and on sparse density-d updates (TIES-trimmed support, a ``SparseTensor``
per tensor; Fisher gets its diagonal on the same support, or dense for dense updates) — by Flower's
``aggregate_arrayrecords`` (the baseline: the FedAvg every Flower strategy calls) and by PEFT
``merge_utils.ties`` (majority "total", same density) and ``task_arithmetic``, per tensor.
The robust methods (median, trimmed mean, multi-Krum) run on dense updates: each update is spilled
to an unlinked file and merged chunk by chunk, so their rows show peak RSS against K (the file's
pages are the kernel's page cache, not the process's RSS).

Measurement rules
-----------------
- Every method × K runs in its own fresh ``python -c`` subprocess (fresh interpreter, fresh RSS).
- Updates come from a deterministic seeded generator *inside* the child: update k of tensor t is
  ``randn`` from a ``torch.Generator`` seeded by (seed, k, t); the Fisher diagonal is ``rand`` from
  its own seed; sparse updates are ``ties_trim`` of the same dense tensors. Every method merges the
  same numbers (the JSON records a checksum of each merge).
- fedfuse streams: it generates update k, times only ``state.add(...)`` and drops the update, then
  times ``finalize(release=True)`` once (as a server does at the end of a round), so its memory is
  one update in flight plus the state. Generating an update runs in ``meter.untracked()``: the
  scratch of drawing and trimming it (a server never has it) is left out of the peak, the update it
  leaves counts.
- Flower and PEFT take lists, so the child first builds the K updates (not timed: Flower's
  ``RecordDict``s of an ``ArrayRecord`` of numpy fp32 ``Array``s plus a ``MetricRecord`` with
  "num-examples"; PEFT's K torch tensors per parameter) and times the aggregation call alone.
- Peak-RSS growth: free heap memory is returned to the OS, the kernel's high-water mark is reset
  by writing "5" to ``/proc/self/clear_refs`` (a 5 ms ``VmRSS`` sampler where that fails), ``VmRSS``
  is read just before the timed/streamed section as baseline and ``VmHWM`` after; growth =
  VmHWM − baseline. For Flower and PEFT the baseline is taken after their inputs exist, so growth
  is the aggregation's own working memory; their "inputs held" column is the K updates they must
  hold on top of it, which fedfuse never holds.
- Weights: FedAvg, Fisher and Flower weight update k by its "num-examples"; TIES and PEFT use unit
  weights (where fedfuse TIES equals PEFT ``ties``).
- ``--device cuda``: fedfuse's state lives on the GPU (updates are produced on the CPU, as decoded
  from the wire, and moved by ``add``), PEFT's inputs are put on the GPU before timing, Flower stays
  on numpy; timed sections synchronize the device. "add GB/s" is the bytes of updates (values,
  indices, Fisher) passed to ``add`` divided by the time spent in ``add``.
- ``--threads N`` sets torch's intra-op threads in every child (fedfuse and PEFT; Flower's numpy
  code is single-threaded); 0 keeps torch's default. The JSON records what each child used.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal

import torch
import typer
from rich.console import Console

from fedfuse.algebra.sparse import SparseTensor, UpdateTensor
from fedfuse.algebra.sparsify import ties_trim
from fedfuse.bench.measure import Measurement, Meter, markdown_table, median, print_table, run_isolated
from fedfuse.strategies import get_strategy

MB = 1_000_000
WEIGHT_METRIC = "num-examples"
MEMORY_BUDGET_STATES = 5
"""fedfuse's memory target: growth ≤ this many P·4-byte arrays plus one update in flight."""


# --------------------------------------------------------------------------- deterministic updates


def tensor_sizes(params: int, tensors: int) -> dict[str, int]:
    """``tensors`` parameter names with near-equal sizes summing to ``params``."""
    if tensors < 1:
        raise ValueError(f"--tensors must be >= 1, got {tensors}")
    if params < tensors:
        raise ValueError(f"--params ({params}) must be at least --tensors ({tensors})")
    base, extra = divmod(params, tensors)
    return {f"layer{t}.weight": base + (1 if t < extra else 0) for t in range(tensors)}


def _generator(seed: int, k: int, t: int, salt: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(((seed * 1_000_003 + k) * 10_007 + t) * 4 + salt)


def dense_tensor(seed: int, k: int, t: int, numel: int) -> torch.Tensor:
    """Tensor ``t`` of update ``k``: a seeded N(0, 10⁻⁶) task vector."""
    return torch.randn(numel, generator=_generator(seed, k, t, 0)).mul_(1e-3)


def fisher_tensor(seed: int, k: int, t: int, numel: int) -> torch.Tensor:
    """Fisher diagonal of tensor ``t`` of update ``k``: seeded uniform [0, 1)."""
    return torch.rand(numel, generator=_generator(seed, k, t, 1))


def num_examples(k: int) -> int:
    """The "num-examples" of update ``k`` (deterministic, between 100 and 200)."""
    return 100 + (37 * k) % 101


def dense_update(seed: int, k: int, sizes: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Update ``k`` as dense fp32 tensors."""
    return {name: dense_tensor(seed, k, t, n) for t, (name, n) in enumerate(sizes.items())}


def sparse_update(
    seed: int, k: int, sizes: Mapping[str, int], density: float, with_fisher: bool
) -> tuple[dict[str, SparseTensor], dict[str, SparseTensor] | None]:
    """Update ``k`` TIES-trimmed to ``density`` (and its Fisher diagonal on the same support).

    Built one tensor at a time, so at most one dense tensor exists while it is made.
    """
    update: dict[str, SparseTensor] = {}
    fisher: dict[str, SparseTensor] | None = {} if with_fisher else None
    for t, (name, n) in enumerate(sizes.items()):
        trimmed = ties_trim(dense_tensor(seed, k, t, n), density)
        update[name] = trimmed
        if fisher is not None:
            values = fisher_tensor(seed, k, t, n)[trimmed.indices]
            fisher[name] = SparseTensor(indices=trimmed.indices, values=values, shape=trimmed.shape)
    return update, fisher


def update_nbytes(update: Mapping[str, Any], fisher: Mapping[str, Any] | None) -> int:
    """Bytes an update (values, indices, Fisher values) occupies; shared indices count once."""
    total = 0
    for name, tensor in update.items():
        if isinstance(tensor, SparseTensor):
            total += tensor.values.nbytes + tensor.indices.nbytes
        else:
            total += tensor.nbytes
        if fisher is not None:
            f = fisher[name]
            total += f.values.nbytes if isinstance(f, SparseTensor) else f.nbytes
    return total


def _checksum(merged: Mapping[str, Any]) -> float:
    return float(sum(torch.as_tensor(v).double().abs().sum() for v in merged.values()))


# --------------------------------------------------------------------------- the measured children


def _use_threads(config: Mapping[str, Any]) -> int:
    """Apply ``--threads`` (0 = torch's default) and return the intra-op thread count in use."""
    if config["threads"] > 0:
        torch.set_num_threads(config["threads"])
    return torch.get_num_threads()


def _device_hooks(device: str) -> tuple[Callable[[], None] | None, Callable[[], int]]:
    """The sync to time with and a reader of GPU allocated bytes (0 on CPU); initializes CUDA."""
    if device != "cuda":
        return None, lambda: 0
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.synchronize, torch.cuda.memory_allocated


def _gpu_peak_growth(device: str, allocated_before: int) -> int:
    return torch.cuda.max_memory_allocated() - allocated_before if device == "cuda" else 0


def run_fedfuse(meter: Meter, config: Mapping[str, Any]) -> dict[str, Any]:
    """Child: stream K generated updates through a fedfuse strategy, timing ``add`` and ``finalize``."""
    method = METHODS[config["method"]]
    sizes = tensor_sizes(config["params"], config["tensors"])
    seed, device = config["seed"], config["device"]
    threads = _use_threads(config)
    sync, gpu_allocated = _device_hooks(device)
    strategy = get_strategy(method.strategy, device=device)
    moved = largest_update = 0
    state = strategy.new_state()
    gpu_before = gpu_allocated()
    with meter.memory():
        for k in range(config["k"]):
            update: Mapping[str, UpdateTensor]
            fisher: Mapping[str, UpdateTensor] | None
            with meter.untracked():  # a server receives the update; it never draws or trims it
                if method.sparse:
                    update, fisher = sparse_update(seed, k, sizes, config["density"], method.fisher)
                else:
                    update = dense_update(seed, k, sizes)
                    fisher = None
                    if method.fisher:
                        fisher = {name: fisher_tensor(seed, k, t, n) for t, (name, n) in enumerate(sizes.items())}
            nbytes = update_nbytes(update, fisher)
            moved += nbytes
            largest_update = max(largest_update, nbytes)
            with meter.timed(sync):
                state.add(update, weight=float(num_examples(k)) if method.weighted else 1.0, fisher=fisher)
            del update, fisher
        add_seconds = meter.seconds
        with meter.timed(sync):
            merged = state.finalize(release=True)
    return {
        "add_seconds": add_seconds,
        "finalize_seconds": meter.seconds - add_seconds,
        "bytes_through_add": moved,
        "update_bytes": largest_update,
        "inputs_held_bytes": 0,
        "gpu_peak_growth_bytes": _gpu_peak_growth(device, gpu_before),
        "checksum": _checksum(merged),
        "threads": threads,
    }


def run_flower(meter: Meter, config: Mapping[str, Any]) -> dict[str, Any]:
    """Child: build K Flower ``RecordDict``s, then time ``aggregate_arrayrecords`` on them."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    sizes = tensor_sizes(config["params"], config["tensors"])
    threads = _use_threads(config)
    records = []
    for k in range(config["k"]):
        arrays = ArrayRecord({name: Array(t.numpy()) for name, t in dense_update(config["seed"], k, sizes).items()})
        metrics = MetricRecord({WEIGHT_METRIC: num_examples(k)})
        records.append(RecordDict({"arrays": arrays, "metrics": metrics}))
    held = sum(len(array.data) for record in records for array in record.array_records["arrays"].values())
    with meter.memory(), meter.timed():
        merged = aggregate_arrayrecords(records, WEIGHT_METRIC)
    return {
        "inputs_held_bytes": held,
        "update_bytes": held // config["k"],
        "checksum": _checksum({name: torch.from_numpy(array.numpy()) for name, array in merged.items()}),
        "threads": threads,
    }


def peft_merge_utils() -> ModuleType:
    """PEFT's ``peft.utils.merge_utils`` (the very file PEFT ships).

    Its functions are pure torch (the module imports only ``torch``, ``typing``, ``warnings``), so
    it is loaded from its file on its own: ``import peft`` also imports transformers, seconds per
    child that measure nothing. Falls back to the normal import if the file cannot load alone.
    """
    spec = importlib.util.find_spec("peft")
    if spec is None or spec.origin is None:
        raise RuntimeError("PEFT is not installed (pip install peft) but a peft-* method was asked for")
    path = Path(spec.origin).parent / "utils" / "merge_utils.py"
    file_spec = importlib.util.spec_from_file_location("_fedfuse_bench_peft_merge_utils", path)
    if file_spec is None or file_spec.loader is None:
        return importlib.import_module("peft.utils.merge_utils")
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except ImportError:
        return importlib.import_module("peft.utils.merge_utils")
    return module


def run_peft(meter: Meter, config: Mapping[str, Any]) -> dict[str, Any]:
    """Child: build the K tensors of each parameter, then time PEFT's merge called per tensor."""
    merge_utils = peft_merge_utils()
    method = METHODS[config["method"]]
    sizes = tensor_sizes(config["params"], config["tensors"])
    device, k_count = config["device"], config["k"]
    threads = _use_threads(config)
    sync, gpu_allocated = _device_hooks(device)
    per_tensor: dict[str, list[torch.Tensor]] = {name: [] for name in sizes}
    for k in range(k_count):
        for name, tensor in dense_update(config["seed"], k, sizes).items():
            per_tensor[name].append(tensor.to(device))
    weights = torch.ones(k_count, device=device)
    held = sum(t.nbytes for tensors in per_tensor.values() for t in tensors)
    gpu_before = gpu_allocated()
    with meter.memory(), meter.timed(sync):
        if method.peft == "ties":
            merged = {
                name: merge_utils.ties(tensors, weights, config["density"], majority_sign_method="total")
                for name, tensors in per_tensor.items()
            }
        else:
            merged = {name: merge_utils.task_arithmetic(tensors, weights) for name, tensors in per_tensor.items()}
    return {
        "inputs_held_bytes": held,
        "update_bytes": held // k_count,
        "gpu_peak_growth_bytes": _gpu_peak_growth(device, gpu_before),
        "checksum": _checksum(merged),
        "threads": threads,
    }


@dataclass(frozen=True)
class Method:
    """One benchmarked aggregation: who runs it, on what kind of update, and whether updates carry example weights."""

    name: str
    family: Literal["fedfuse", "flower", "peft"]
    runner: Callable[[Meter, Mapping[str, Any]], dict[str, Any]]
    strategy: str = ""
    sparse: bool = False
    fisher: bool = False
    weighted: bool = False
    peft: str = ""


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("fedfuse-fedavg-dense", "fedfuse", run_fedfuse, strategy="fedavg", weighted=True),
        Method("fedfuse-fedavg-sparse", "fedfuse", run_fedfuse, strategy="fedavg", sparse=True, weighted=True),
        Method("fedfuse-fisher-dense", "fedfuse", run_fedfuse, strategy="fisher", fisher=True, weighted=True),
        Method(
            "fedfuse-fisher-sparse", "fedfuse", run_fedfuse, strategy="fisher", sparse=True, fisher=True, weighted=True
        ),
        Method("fedfuse-ties-dense", "fedfuse", run_fedfuse, strategy="ties"),
        Method("fedfuse-ties-sparse", "fedfuse", run_fedfuse, strategy="ties", sparse=True),
        Method("fedfuse-median-dense", "fedfuse", run_fedfuse, strategy="median"),
        Method("fedfuse-trimmed-mean-dense", "fedfuse", run_fedfuse, strategy="trimmed_mean"),
        Method("fedfuse-multi-krum-dense", "fedfuse", run_fedfuse, strategy="multi_krum"),
        Method("flower-fedavg", "flower", run_flower),
        Method("peft-ties", "peft", run_peft, peft="ties"),
        Method("peft-task-arithmetic", "peft", run_peft, peft="task_arithmetic"),
    )
}
BASELINE = "flower-fedavg"


# --------------------------------------------------------------------------- running and reporting


@dataclass(frozen=True)
class BenchConfig:
    """What to run: K values, sizes, sparsity, repeats, device, methods."""

    ks: tuple[int, ...]
    params: int = 10_000_000
    tensors: int = 4
    density: float = 0.1
    repeat: int = 1
    device: str = "cpu"
    methods: tuple[str, ...] = tuple(METHODS)
    threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"--k needs positive integers, got {list(self.ks)}")
        tensor_sizes(self.params, self.tensors)
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"--density must be in (0, 1], got {self.density}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0 = torch's default), got {self.threads}")
        if self.repeat < 1:
            raise ValueError(f"--repeat must be >= 1, got {self.repeat}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available to this process (use --device cpu)")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown --methods {unknown or '(empty)'}; choose from: {', '.join(METHODS)}")

    @property
    def dense_bytes(self) -> int:
        """P·4: one dense fp32 copy of the parameters."""
        return self.params * 4


@dataclass(frozen=True)
class Row:
    """One method at one K: the median over repeats, plus every sample."""

    method: str
    k: int
    seconds: float
    rss_growth_bytes: int
    inputs_held_bytes: int
    update_bytes: int
    add_gbps: float | None
    gpu_peak_growth_bytes: int
    checksum: float
    threads: int
    peak_method: str
    samples_seconds: tuple[float, ...]
    samples_rss_growth_bytes: tuple[int, ...]


def _row(method: str, k: int, runs: Sequence[Measurement]) -> Row:
    extra = runs[0].extra
    gbps = None
    if "add_seconds" in extra:
        add_seconds = median([r.extra["add_seconds"] for r in runs])
        gbps = extra["bytes_through_add"] / add_seconds / 1e9 if add_seconds > 0 else math.inf
    return Row(
        method=method,
        k=k,
        seconds=median([r.seconds for r in runs]),
        rss_growth_bytes=int(median([r.rss_growth_bytes for r in runs])),
        inputs_held_bytes=int(extra.get("inputs_held_bytes", 0)),
        update_bytes=int(extra.get("update_bytes", 0)),
        add_gbps=gbps,
        gpu_peak_growth_bytes=int(median([r.extra.get("gpu_peak_growth_bytes", 0) for r in runs])),
        checksum=float(extra["checksum"]),
        threads=int(extra["threads"]),
        peak_method=runs[0].peak_method,
        samples_seconds=tuple(r.seconds for r in runs),
        samples_rss_growth_bytes=tuple(r.rss_growth_bytes for r in runs),
    )


def run_benchmark(
    config: BenchConfig, console: Console | None = None, runner: Callable[..., Measurement] = run_isolated
) -> list[Row]:
    """Every method × K × repeat, one at a time, rows ordered by K then method.

    ``runner`` is :func:`~fedfuse.bench.measure.run_isolated` (a fresh process per run, the
    benchmark's rule); :func:`~fedfuse.bench.measure.run_in_process` is for quick smoke runs.
    """
    rows = []
    for k in config.ks:
        for name in config.methods:
            child = {
                "method": name,
                "k": k,
                "params": config.params,
                "tensors": config.tensors,
                "density": config.density,
                "device": config.device,
                "threads": config.threads,
                "seed": config.seed,
            }
            runs = [runner(METHODS[name].runner, child, label=f"{name} K={k}") for _ in range(config.repeat)]
            rows.append(_row(name, k, runs))
            if console is not None:
                row = rows[-1]
                line = f"  {name} K={k}: {row.seconds:.4f} s, {row.rss_growth_bytes / MB:.1f} MB"
                console.print(line, highlight=False)
    return rows


@dataclass(frozen=True)
class Target:
    """One pass/fail goal; ``passed`` is None when the run lacked what it needs (SKIP)."""

    name: str
    passed: bool | None
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]

    def line(self) -> str:
        return f"{self.verdict}  {self.name}: {self.detail}"


def _by_key(rows: Sequence[Row]) -> dict[tuple[str, int], Row]:
    return {(r.method, r.k): r for r in rows}


def _speed_target(rows: Sequence[Row], name: str, fast: str, slow: str, factor: float, ks: Sequence[int]) -> Target:
    """``fast`` at least ``factor``× faster than ``slow`` at every K in ``ks``."""
    table = _by_key(rows)
    pairs = [(k, table[(fast, k)], table[(slow, k)]) for k in ks if (fast, k) in table and (slow, k) in table]
    if not pairs:
        return Target(name, None, f"needs {fast} and {slow} at K ∈ {list(ks)}")
    parts = [
        f"K={k}: {a.seconds:.3f} s vs {b.seconds:.3f} s → {b.seconds / a.seconds:.1f}× (need ≥ {factor:g}×)"
        for k, a, b in pairs
    ]
    passed = all(b.seconds >= factor * a.seconds for _, a, b in pairs)
    return Target(name, passed, "; ".join(parts))


def evaluate_targets(rows: Sequence[Row], config: BenchConfig) -> list[Target]:
    """The benchmark's targets (speed against Flower and PEFT, flat memory), checked on this run's numbers."""
    ks = sorted({r.k for r in rows})
    targets = [
        _speed_target(
            rows, "fedfuse TIES sparse ≤ 0.5× Flower FedAvg time, every K", "fedfuse-ties-sparse", BASELINE, 2.0, ks
        ),
        _speed_target(
            rows,
            "fedfuse TIES sparse ≥ 20× faster than PEFT ties at K=16",
            "fedfuse-ties-sparse",
            "peft-ties",
            20.0,
            [16],
        ),
        _speed_target(
            rows, "fedfuse dense FedAvg ≥ 2× faster than Flower, every K", "fedfuse-fedavg-dense", BASELINE, 2.0, ks
        ),
    ]
    fedfuse_rows = [r for r in rows if METHODS[r.method].family == "fedfuse"]
    name = f"fedfuse peak RSS flat in K (≤ {MEMORY_BUDGET_STATES}·P·4 B + one update)"
    if not fedfuse_rows:
        targets.append(Target(name, None, "no fedfuse method in this run"))
        return targets
    over = []
    worst = 0.0
    for r in fedfuse_rows:
        budget = MEMORY_BUDGET_STATES * config.dense_bytes + r.update_bytes
        worst = max(worst, r.rss_growth_bytes / budget)
        if r.rss_growth_bytes > budget:
            over.append(f"{r.method} K={r.k} {r.rss_growth_bytes / MB:.0f} MB > {budget / MB:.0f} MB")
    by_method: dict[str, list[int]] = {}
    for r in fedfuse_rows:
        by_method.setdefault(r.method, []).append(r.rss_growth_bytes)
    spread = max(max(g) - min(g) for g in by_method.values())
    detail = f"worst growth/budget {worst:.2f}; widest spread over K {spread / MB:.0f} MB"
    detail += f"; over: {', '.join(over)}" if over else ""
    targets.append(Target(name, not over, detail))
    return targets


COLUMNS = (
    "method",
    "K",
    "time (s)",
    "× Flower",
    "RSS growth (MB)",
    "growth/(P·4B)",
    "inputs held (MB)",
    "add GB/s",
)


def table_rows(rows: Sequence[Row], config: BenchConfig) -> list[list[str]]:
    """Formatted cells, one list per row, in :data:`COLUMNS` order (plus GPU peak on CUDA)."""
    baseline = {r.k: r.seconds for r in rows if r.method == BASELINE}
    out = []
    for r in rows:
        ratio = f"{r.seconds / baseline[r.k]:.3f}" if r.k in baseline and baseline[r.k] > 0 else "—"
        held = f"{r.inputs_held_bytes / MB:.1f}"
        cells = [
            r.method,
            str(r.k),
            f"{r.seconds:.4f}",
            ratio,
            f"{r.rss_growth_bytes / MB:.1f}",
            f"{r.rss_growth_bytes / config.dense_bytes:.2f}",
            held,
            "—" if r.add_gbps is None else f"{r.add_gbps:.2f}",
        ]
        if config.device == "cuda":
            cells.append(f"{r.gpu_peak_growth_bytes / MB:.1f}")
        out.append(cells)
    return out


def footnotes(rows: Sequence[Row], config: BenchConfig) -> list[str]:
    """What the columns mean and how they were measured (printed under the table)."""
    methods = sorted({r.peak_method for r in rows})
    threads = sorted({r.threads for r in rows})
    return [
        f"P = {config.params:,} fp32 parameters in {config.tensors} tensors; sparse = TIES-trimmed to "
        f"d = {config.density}; device {config.device}; torch threads {', '.join(map(str, threads))}; "
        f"median of {config.repeat} run(s), each in a fresh process.",
        "Peak-RSS growth = VmHWM − VmRSS read just before the measured section (high-water mark reset via "
        f"/proc/self/clear_refs; peak read by: {', '.join(methods)}).",
        "fedfuse rows stream: the section generates each update, folds it with add() and drops it, so growth = "
        "state + one update in flight + merged output (drawing and trimming an update is left out of the peak: "
        "a server never does it); time counts only add() and finalize(release=True).",
        "Flower and PEFT rows take lists: their K updates are built first (not timed, not in growth), so growth is "
        "the aggregation's own working memory; 'inputs held' is the K updates they must also hold — fedfuse never "
        "holds them.",
        "Flower's time includes Array.numpy() (np.load of each serialized array) because that is how "
        "aggregate_arrayrecords reads its inputs; PEFT ties' time includes its own magnitude pruning (fedfuse's "
        "trim ran on the clients, before the server). add GB/s = update bytes passed to add() / time in add().",
    ]


def to_json(rows: Sequence[Row], targets: Sequence[Target], config: BenchConfig) -> dict[str, Any]:
    """Everything the run measured, with its configuration and environment."""
    import flwr
    import peft

    return {
        "benchmark": "aggregate",
        "config": {**asdict(config), "ks": list(config.ks), "methods": list(config.methods)},
        "environment": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "torch": torch.__version__,
            "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "unknown",
            "peft": peft.__version__,
            "cpu_threads": torch.get_num_threads(),
        },
        "rows": [asdict(r) for r in rows],
        "targets": [asdict(t) for t in targets],
    }


def to_markdown(rows: Sequence[Row], targets: Sequence[Target], config: BenchConfig) -> str:
    """The table, its footnotes and the target lines as markdown."""
    columns = list(COLUMNS) + (["GPU peak growth (MB)"] if config.device == "cuda" else [])
    parts: list[str] = [
        "# fedfuse bench aggregate",
        "",
        markdown_table(columns, table_rows(rows, config)),
        "",
        *(f"- {note}" for note in footnotes(rows, config)),
        "",
        *(f"- **{t.verdict}** {t.name}: {t.detail}" for t in targets),
        "",
    ]
    return "\n".join(parts)


def _console() -> Console:
    """The terminal's width on a terminal; 132 columns when piped, so the table does not wrap."""
    return Console() if sys.stdout.isatty() else Console(width=132)


def report(rows: Sequence[Row], config: BenchConfig, out: Path, console: Console | None = None) -> list[Target]:
    """Print the table, footnotes and target lines; write ``aggregate.md`` and ``aggregate.json`` to ``out``."""
    console = console or _console()
    targets = evaluate_targets(rows, config)
    columns = list(COLUMNS) + (["GPU peak growth (MB)"] if config.device == "cuda" else [])
    notes = [*(f"* {n}" for n in footnotes(rows, config)), *(t.line() for t in targets)]
    print_table("Server-side aggregation", columns, table_rows(rows, config), notes, console)
    out.mkdir(parents=True, exist_ok=True)
    (out / "aggregate.md").write_text(to_markdown(rows, targets, config))
    (out / "aggregate.json").write_text(json.dumps(to_json(rows, targets, config), indent=2))
    console.print(f"wrote {out / 'aggregate.md'} and {out / 'aggregate.json'}", highlight=False)
    return targets


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"--k must be a comma list of integers such as 4,16,64, got {text!r}") from None


def aggregate(
    k: Annotated[str, typer.Option("--k", help="Comma list of update counts K.")] = "4,16,64",
    params: Annotated[int, typer.Option("--params", help="Parameters P per update (fp32).")] = 10_000_000,
    tensors: Annotated[int, typer.Option("--tensors", help="Tensors the P parameters are split into.")] = 4,
    density: Annotated[
        float, typer.Option("--density", help="Kept fraction d of the sparse updates and PEFT ties.")
    ] = 0.1,
    repeat: Annotated[int, typer.Option("--repeat", help="Fresh-process runs per method and K (median reported).")] = 1,
    device: Annotated[
        str, typer.Option("--device", help="cpu, or cuda (fedfuse state and PEFT inputs on the GPU).")
    ] = "cpu",
    methods: Annotated[str, typer.Option("--methods", help=f"Comma list or 'all': {', '.join(METHODS)}.")] = "all",
    threads: Annotated[
        int, typer.Option("--threads", help="torch intra-op threads per run (0 = torch's default).")
    ] = 0,
    out: Annotated[Path, typer.Option("--out", help="Folder for aggregate.md and aggregate.json.")] = Path(
        "bench-results/aggregate"
    ),
) -> None:
    """Time and peak-RSS growth of server-side aggregation: fedfuse vs Flower vs PEFT, per K."""
    names = tuple(METHODS) if methods.strip() == "all" else tuple(m.strip() for m in methods.split(",") if m.strip())
    try:
        config = BenchConfig(
            ks=_parse_ks(k),
            params=params,
            tensors=tensors,
            density=density,
            repeat=repeat,
            device=device,
            methods=names,
            threads=threads,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    console = _console()
    console.print(f"fedfuse bench aggregate: {len(config.methods)} method(s) × K={list(config.ks)}", highlight=False)
    report(run_benchmark(config, console), config, out, console)


if __name__ == "__main__":
    typer.run(aggregate)
