"""``fedfuse bench secagg``: what SecAgg+ costs against plain merging, per node and on the server, and its accuracy.

**Cost** (in this process, no transport): for K sampled nodes (``--nodes``) each with a seeded random update
of the default model's frozen-A LoRA space (its B matrices and the head; ``--values N``: one tensor of N
values instead), one FedAvg round is run twice, paired in the same process:

- *plain*: each node encodes its update (:func:`fedfuse.wire.encode_update`): node time and bytes up are the
  encode and the payload; the server decodes and folds the K payloads through a round engine and finalizes.
- *secure*: each node computes its statistics (:func:`~fedfuse.rounds.secure_sum.node_statistics`), lays
  them out and encodes them in the ring, then answers the four SecAgg+ stages, round-tripping its state
  through ``to_state``/``from_state`` as a SuperNode does; the server runs the
  :class:`~fedfuse.secagg.aggregator.Aggregator` through every stage, unmasks, decodes the sum into one merge
  state, folds it and finalizes. Bytes are the stage records as :func:`fedfuse.server.secure_round.config_bytes`
  counts them (the metrics ``secagg-bytes-up``/``-down``): the masked vector, keys, the statistics' layout,
  ciphertexts, commitments, shares and node ids.
- *secure+drop*: the same with one node silent after sharing (the server recovers its masks).

Times are the best of ``--repeat`` runs (``time.perf_counter``); bytes are exact. Each bits setting
(``--bits``, default 0 and 40) picks the ring: 0 (the run default) takes as many bits as keep a 32-bit ring
(32 − ⌈log₂(K + 1)⌉), 40 a 64-bit ring.

**Accuracy** (``--accuracy``, the default): two short default-task simulations, plain and ``secagg+``, with
frozen-A LoRA and FedAvg; their final accuracies and the difference in points.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from rich.console import Console

from fedfuse.bench.measure import markdown_table, print_table
from fedfuse.rounds import RoundEngine, RoundPolicy, UpdateSpace
from fedfuse.rounds.bounds import UpdateBounds
from fedfuse.rounds.secure_sum import StatisticsLayout, node_statistics
from fedfuse.secagg.aggregator import Aggregator
from fedfuse.secagg.protocol import NodeSession, RoundSetup, SecAggParams
from fedfuse.server.secure_round import config_bytes
from fedfuse.strategies import get_strategy
from fedfuse.wire import DecodedUpdate, Expectation, UpdateHeader, decode_update, encode_update

RUN_ID = "bench-secagg"
BASE = "v:bench-secagg"
STRATEGY = "fedavg"
FROZEN_A = {"lora-aggregation": "frozen-a", "strategy": STRATEGY, "sparsifier": "none"}
"""The run config SecAgg+ needs with the default LoRA mode."""
SMALL_RUN = {"batch-size": 16, "eval-examples": 500, "fraction-evaluate": 0.0, "client-eval-examples": 0}
"""The accuracy runs' size: fits a few minutes on two CPU cores (server evaluation on 500 test examples)."""
TARGET_ACCURACY_POINTS = 0.5
TARGET_SERVER_RATIO = 2.0
TARGET_SERVER_AT = 16
COLUMNS = (
    "bits/ring",
    "K",
    "case",
    "k",
    "t",
    "values",
    "node ms",
    "server ms",
    "× plain",
    "up B/node",
    "× plain",
    "vector B",
    "overhead B",
    "B/(k·log₂K)",
    "down B/node",
    "error bound",
    "max |Δ|",
)
LEGEND = " ".join(
    (
        "bits per value / ring bits; K nodes; case secure+drop: one node silent after sharing, its masks removed",
        "from its neighbours' shares (bytes per surviving node); the graph degree k and threshold t; values in one",
        "node's vector; node ms per node (plain: encode; secure: statistics, layout, ring encoding and its four",
        "stages, state round-trips included); server ms per round (plain: decode and fold K payloads, finalize;",
        "secure: the aggregator's stages, unmasking, decoding the sum, fold, finalize); bytes up and down per node",
        "(plain: the payload; the model broadcast, the same for both, is left out); vector B: the masked vector in",
        "the ring; overhead B: the rest of a node's replies (keys, layout, ciphertexts, commitments, shares, ids);",
        "error bound: the fixed point's bound on each summed statistic; max |Δ|: the largest difference of the",
        "merged change from the plain merge of the same nodes.",
    )
)


