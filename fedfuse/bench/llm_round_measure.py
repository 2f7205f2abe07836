"""``fedfuse bench llm-round``, inside one variant's fresh process: the run, its memory, its final weights.

:func:`measure_fedfuse` runs one ``fedfuse.simulation.simulate`` (the ServerApp, the SuperLink's state and
the simulation engine live in this process; clients in Ray workers) and turns its ``report.json`` into
per-round figures. :class:`PeakSampler` reads this process's RSS high-water mark (``VmHWM``, reset by
:meth:`fedfuse.bench.measure.Meter.memory` just before the run) every 50 ms with wall-clock times, so each
round's peak so far is the last sample before the round's ``finished_at``. After the run (outside the
measured section) the adapted matrices of every round's checkpoint are written (the dense reference) or
compared with the reference's: :func:`max_relative_difference`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedfuse.bench.measure import Meter, read_status_bytes

SAMPLE_INTERVAL_S = 0.05
"""How often :class:`PeakSampler` reads ``/proc/self/status``."""
ADAPTED_FILE = "adapted-round-{round:04d}.safetensors"
"""The dense reference's adapted matrices after each round, in its run folder."""


class PeakSampler(threading.Thread):
    """This process's peak RSS so far, sampled with wall-clock times (``VmHWM``, or a running max of ``VmRSS``)."""

    def __init__(self, high_water_mark: bool, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        super().__init__(name="llm-round-rss", daemon=True)
        self.high_water_mark, self.interval_s = high_water_mark, interval_s
        self.samples: list[tuple[float, int]] = []
        self._peak = 0
        self._stop_event = threading.Event()
        self._sample()

    def _sample(self) -> None:
        value = read_status_bytes("VmHWM" if self.high_water_mark else "VmRSS")
        self._peak = max(self._peak, value)
        self.samples.append((time.time(), self._peak))

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self._sample()

    def stop(self) -> int:
        """Stop sampling; the peak of the whole run."""
        self._stop_event.set()
        self.join()
        self._sample()
        return self._peak

    def peak_at(self, when: float) -> int:
        """The peak RSS up to wall-clock time ``when`` (the first sample if none is earlier)."""
        earlier = [peak for at, peak in self.samples if at <= when]
        return earlier[-1] if earlier else self.samples[0][1]


def round_peaks(sampler: PeakSampler, ends: Sequence[float], baseline: int) -> list[int]:
    """Peak RSS above ``baseline`` so far at each round's end; the last round gets the whole run's peak."""
    peaks = [sampler.peak_at(end) - baseline for end in ends[:-1]]
    return [*peaks, sampler.samples[-1][1] - baseline] if ends else []


def adapted_names(state: Mapping[str, torch.Tensor], targets: Iterable[str]) -> list[str]:
    """The weights of the LoRA target modules (``….q_proj.weight`` …) in a model's state."""
    wanted = set(targets)
    return sorted(n for n in state if n.endswith(".weight") and n.rsplit(".", 2)[-2] in wanted)


def matrix_entries(state: Mapping[str, torch.Tensor], names: Iterable[str], rank: int) -> tuple[int, int]:
    """(entries of the adapted matrices, entries of their rank-``rank`` factors A and B)."""
    shapes = [tuple(state[n].shape) for n in names]
    return sum(out * inp for out, inp in shapes), sum(rank * (out + inp) for out, inp in shapes)


def max_relative_difference(values: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """The largest, over tensors present in both, of max |x − y| / max |y| (y: the reference); NaN if none."""
    names = sorted(set(values) & set(reference))
    worst = float("nan") if not names else 0.0
    for name in names:
        x, y = values[name].double(), reference[name].double()
        scale = float(y.abs().max()) or 1.0
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


def record_adapted(
    rounds: Iterable[int],
    adapted_of: Callable[[int], dict[str, torch.Tensor]],
    own_dir: Path,
    reference_dir: str,
) -> dict[int, float | None]:
    """Per round: save the adapted matrices (the reference run) or their difference from the reference's."""
    differences: dict[int, float | None] = {}
    for round_number in rounds:
        adapted = adapted_of(round_number)
        file_name = ADAPTED_FILE.format(round=round_number)
        if reference_dir and Path(reference_dir).resolve() == own_dir.resolve():
            save_file({n: t.contiguous() for n, t in adapted.items()}, str(own_dir / file_name))
            differences[round_number] = 0.0
        elif reference_dir and (Path(reference_dir) / file_name).is_file():
            differences[round_number] = max_relative_difference(adapted, load_file(Path(reference_dir) / file_name))
        else:
            differences[round_number] = None
    return differences


def _checkpoint_adapted(run_dir: Path, base: dict[str, torch.Tensor], names: list[str]) -> Callable:
    """Round → the adapted matrices of that round's checkpoint, as absolute weights."""
    from fedfuse.server.run_checkpoint import load_checkpoint

    def adapted(round_number: int) -> dict[str, torch.Tensor]:
        checkpoint = load_checkpoint(run_dir, round_number)
        absolute = getattr(checkpoint, "absolute_weights", None)  # newer checkpoints may hold factors
        weights = absolute(base) if callable(absolute) else checkpoint.weights
        return {n: weights[n].float() for n in names if n in weights}

    return adapted


def _per_node(total: int, nodes: int) -> int:
    return round(total / nodes) if nodes else 0


def fedfuse_rounds(report: Mapping[str, Any], clients: int) -> list[dict[str, Any]]:
    """The per-round figures of a fedfuse ``report.json``: bytes per node, fold time, train loss, broadcast."""
    rows = []
    for record in report["rounds"]:
        broadcast = record.get("broadcast") or {}
        accepted = int(record.get("accepted", 0))
        down = broadcast.get("bytes_per_node")
        rows.append(
            {
                "round": int(record["round"]),
                "down_per_node": int(down) if down is not None else _per_node(int(record["downlink_bytes"]), clients),
                "up_per_node": _per_node(int(record.get("uplink_bytes", 0)), accepted),
                "accepted": accepted,
                "fold_seconds": float(record.get("phases", {}).get("decode_fold", float("nan"))),
                "train_loss": record.get("train_loss"),
                "broadcast": broadcast,
                "finished_at": float(record.get("finished_at", 0.0)),
            }
        )
    return rows


def server_memory(report: Mapping[str, Any]) -> int | None:
    """The ServerApp's own peak RSS above its start (report.json's ``server_memory``), when it records one."""
    memory = report.get("server_memory") or {}
    if "rss_peak_bytes" not in memory or "rss_start_bytes" not in memory:
        return None
    return int(memory["rss_peak_bytes"]) - int(memory["rss_start_bytes"])


def measure_fedfuse(meter: Meter, config: Mapping[str, Any]) -> dict[str, Any]:
    """One fedfuse variant (run in a fresh process): its rounds, memory and adapted weights' difference."""
    from fedfuse.settings import RunSettings
    from fedfuse.simulation import simulate
    from fedfuse.training.run_model import base_model, global_state, target_modules_for

    overrides, clients = dict(config["overrides"]), int(config["clients"])
    started = time.perf_counter()
    with meter.memory():
        sampler = PeakSampler(meter.peak_method == "clear_refs")
        sampler.start()
        report = simulate(overrides, num_clients=clients, parallel=min(clients, os.cpu_count() or 1))
        sampler.stop()
    wall = time.perf_counter() - started
    settings = RunSettings.from_run_config({}, **overrides)
    model, _ = base_model(settings)
    base = global_state(model)
    names = adapted_names(base, target_modules_for(model, settings))
    rounds = fedfuse_rounds(report, clients)
    baseline = meter.rss_baseline_bytes or 0
    for row, peak in zip(rounds, round_peaks(sampler, [r["finished_at"] for r in rounds], baseline), strict=True):
        row["rss_above_start"] = peak
    run_dir = Path(settings.run.output_dir)
    differences = record_adapted(
        [r["round"] for r in rounds], _checkpoint_adapted(run_dir, base, names), run_dir, config["reference_dir"]
    )
    for row in rounds:
        row["max_rel_diff"] = differences[row["round"]]
    adapted, factors = matrix_entries(base, names, settings.training.lora_rank)
    return {
        "rounds": rounds,
        "server_rss_above_start": server_memory(report),
        "server_memory": report.get("server_memory"),
        "adapted_entries": adapted,
        "factor_entries": factors,
        "wall_seconds": wall,
    }
