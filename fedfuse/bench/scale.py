"""``fedfuse bench scale``: round time and the server's peak RSS against simulated institutions and sampled clients.

Two sweeps of ``fedfuse.simulation.simulate`` runs on Flower's simulation engine, each point in a fresh
``python -c`` process (:func:`fedfuse.bench.measure.run_isolated`):

- **clients**: N institutions (``--clients``, default 16, 64, 256, 1000), K = ``--sampled`` of them
  trained per round (``fraction-train = K/N``);
- **sampled**: N = ``--fixed-clients`` (default 256), K in ``--sampled-grid`` (default 4, 8, 16, 32, 64).

A point shared by both sweeps runs once. Every point trains the same way (LoRA rank 2, a few local steps,
no federated evaluation, server evaluation on ``--eval-examples`` test examples) on the built-in task, by
default with a tiny BERT (hidden size 16, one layer, the embedded MiniLM's tokenizer) built into
``<out>/tiny-bert``, so 1,000 clients fit on two cores; ``--model default`` uses the embedded MiniLM.

Per point: the median round time of rounds 2.. (report.json's ``seconds``; round 1 also starts Ray's
actors, loads the model in them and asks every node its name once), the accepted updates per round, and
the server process's peak RSS: Flower's simulation runs the ServerApp, the SuperLink's in-memory state
and the simulation engine's threads in the calling process (clients run in Ray worker processes), so the
child's kernel high-water mark (``VmHWM``, reset just before ``simulate``) is the server's peak. Also the
server process's CPU seconds and those of Flower's node-polling thread (``add_messages_to_queue``, which
asks the LinkState for each of the N nodes' messages every 100 ms). Ratios are against the smallest point
of the same sweep, measured in the same run. Checks: every round accepts exactly K updates; the peak RSS
of the largest point of each sweep is within ``FLAT_TARGET`` of its smallest (flat by design: the server
folds replies as they arrive and keeps no per-client state but names).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fedfuse.bench.measure import Meter, markdown_table, print_table, run_in_process, run_isolated
from fedfuse.simulation import simulate

FLAT_TARGET = 1.10
"""Largest point's peak RSS over the smallest's, per sweep, that still counts as flat."""
POLL_THREAD = "add_messages_to_queue"
"""The Flower simulation engine's thread that polls the LinkState for every node's messages."""
TINY = "tiny"
COLUMNS = (
    "sweep",
    "N",
    "K",
    "accepted",
    "round s",
    "×",
    "peak RSS MB",
    "×",
    "growth MB",
    "CPU s",
    "polling CPU s",
    "wall s",
)
LEGEND = (
    "N institutions, K sampled per round, updates accepted per round (rounds 2..), median round time of rounds "
    "2.., the server process's peak RSS and its growth during the simulation, the server process's CPU seconds "
    "and those of Flower's node-polling thread (whole run, round 1 included), the point's wall time; × is "
    "against the sweep's smallest point."
)


def tiny_bert(folder: Path) -> Path:
    """A seeded tiny BERT encoder (hidden 16, one layer) with the embedded MiniLM's tokenizer, saved once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fedfuse.models.loading import embedded_model_dir

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(), local_files_only=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


class _ThreadCpu(threading.Thread):
    """Samples the CPU seconds of this process's threads whose name contains ``name`` (kept after they end)."""

    def __init__(self, name: str, interval_s: float = 0.5) -> None:
        super().__init__(name="thread-cpu-sampler", daemon=True)
        self.pattern, self.interval_s = name, interval_s
        self.seconds: dict[int, float] = {}
        self._stop_event = threading.Event()

    def _sample(self) -> None:
        for thread in threading.enumerate():
            if self.pattern in thread.name and thread.ident is not None:
                try:
                    clock = time.pthread_getcpuclockid(thread.ident)
                    self.seconds[thread.ident] = time.clock_gettime(clock)
                except OSError:  # the thread ended since enumerate(): its last sample stands
                    pass

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self._sample()

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return sum(self.seconds.values())


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_point(meter: Meter, config: Mapping[str, Any]) -> dict[str, Any]:
    """One simulation (run in a fresh process): its rounds, and the server process's CPU and polling CPU."""
    polling = _ThreadCpu(POLL_THREAD)
    polling.start()
    before = _cpu_seconds()
    started = time.perf_counter()
    with meter.memory(), meter.timed():
        history = simulate(dict(config["overrides"]), num_clients=int(config["clients"]))
    cpu = _cpu_seconds() - before
    rounds = history["rounds"]
    return {
        "round_seconds": [float(r["seconds"]) for r in rounds],
        "accepted": [int(r["accepted"]) for r in rounds],
        "rejected": [int(r["rejected"]) for r in rounds],
        "server_cpu_seconds": cpu,
        "polling_cpu_seconds": polling.stop(),
        "wall_seconds": time.perf_counter() - started,
    }