@dataclass
class CostRow:
    """One measured case at one K and one bits setting."""

    bits: int
    ring_bits: int
    nodes: int
    case: str
    degree: int
    threshold: int
    values: int
    node_ms: float
    server_ms: float
    server_ratio: float
    bytes_up: float
    bytes_up_total: int
    bytes_ratio: float
    vector_bytes: int
    overhead_bytes: float
    overhead_per_k_log_n: float
    bytes_down: float
    error_bound: float
    max_error: float
    setup_bytes: int = 0
    """Of ``bytes_down``: the round setup riding on the train message (node list, graph seed, encoding, method)."""
    value_bits: int = 0
    """The bits per value the setting resolved to (``bits`` 0: as many as keep a 32-bit ring at this K)."""


@dataclass(frozen=True)
class Workload:
    """The update space every node's update lives in, and the tensors it sends."""

    space: UpdateSpace
    label: str

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name → shape of one node's update."""
        return dict(self.space.wire_shapes)

    @property
    def parameters(self) -> int:
        """Values in one node's update."""
        return sum(math.prod(shape) for shape in self.shapes.values())


def workload(values: int = 0) -> Workload:
    """The default model's frozen-A LoRA space (B matrices and the head), or one tensor of ``values`` values."""
    if values:
        return Workload(UpdateSpace.full({"layers.0.weight": (values,)}), f"one tensor of {values:,} values")
    from fedfuse.settings import RunSettings
    from fedfuse.training.run_model import lora_scale, update_shapes

    settings = RunSettings.from_run_config({}, **FROZEN_A)
    space = settings.update_space(update_shapes(settings), lora_scale(settings))
    return Workload(space, f"the default model's frozen-A LoRA update ({len(space.wire_shapes)} tensors)")


def node_ids(count: int, seed: int) -> list[int]:
    """``count`` distinct Flower-sized node ids (above 2**62), seeded."""
    rng = np.random.default_rng(seed)
    ids: set[int] = set()
    while len(ids) < count:
        ids.add(int(rng.integers(2**62, 2**63 - 1)))
    return sorted(ids)


def updates(work: Workload, nodes: Sequence[int], seed: int) -> dict[int, tuple[dict[str, torch.Tensor], int]]:
    """Each node's seeded random update (B-sized values, 0.01·N(0, 1)) and its example count (100..999)."""
    out = {}
    for i, node in enumerate(nodes):
        generator = torch.Generator().manual_seed(seed * 100_003 + i)
        tensors = {name: 0.01 * torch.randn(shape, generator=generator) for name, shape in work.shapes.items()}
        out[node] = (tensors, 100 + (37 * i + seed) % 900)
    return out


def header(node: int, examples: int) -> UpdateHeader:
    """The update header a node of the bench's round sends."""
    return UpdateHeader(RUN_ID, 1, BASE, f"node-{node}", num_examples=examples)


def _engine(space: UpdateSpace, policy: RoundPolicy) -> RoundEngine:
    return policy.engine(get_strategy(STRATEGY), space, round_number=1, run_id=RUN_ID, base_fingerprint=BASE)


def _max_error(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return max(float((a[name].double() - b[name].double()).abs().max()) for name in a)


def _best(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The last run's result with the smallest node and server times of all ``runs``."""
    best = dict(runs[-1])
    best["node_s"] = min(run["node_s"] for run in runs)
    best["server_s"] = min(run["server_s"] for run in runs)
    return best


def _interleaved(repeat: int, cases: Mapping[str, Callable[[], dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Every case once per repetition, in turn (so plain and secure share the machine's load), best of each."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, once in cases.items():
            runs[name].append(once())
    return {name: _best(measured) for name, measured in runs.items()}


def plain_round(work: Workload, inputs: Mapping[int, tuple[dict[str, torch.Tensor], int]]) -> dict[str, Any]:
    """One plain round: every node encodes, the server decodes, folds and finalizes (seconds, bytes, merge)."""
    started = time.perf_counter()
    payloads = [encode_update(tensors, header=header(node, n)) for node, (tensors, n) in inputs.items()]
    node_s = (time.perf_counter() - started) / len(payloads)
    started = time.perf_counter()
    engine = _engine(work.space, RoundPolicy(bind_senders=False))
    for payload in payloads:
        refused = engine.offer(payload)
        if refused is not None:
            raise RuntimeError(f"bench secagg: the plain engine refused an update: {refused.message}")
    merged = engine.merged_task_vector()
    server_s = time.perf_counter() - started
    sizes = [len(payload) for payload in payloads]
    return {"node_s": node_s, "server_s": server_s, "sizes": sizes, "merged": merged}


class _Clock:
    """Seconds spent per party (a node id, or "server")."""

    def __init__(self) -> None:
        self.seconds: dict[int | str, float] = defaultdict(float)

    def __call__(self, who: int | str, fn: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds[who] += time.perf_counter() - started


@dataclass
class _SecureRound:
    """One secure round driven in-process: nodes and server timed apart, every stage record's bytes counted."""

    work: Workload
    setup: RoundSetup
    decoded: Mapping[int, DecodedUpdate]
    clock: _Clock
    up: dict[int, int]
    down: dict[int, int]
    vectors: dict[int, np.ndarray]
    states: dict[int, dict[str, Any]]

    def node(self, node: int, stage: str, method: str, *args: Any) -> dict[str, Any]:
        """A later stage on ``node``: its state read back, ``session.method(*args)`` answered, the state kept."""

        def step() -> dict[str, Any]:
            session = NodeSession.from_state(self.states[node])
            reply: dict[str, Any] = getattr(session, method)(*args)
            self.states[node] = session.to_state()
            return reply

        reply = self.clock(node, step)
        self.up[node] += config_bytes({"stage": stage, **reply})
        return reply

    def request(self, node: int, stage: str, request: Mapping[str, Any]) -> None:
        """Count the bytes the server sends ``node`` for ``stage``."""
        self.down[node] += config_bytes({"stage": stage, **request})

    def advertise(self, node: int) -> tuple[dict[str, Any], str]:
        """Stage 1 on a node: statistics, layout, ring encoding, a fresh session; its reply and layout text."""

        def step() -> tuple[dict[str, Any], str]:
            bounds = UpdateBounds(0.0, RoundPolicy().max_num_examples, "num_examples")
            update = self.decoded[node]
            state = node_statistics(update, UpdateSpace.full(self.work.shapes), get_strategy(STRATEGY), bounds)
            layout = StatisticsLayout.of(state, {})
            self.vectors[node], _ = layout.encode(state, {}, self.setup.fixed)
            session = NodeSession(self.setup, node)
            self.states[node] = session.to_state()
            text = layout.describe()
            return {**session.advertise(), "layout": text, "node": str(update.header.node_id)}, text

        reply, text = self.clock(node, step)
        self.up[node] += config_bytes({"stage": "advertise", **reply})
        return reply, text


def _advertise_config(setup: RoundSetup) -> dict[str, Any]:
    """What the server's train message carries for stage 1 (beside the model broadcast)."""
    strategy = get_strategy(STRATEGY)
    spec = {
        "strategy": json.dumps(strategy.identity(), sort_keys=True),
        "weighting": "num_examples",
        "clip-norm": 0.0,
        "max-num-examples": RoundPolicy().max_num_examples,
    }
    return {"stage": "advertise", **setup.to_config(), **spec}


def secure_round(
    work: Workload,
    inputs: Mapping[int, tuple[dict[str, torch.Tensor], int]],
    decoded: Mapping[int, DecodedUpdate],
    bits: int,
    dropped: frozenset[int] = frozenset(),
) -> dict[str, Any]:
    """One SecAgg+ round (``dropped`` nodes silent after sharing): seconds, bytes per node, the merge, the setup."""
    clock = _Clock()
    nodes = list(inputs)
    setup = clock("server", RoundSetup.plan, RUN_ID, 1, nodes, SecAggParams(bits=bits), 1)
    run = _SecureRound(work, setup, decoded, clock, defaultdict(int), defaultdict(int), {}, {})
    aggregator: Aggregator = clock("server", Aggregator, setup)
    config = _advertise_config(setup)
    layouts = {}
    for node in nodes:
        run.request(node, "advertise", config)
        reply, layouts[node] = run.advertise(node)
        clock("server", aggregator.on_advertise, node, reply)
    layout = clock("server", _agreed_layout, layouts, work.space)
    for node, request in clock("server", aggregator.share_requests).items():
        run.request(node, "share", request)
        reply = run.node(node, "share", "share", request)
        clock("server", aggregator.on_share, node, reply)
    for node, request in clock("server", aggregator.mask_requests, layout.length).items():
        run.request(node, "mask", request)
        if node in dropped:
            continue
        reply = run.node(node, "mask", "masked_input", request, run.vectors[node])
        clock("server", aggregator.on_masked, node, reply)
    for node, request in clock("server", aggregator.unmask_requests).items():
        run.request(node, "unmask", request)
        reply = run.node(node, "unmask", "unmask", request)
        clock("server", aggregator.on_unmask, node, reply)
    merged = clock("server", _unmasked_merge, aggregator, layout, work.space)
    if aggregator.refusals:
        raise RuntimeError(f"bench secagg: the aggregator refused a reply: {aggregator.refusals[0].message}")
    survivors = [node for node in nodes if node not in dropped]
    return {
        "node_s": sum(clock.seconds[node] for node in nodes) / len(nodes),
        "server_s": clock.seconds["server"],
        "up": [run.up[node] for node in survivors],
        "down": [run.down[node] for node in survivors],
        "length": layout.length,
        "setup": aggregator.setup,
        "setup_bytes": config_bytes(config),
        "merged": merged,
    }


def _agreed_layout(layouts: Mapping[int, str], space: UpdateSpace) -> StatisticsLayout:
    """The server's layout check (as ``SecureRound._agree``): every node sent the same, fitting the round."""
    texts = set(layouts.values())
    if len(texts) != 1:
        raise RuntimeError("bench secagg: nodes sent different statistics layouts")
    layout = StatisticsLayout.from_description(texts.pop())
    layout.check(get_strategy(STRATEGY), space.merge_shapes)
    return layout


def _unmasked_merge(aggregator: Aggregator, layout: StatisticsLayout, space: UpdateSpace) -> dict[str, torch.Tensor]:
    """Unmask, decode the sum into one state, fold it and finalize: the server's last step."""
    result = aggregator.result()
    engine = _engine(space, RoundPolicy(bind_senders=False, secure_aggregation=SecAggParams()))
    state, _ = layout.to_state(engine.strategy, result.total, aggregator.setup.fixed, {})
    engine.fold_secure_sum(state, {f"node-{node}": {} for node in result.survivors})
    return engine.merged_task_vector()


def _decoded(inputs: Mapping[int, tuple[dict[str, torch.Tensor], int]], work: Workload) -> dict[int, DecodedUpdate]:
    """Each node's own update as the fedfuse ClientApp holds it before its secure stages (decoded, untimed)."""
    expect = Expectation(work.shapes)
    return {
        node: decode_update(encode_update(tensors, header=header(node, n)), expect=expect)
        for node, (tensors, n) in inputs.items()
    }


def _row(bits: int, case: str, plain: Mapping[str, Any], measured: Mapping[str, Any], max_error: float) -> CostRow:
    """A secure case's row against the plain round of the same nodes."""
    setup: RoundSetup = measured["setup"]
    degree = max(len(peers) for peers in setup.neighbours.values())
    vector = measured["length"] * setup.fixed.dtype.itemsize
    up = sum(measured["up"]) / len(measured["up"])
    plain_up = sum(plain["sizes"]) / len(plain["sizes"])
    count = len(setup.nodes)
    return CostRow(
        bits, setup.fixed.ring_bits, count, case, degree, setup.threshold, measured["length"],
        measured["node_s"] * 1e3, measured["server_s"] * 1e3, measured["server_s"] / plain["server_s"],
        up, sum(measured["up"]), up / plain_up, vector, up - vector,
        (up - vector) / (degree * math.log2(count)), sum(measured["down"]) / len(measured["down"]),
        setup.fixed.error_bound(len(measured["up"])), max_error, measured["setup_bytes"], setup.fixed.bits,
    )  # fmt: skip


def _plain_row(bits: int, work: Workload, plain: Mapping[str, Any]) -> CostRow:
    sizes = plain["sizes"]
    mean = sum(sizes) / len(sizes)
    return CostRow(
        bits, 0, len(sizes), "plain", 0, 0, work.parameters, plain["node_s"] * 1e3, plain["server_s"] * 1e3, 1.0,
        mean, sum(sizes), 1.0, 0, 0.0, 0.0, 0.0, 0.0, 0.0,
    )  # fmt: skip


def cost_rows(
    counts: Sequence[int],
    bits_grid: Sequence[int],
    *,
    values: int = 0,
    repeat: int = 3,
    seed: int = 0,
    work: Workload | None = None,
) -> list[CostRow]:
    """Plain, secure and secure-with-one-dropped rows for every K in ``counts`` and bits in ``bits_grid``."""
    work = work or workload(values)
    return [row for count in counts for row in _rows_at(work, count, bits_grid, repeat, seed)]


def _rows_at(work: Workload, count: int, bits_grid: Sequence[int], repeat: int, seed: int) -> list[CostRow]:
    """The rows of one K: plain, then secure and secure-with-one-dropped per bits setting, measured interleaved."""
    nodes = node_ids(count, seed + count)
    inputs = updates(work, nodes, seed)
    decoded = _decoded(inputs, work)
    late = frozenset({nodes[count // 2]})
    plain_survivors = plain_round(work, {node: inputs[node] for node in nodes if node not in late})["merged"]
    cases: dict[str, Callable[[], dict[str, Any]]] = {"plain": functools.partial(plain_round, work, inputs)}
    for bits in bits_grid:
        cases[f"secure {bits}"] = functools.partial(secure_round, work, inputs, decoded, bits)
        cases[f"drop {bits}"] = functools.partial(secure_round, work, inputs, decoded, bits, late)
    measured = _interleaved(repeat, cases)
    plain = measured["plain"]
    rows = []
    for bits in bits_grid:
        secure, recovered = measured[f"secure {bits}"], measured[f"drop {bits}"]
        rows.append(_plain_row(bits, work, plain))
        rows.append(_row(bits, "secure", plain, secure, _max_error(secure["merged"], plain["merged"])))
        error = _max_error(recovered["merged"], plain_survivors)
        rows.append(_row(bits, "secure+drop", plain, recovered, error))
    return rows


def _cells(row: CostRow) -> list[str]:
    secure = row.case != "plain"
    dash = "—"
    return [
        f"{row.value_bits}/{row.ring_bits}" if secure else "fp32",
        str(row.nodes),
        row.case,
        str(row.degree) if secure else dash,
        str(row.threshold) if secure else dash,
        f"{row.values:,}",
        f"{row.node_ms:.2f}",
        f"{row.server_ms:.1f}",
        f"{row.server_ratio:.2f}",
        f"{row.bytes_up:,.0f}",
        f"{row.bytes_ratio:.2f}",
        f"{row.vector_bytes:,}" if secure else dash,
        f"{row.overhead_bytes:,.0f}" if secure else dash,
        f"{row.overhead_per_k_log_n:.0f}" if secure else dash,
        f"{row.bytes_down:,.0f}" if secure else dash,
        f"{row.error_bound:.1e}" if secure else dash,
        f"{row.max_error:.1e}" if secure else dash,
    ]


def cost_targets(rows: Sequence[CostRow]) -> list[tuple[bool, str]]:
    """The server-time and bytes targets per bits setting, each with its measured numbers."""
    checks = []
    for bits in sorted({row.bits for row in rows}, reverse=True):
        secure = [r for r in rows if r.bits == bits and r.case == "secure"]
        at = [r for r in secure if r.nodes == TARGET_SERVER_AT] or [min(secure, key=lambda r: abs(r.nodes - 16))]
        ratio = at[0].server_ratio
        checks.append(
            (
                ratio <= TARGET_SERVER_RATIO,
                f"bits {bits or 'default'}: server time per round {ratio:.2f}× plain at K = {at[0].nodes} "
                f"(target ≤ {TARGET_SERVER_RATIO:.0f}× at K = {TARGET_SERVER_AT}, FedAvg)",
            )
        )
        checks.append(_bytes_target(bits, secure))
    return checks


def _bytes_target(bits: int, secure: Sequence[CostRow]) -> tuple[bool, str]:
    """Bytes per node ≤ plain + O(k·log n): the overhead scales so, and the masked vector is no larger than plain."""
    first, last = secure[0], secure[-1]
    scaling = last.overhead_per_k_log_n <= first.overhead_per_k_log_n * 1.05
    vector_ratio = max(r.vector_bytes / (r.bytes_up / r.bytes_ratio) for r in secure)
    overheads = ", ".join(f"K={r.nodes}: {r.overhead_bytes:,.0f} B (k={r.degree})" for r in secure)
    text = (
        f"bits {bits or 'default'}: bytes per node ≤ plain + O(k·log n): overhead beyond the masked vector "
        f"{overheads}; "
        f"per k·log₂K {first.overhead_per_k_log_n:.0f} → {last.overhead_per_k_log_n:.0f} B "
        f"({'not growing' if scaling else 'GROWING'}); the masked vector ({last.ring_bits}-bit ring) is "
        f"{vector_ratio:.2f}× the plain fp32 payload"
    )
    return scaling and vector_ratio <= 1.0, text


def accuracy_runs(clients: int, rounds: int, local_steps: int, folder: Path) -> dict[str, Any]:
    """Final accuracy of a default-task run plain and under SecAgg+ (frozen-A LoRA, FedAvg), and the gap."""
    from fedfuse.simulation import simulate

    common: dict[str, Any] = {**FROZEN_A, **SMALL_RUN, "num-server-rounds": rounds, "seed": 0}
    if local_steps:
        common["local-steps"] = local_steps
    out: dict[str, Any] = {"clients": clients, "settings": common}
    for name, extra in (("plain", {}), ("secure", {"secure-aggregation": "secagg+"})):
        started = time.perf_counter()
        history = simulate({**common, **extra, "output-dir": str(folder / name)}, num_clients=clients)
        last = history["rounds"][-1]
        out[name] = {
            "accuracy": float(last["accuracy"]),
            "by_round": [float(r["accuracy"]) for r in history["rounds"]],
            "loss": float(last.get("loss", float("nan"))),
            "accepted": [int(r.get("accepted", 0)) for r in history["rounds"]],
            "seconds": time.perf_counter() - started,
        }
    out["difference_points"] = 100 * (out["secure"]["accuracy"] - out["plain"]["accuracy"])
    return out


def accuracy_target(result: Mapping[str, Any]) -> tuple[bool, str]:
    """Secure final accuracy within ``TARGET_ACCURACY_POINTS`` points of plain."""
    gap = float(result["difference_points"])
    return (
        abs(gap) <= TARGET_ACCURACY_POINTS,
        f"final accuracy secure {result['secure']['accuracy']:.4f} vs plain {result['plain']['accuracy']:.4f}: "
        f"{gap:+.2f} points (target within {TARGET_ACCURACY_POINTS} points)",
    )


def _grid(text: str, what: str, low: int) -> list[int]:
    try:
        values = sorted({int(v) for v in text.replace(" ", "").split(",") if v})
    except ValueError:
        raise typer.BadParameter(f"{what}: a comma list of whole numbers, got {text!r}") from None
    if not values or values[0] < low:
        raise typer.BadParameter(f"{what}: give values of at least {low}, got {text!r}")
    return values


def report(
    rows: Sequence[CostRow], accuracy: Mapping[str, Any] | None, work_label: str, repeat: int, threads: int = 1
) -> tuple[list[str], list[tuple[bool, str]]]:
    """The notes under the table (targets as PASS/FAIL lines) and the targets themselves."""
    targets = cost_targets(rows)
    if accuracy is not None:
        targets.insert(0, accuracy_target(accuracy))
    notes = [f"{'PASS' if ok else 'FAIL'} {text}" for ok, text in targets]
    if accuracy is None:
        notes.append("accuracy not measured (--no-accuracy)")
    else:
        p, s = accuracy["plain"], accuracy["secure"]
        notes.append(
            f"accuracy by round: plain {' '.join(f'{a:.3f}' for a in p['by_round'])} (final loss {p['loss']:.4f}, "
            f"{p['seconds']:.0f} s); secure {' '.join(f'{a:.3f}' for a in s['by_round'])} (final loss "
            f"{s['loss']:.4f}, {s['seconds']:.0f} s); {accuracy['clients']} clients, {accuracy['settings']}"
        )
    largest = max((r for r in rows if r.case == "secure"), key=lambda r: r.nodes)
    notes.append(
        f"down B/node includes the round setup on the train message: {largest.setup_bytes:,} B of "
        f"{largest.bytes_down:,.0f} at K = {largest.nodes} "
        "(the node list, O(K) per node; nodes rebuild the graph from its degree and seed)"
    )
    notes.append(
        f"vector: {work_label}; FedAvg; times best of {repeat}, every case once per repetition in turn "
        f"(torch threads: {threads})"
    )
    return notes, targets


def _write(out: Path, rows: Sequence[CostRow], accuracy: Mapping[str, Any] | None, notes: Sequence[str]) -> None:
    load = os.getloadavg()[0]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), load average {load:.2f}"
    out.mkdir(parents=True, exist_ok=True)
    cells = [_cells(row) for row in rows]
    text = ["# fedfuse bench secagg", "", f"Machine: {machine}.", "", f"Columns: {LEGEND}", ""]
    text += [markdown_table(COLUMNS, cells), "", *[f"- {note}" for note in notes], ""]
    (out / "secagg.md").write_text("\n".join(text), encoding="utf-8")
    document = {"machine": machine, "rows": [asdict(r) for r in rows], "accuracy": accuracy, "notes": list(notes)}
    (out / "secagg.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def secagg(
    nodes: Annotated[str, typer.Option("--nodes", help="Comma list of sampled nodes K (≥ 4).")] = "4,16,64",
    values: Annotated[
        int, typer.Option("--values", help="Values per update (0: the default model's frozen-A LoRA update).", min=0)
    ] = 0,
    bits: Annotated[
        str, typer.Option("--bits", help="Comma list of fixed-point bits per value (0: the default, a 32-bit ring).")
    ] = "0,40",
    repeat: Annotated[int, typer.Option("--repeat", help="Timed runs per case (best reported).", min=1)] = 3,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random updates and node ids.")] = 0,
    accuracy: Annotated[
        bool, typer.Option("--accuracy/--no-accuracy", help="Also run the plain and secure simulations.")
    ] = True,
    clients: Annotated[int, typer.Option("--clients", help="Clients of the accuracy runs.", min=2)] = 4,
    rounds: Annotated[int, typer.Option("--rounds", help="Rounds of the accuracy runs.", min=1)] = 3,
    local_steps: Annotated[
        int, typer.Option("--local-steps", help="Local steps in the accuracy runs (0: the run default).", min=0)
    ] = 0,
    out: Annotated[Path, typer.Option("--out", help="Folder for secagg.md and secagg.json.")] = Path(
        "bench-results/secagg"
    ),
    check: Annotated[bool, typer.Option("--check", help="Exit with status 1 when a target fails.")] = False,
    threads: Annotated[
        int,
        typer.Option(
            "--threads", help="torch threads for the cost part (0: torch's default; 1 avoids OpenMP stalls).", min=0
        ),
    ] = 1,
) -> None:
    """SecAgg+ against plain merging: bytes and time per node and on the server, and final accuracy."""
    console = Console() if sys.stdout.isatty() else Console(width=180)
    counts, bits_grid = _grid(nodes, "--nodes", 4), _grid(bits, "--bits", 0)
    for value in bits_grid:
        try:
            SecAggParams(bits=value).resolved(counts[-1])  # a clear error before anything is measured
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    work = workload(values)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        rows = cost_rows(counts, sorted(bits_grid, reverse=True), repeat=repeat, seed=seed, work=work)
    finally:
        torch.set_num_threads(previous)
    measured = None
    if accuracy:
        with tempfile.TemporaryDirectory(prefix="fedfuse-bench-secagg-") as folder:
            measured = accuracy_runs(clients, rounds, local_steps, Path(folder))
    notes, targets = report(rows, measured, work.label, repeat, threads or previous)
    print_table("fedfuse bench secagg", COLUMNS, [_cells(row) for row in rows], notes, console)
    _write(out, rows, measured, notes)
    console.print(f"saved {out / 'secagg.md'}, {out / 'secagg.json'}")
    if check and not all(ok for ok, _ in targets):
        raise typer.Exit(code=1)