def _grid(text: str, what: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.replace(" ", "").split(",") if v})
    except ValueError:
        raise typer.BadParameter(f"{what}: a comma list of whole numbers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise typer.BadParameter(f"{what}: every value must be at least 1, got {text!r}")
    return values


def _points(clients: list[int], sampled: int, fixed: int, sampled_grid: list[int]) -> dict[str, list[tuple[int, int]]]:
    sweeps = {"clients": [(n, sampled) for n in clients], "sampled": [(fixed, k) for k in sampled_grid]}
    sweeps = {name: points for name, points in sweeps.items() if points}
    too_many = [f"K={k} > N={n}" for points in sweeps.values() for n, k in points if k > n]
    if too_many:
        raise typer.BadParameter(f"cannot sample more clients than there are: {', '.join(too_many)}")
    if not sweeps:
        raise typer.BadParameter("nothing to measure: give --clients or --sampled-grid")
    return sweeps


def _row(sweep: str, n: int, k: int, point: dict[str, Any], smallest: dict[str, Any]) -> dict[str, Any]:
    return {
        "sweep": sweep,
        "clients": n,
        "sampled": k,
        **point,
        "round_ratio": point["median_round_seconds"] / smallest["median_round_seconds"],
        "rss_ratio": point["peak_rss_bytes"] / smallest["peak_rss_bytes"],
    }


def _cells(row: dict[str, Any]) -> list[str]:
    accepted = sorted(set(row["accepted"][1:] or row["accepted"]))
    mb = 1e6
    return [
        row["sweep"],
        f"{row['clients']:,}",
        str(row["sampled"]),
        "/".join(map(str, accepted)),
        f"{row['median_round_seconds']:.2f}",
        f"{row['round_ratio']:.2f}",
        f"{row['peak_rss_bytes'] / mb:,.0f}",
        f"{row['rss_ratio']:.3f}",
        f"{row['rss_growth_bytes'] / mb:,.0f}",
        f"{row['server_cpu_seconds']:.0f}",
        f"{row['polling_cpu_seconds']:.1f}",
        f"{row['wall_seconds']:.0f}",
    ]


def _checks(rows: list[dict[str, Any]]) -> list[tuple[bool, str]]:
    wrong = [
        f"N={r['clients']} K={r['sampled']}: accepted {r['accepted']}, rejected {r['rejected']}"
        for r in rows
        if any(a != r["sampled"] for a in r["accepted"]) or any(r["rejected"])
    ]
    checks = [(not wrong, "every round accepted exactly K updates" + (f" — not: {'; '.join(wrong)}" if wrong else ""))]
    for sweep, axis in (("clients", "N"), ("sampled", "K")):
        swept = [r for r in rows if r["sweep"] == sweep]
        if len(swept) > 1:
            last = swept[-1]
            checks.append(
                (
                    last["rss_ratio"] <= FLAT_TARGET,
                    f"peak RSS flat in {axis} ({sweep} sweep): {last['rss_ratio']:.3f}× at {axis} = "
                    f"{last['clients'] if axis == 'N' else last['sampled']:,} (target ≤ {FLAT_TARGET:.2f}×)",
                )
            )
    return checks


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sweeps = [s for s in ("clients", "sampled") if any(r["sweep"] == s for r in rows)]
    figure = Figure(figsize=(6.2 * len(sweeps), 4.4))
    FigureCanvasAgg(figure)
    for i, sweep in enumerate(sweeps, start=1):
        swept = [r for r in rows if r["sweep"] == sweep]
        key = "clients" if sweep == "clients" else "sampled"
        xs = [r[key] for r in swept]
        axis = figure.add_subplot(1, len(sweeps), i)
        axis.plot(xs, [r["median_round_seconds"] for r in swept], "o-", color="tab:blue")
        axis.set_xscale("log", base=2)
        axis.set_xticks(xs, [f"{x:,}" for x in xs])
        axis.set_ylim(bottom=0)
        axis.set_ylabel("median round time, rounds 2.. (s)", color="tab:blue")
        memory = axis.twinx()
        memory.plot(xs, [r["peak_rss_bytes"] / 1e6 for r in swept], "s--", color="tab:red")
        memory.set_ylim(bottom=0, top=1.25 * max(r["peak_rss_bytes"] / 1e6 for r in swept))
        memory.set_ylabel("server peak RSS (MB)", color="tab:red")
        if sweep == "clients":
            axis.set_xlabel(f"simulated institutions N (K = {swept[0]['sampled']} sampled per round)")
            axis.set_title("against institutions")
        else:
            axis.set_xlabel(f"clients sampled per round K (N = {swept[0]['clients']:,})")
            axis.set_title("against clients sampled per round")
    figure.suptitle("fedfuse bench scale: round time and the server's peak RSS")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def scale(
    clients: Annotated[
        str, typer.Option("--clients", help="Comma list of institutions N for the clients sweep ('' skips it).")
    ] = "16,64,256,1000",
    sampled: Annotated[
        int, typer.Option("--sampled", help="Clients sampled per round in the clients sweep.", min=1)
    ] = 8,
    fixed_clients: Annotated[
        int, typer.Option("--fixed-clients", help="Institutions N of the sampled sweep.", min=1)
    ] = 256,
    sampled_grid: Annotated[
        str, typer.Option("--sampled-grid", help="Comma list of clients sampled per round K ('' skips that sweep).")
    ] = "4,8,16,32,64",
    rounds: Annotated[int, typer.Option("--rounds", help="Server rounds per point (round 1 is warm-up).", min=2)] = 3,
    local_steps: Annotated[int, typer.Option("--local-steps", help="Local steps per client per round.", min=1)] = 2,
    eval_examples: Annotated[
        int, typer.Option("--eval-examples", help="Server evaluation examples per round.", min=1)
    ] = 64,
    model: Annotated[
        str, typer.Option("--model", help="'tiny' (a tiny BERT built into <out>), 'default' (MiniLM) or a folder.")
    ] = TINY,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds one point may take.", min=1)] = 3600.0,
    in_process: Annotated[
        bool, typer.Option("--in-process", help="Run points in this process (quick tests; memory indicative only).")
    ] = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="A small grid: N in 16,64 with K = 4, and K in 2,4 at N = 16.")
    ] = False,
    out: Annotated[Path, typer.Option("--out", help="Folder for scale.md, scale.json and scale.png.")] = Path(
        "bench-results/scale"
    ),
    check: Annotated[bool, typer.Option("--check", help="Exit with status 1 when a check fails.")] = False,
) -> None:
    """Median round time and the server's peak RSS against institutions N and clients sampled per round K."""
    console = Console() if sys.stdout.isatty() else Console(width=132)
    if quick:
        clients, sampled, fixed_clients, sampled_grid = "16,64", 4, 16, "2,4"
    sweeps = _points(_grid(clients, "--clients"), sampled, fixed_clients, _grid(sampled_grid, "--sampled-grid"))
    out.mkdir(parents=True, exist_ok=True)
    model_path = str(tiny_bert(out / "tiny-bert")) if model == TINY else model
    common: dict[str, Any] = {
        "model": model_path,
        "num-server-rounds": rounds,
        "local-steps": local_steps,
        "batch-size": 8,
        "max-length": 16,
        "lora-rank": 2,
        "eval-examples": eval_examples,
        "fraction-evaluate": 0.0,
        "client-eval-examples": 0,
        "min-train-nodes": 1,
        "seed": 0,
    }
    runner = run_in_process if in_process else run_isolated
    unique = sorted({p for points in sweeps.values() for p in points}, key=lambda p: (p[0], p[1]))
    console.print(f"{len(unique)} simulations of {rounds} rounds: {', '.join(f'N={n} K={k}' for n, k in unique)}")
    started = time.perf_counter()
    measured: dict[tuple[int, int], dict[str, Any]] = {}
    for n, k in unique:
        overrides = {**common, "fraction-train": k / n, "output-dir": str(out / "runs" / f"n{n}-k{k}")}
        result = runner(measure_point, {"clients": n, "overrides": overrides}, label=f"N={n} K={k}", timeout_s=timeout)
        point = dict(result.extra)
        point["median_round_seconds"] = statistics.median(point["round_seconds"][1:])
        point["rss_growth_bytes"] = result.rss_growth_bytes
        point["peak_rss_bytes"] = result.rss_baseline_bytes + result.rss_growth_bytes
        point["peak_method"] = result.peak_method
        measured[(n, k)] = point
        console.print(
            f"N={n:>5} K={k:>3}: rounds {' '.join(f'{s:.1f}' for s in point['round_seconds'])} s, accepted "
            f"{point['accepted']}, peak RSS {point['peak_rss_bytes'] / 1e6:,.0f} MB, {point['wall_seconds']:.0f} s"
        )
    total = time.perf_counter() - started
    rows = [
        _row(name, n, k, measured[(n, k)], measured[points[0]]) for name, points in sweeps.items() for n, k in points
    ]
    checks = _checks(rows)
    notes = [f"{'PASS' if ok else 'FAIL'} {text}" for ok, text in checks]
    notes.append(f"{len(unique)} simulations in {total:.0f} s")
    cells = [_cells(r) for r in rows]
    print_table("fedfuse bench scale", COLUMNS, cells, notes, console)
    settings = ", ".join(f"{key}={value}" for key, value in sorted(common.items()))
    (out / "scale.md").write_text(
        "\n".join(
            [
                "# fedfuse bench scale",
                "",
                f"{rounds} rounds per point, each in a {'shared' if in_process else 'fresh'} process; round 1 "
                "(Ray actors start, the model loads, the server asks every node its name) left out of the median. "
                f"Settings: {settings}.",
                "",
                f"Columns: {LEGEND}",
                "",
                markdown_table(COLUMNS, cells),
                "",
                *[f"- {note}" for note in notes],
                "",
            ]
        )
    )
    (out / "scale.json").write_text(
        json.dumps(
            {
                "settings": common,
                "rounds": rounds,
                "in_process": in_process,
                "rows": rows,
                "checks": [{"pass": ok, "check": text} for ok, text in checks],
                "wall_seconds": total,
            },
            indent=2,
        )
    )
    _plot(rows, out / "scale.png")
    console.print(f"saved {out / 'scale.md'}, {out / 'scale.json'}, {out / 'scale.png'}")
    if check and not all(ok for ok, _ in checks):
        raise typer.Exit(code=1)
