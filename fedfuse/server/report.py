"""A run's report: its history as JSON, a markdown summary, two plots, and the same table for the terminal.

The history is the plain dict the server keeps round by round (and checkpoints), so a finished run
and an interrupted one are reported the same way: whatever rounds are in it are shown. Values the run
did not measure — server evaluation turned off, a key absent — are shown as "—" in tables and left
out of the plots rather than drawn as zeros. Every file is written through
:func:`fedfuse.checkpoints.atomic_output` (a temporary file renamed into place), so a reader never sees
half a report and an older report in the same folder is replaced whole.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.table import Table

from fedfuse.algebra.diagnostics import heatmap_figure
from fedfuse.algebra.diagnostics import markdown as diagnostics_markdown
from fedfuse.checkpoints import atomic_output
from fedfuse.server.coefficient_round import coefficients_markdown
from fedfuse.server.report_clients import federated_section, federated_series

MISSING = "—"
"""What a table shows for a value the run did not record."""

ROUND_COLUMNS = (
    "round",
    "accuracy",
    "loss",
    "train loss",
    "uplink MB",
    "downlink MB",
    "accepted",
    "rejected",
    "seconds",
)
"""The per-round table's columns, shared by the markdown report and :func:`summary_table`."""

TABLE_TITLE = "fedfuse run summary"


def format_bytes_mb(n: int) -> str:
    """``n`` bytes in megabytes (10⁶ bytes) with two decimals, without the unit (the column names it)."""
    return f"{n / 1e6:.2f}"


def write_report(history: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``accuracy.png`` and ``uplink.png`` into ``out_dir``.

    ``out_dir`` is created if needed and files of an earlier report there are replaced. Returns the
    paths under the keys ``json``, ``markdown``, ``accuracy_plot`` and ``uplink_plot`` (and
    ``privacy_plot``, ε per round, for a differentially private run; ``diagnostics_plot``, the last
    diagnosed round's pairwise cosines as ``diagnostics.png``, when a round has mergeability diagnostics).
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": folder / "report.json",
        "markdown": folder / "report.md",
        "accuracy_plot": folder / "accuracy.png",
        "uplink_plot": folder / "uplink.png",
    }
    document = json.dumps(history, indent=2, sort_keys=True) + "\n"
    markdown = render_markdown(history)
    writers: dict[str, Callable[[Path], object]] = {
        "json": lambda path: path.write_text(document, encoding="utf-8"),
        "markdown": lambda path: path.write_text(markdown, encoding="utf-8"),
        "accuracy_plot": lambda path: _save_png(_accuracy_figure(history), path),
        "uplink_plot": lambda path: _save_png(_uplink_figure(history), path),
    }
    if history.get("privacy"):
        paths["privacy_plot"] = folder / "privacy.png"
        writers["privacy_plot"] = lambda path: _save_png(_privacy_figure(history), path)
    diagnosed = _last_with(_rounds(history), "diagnostics")
    if diagnosed is not None:
        number, record = diagnosed
        title = f"Round {number}: pairwise cosines of the updates (sketched)"
        paths["diagnostics_plot"] = folder / "diagnostics.png"
        writers["diagnostics_plot"] = lambda path: _save_png(heatmap_figure(record["diagnostics"], title), path)
    for key, write in writers.items():
        with atomic_output(paths[key], directory=False, overwrite=True) as temp:
            write(temp)
    return paths


def summary_table(history: Mapping[str, Any]) -> Table:
    """The per-round rows of the markdown report as a rich table, for printing at the end of a run."""
    table = Table(title=TABLE_TITLE)
    for name in ROUND_COLUMNS:
        table.add_column(name, justify="right")
    for row in _round_rows(history):
        table.add_row(*row)
    return table


def render_markdown(history: Mapping[str, Any]) -> str:
    """The markdown report: settings, per-round table, per-domain accuracy, rejections by reason."""
    settings = history.get("settings") or {}
    rounds = _rounds(history)
    lines = ["# fedfuse run report", ""]
    lines += _run_facts(history, settings, rounds)
    lines += ["## Settings", ""]
    if settings:
        lines += _markdown_table(
            ("setting", "value"), [(str(k), _setting_text(v)) for k, v in sorted(settings.items())]
        )
    else:
        lines += ["No settings recorded.", ""]
    lines += ["## Rounds", ""]
    if rounds:
        lines += _markdown_table(ROUND_COLUMNS, _round_rows(history))
    else:
        lines += ["No round finished.", ""]
    lines += federated_section(history, _markdown_table)
    lines += _domain_section(history, rounds)
    lines += _rejection_section(rounds)
    lines += _privacy_section(history, rounds)
    lines += _diagnostics_section(rounds)
    lines += coefficients_markdown(rounds)
    return "\n".join(lines)


def _diagnostics_section(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    """The last diagnosed round's mergeability: updates by outlier rank, sign-conflict mass, disparity."""
    diagnosed = _last_with(rounds, "diagnostics")
    if diagnosed is None:
        return []
    number, record = diagnosed
    return [
        f"## Mergeability (round {number})",
        "",
        "Each update's norm, its cosine to the merged update and to the others (from seeded sketches), the "
        "share of its mass against the elected sign, and an outlier score (robust z-scores of its mean cosine "
        "and log-norm); the pairwise cosines are in `diagnostics.png`.",
        "",
        diagnostics_markdown(record["diagnostics"]),
        "",
    ]


def _epsilons(history: Mapping[str, Any]) -> list[tuple[int, float]]:
    points = [(_round_number(r, i), _number(r.get("dp_epsilon"))) for i, r in enumerate(_rounds(history))]
    return [(number, eps) for number, eps in points if eps is not None]


def _privacy_section(history: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    privacy = history.get("privacy")
    if not privacy:
        return []
    lines = [
        "## Differential privacy",
        "",
        f"{privacy['dp']} DP: clip norm C = {privacy['clip_norm']}, "
        f"noise multiplier σ = {privacy['noise_multiplier']}, "
        f"δ = {privacy['delta']}; ε spent so far from {privacy['accountant']}.",
        "",
    ]
    return lines + _markdown_table(("round", "ε"), [(str(n), f"{eps:.4g}") for n, eps in _epsilons(history)])


def _privacy_figure(history: Mapping[str, Any]) -> Figure:
    figure = Figure(figsize=(7, 4), dpi=110)
    axes = figure.add_subplot()
    privacy = history["privacy"]
    axes.set_title(f"Privacy spent (δ = {privacy['delta']}, σ = {privacy['noise_multiplier']})")
    axes.set_xlabel("round")
    axes.set_ylabel("ε")
    points = _epsilons(history)
    if points:
        axes.plot(*zip(*points, strict=False), marker="o", color="tab:purple")
    axes.grid(alpha=0.3)
    return figure


def _rounds(history: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(history.get("rounds") or [])


def _round_number(record: Mapping[str, Any], index: int) -> int:
    number = record.get("round")
    return int(number) if number is not None else index + 1


def _number(value: Any) -> float | None:
    """``value`` as a float, or None when it is absent or not a number (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _fixed(value: Any, digits: int) -> str:
    number = _number(value)
    return MISSING if number is None else f"{number:.{digits}f}"


def _count(value: Any) -> str:
    number = _number(value)
    return MISSING if number is None else str(int(number))


def _megabytes(value: Any) -> str:
    number = _number(value)
    return MISSING if number is None else format_bytes_mb(int(number))


def _round_rows(history: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for index, record in enumerate(_rounds(history)):
        server = record.get("accuracy") is not None or record.get("loss") is not None
        rows.append(
            [
                str(_round_number(record, index)),
                _fixed(record.get("accuracy") if server else record.get("client_accuracy"), 4),
                _fixed(record.get("loss") if server else record.get("client_loss"), 4),
                _fixed(record.get("train_loss"), 4),
                _megabytes(record.get("uplink_bytes")),
                _megabytes(record.get("downlink_bytes")),
                _count(record.get("accepted")),
                _count(record.get("rejected")),
                _fixed(record.get("seconds"), 1),
            ]
        )
    return rows


def _run_facts(
    history: Mapping[str, Any], settings: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]
) -> list[str]:
    facts = []
    planned = _number(settings.get("num-server-rounds"))
    if planned is not None and len(rounds) < planned:
        facts.append(f"- Interrupted: {len(rounds)} of {int(planned)} rounds finished.")
    else:
        facts.append(f"- Rounds finished: {len(rounds)}")
    wall = _number(history.get("wall_seconds"))
    if wall is not None:
        facts.append(f"- Wall time: {wall:.1f} s")
    initial = history.get("initial") or {}
    if _number(initial.get("accuracy")) is not None or _number(initial.get("loss")) is not None:
        facts.append(
            f"- Initial server evaluation (round 0): accuracy {_fixed(initial.get('accuracy'), 4)}, "
            f"loss {_fixed(initial.get('loss'), 4)}"
        )
    final = _last_with(rounds, "accuracy")
    if final is not None:
        facts.append(f"- Final accuracy: {_fixed(final[1].get('accuracy'), 4)} (round {final[0]})")
    if history.get("checkpoint"):
        facts.append(f"- Checkpoint: `{history['checkpoint']}`")
    return [*facts, ""]


def _last_with(rounds: Sequence[Mapping[str, Any]], key: str) -> tuple[int, Mapping[str, Any]] | None:
    """The last round that recorded ``key`` (a number or a non-empty dict), with its round number."""
    for index in range(len(rounds) - 1, -1, -1):
        value = rounds[index].get(key)
        if _number(value) is not None or (isinstance(value, Mapping) and value):
            return _round_number(rounds[index], index), rounds[index]
    return None


def _domain_section(history: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    initial = (history.get("initial") or {}).get("accuracy_per_domain") or {}
    last = _last_with(rounds, "accuracy_per_domain")
    final = dict(last[1]["accuracy_per_domain"]) if last else {}
    lines = ["## Accuracy per domain", ""]
    if not initial and not final:
        return [*lines, "No server evaluation per domain.", ""]
    final_label = f"round {last[0]}" if last else "final"
    rows = []
    for domain in sorted(set(initial) | set(final)):
        start, end = _number(initial.get(domain)), _number(final.get(domain))
        change = MISSING if start is None or end is None else f"{end - start:+.4f}"
        rows.append((str(domain), _fixed(start, 4), _fixed(end, 4), change))
    return lines + _markdown_table(("domain", "initial (round 0)", final_label, "change"), rows)


def _rejection_section(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    totals: Counter[str] = Counter()
    for record in rounds:
        for reason, count in (record.get("rejections") or {}).items():
            totals[str(reason)] += int(count)
    rows = [
        (reason, str(count))
        for reason, count in sorted(totals.items(), key=lambda item: (-item[1], item[0]))
        if count > 0
    ]
    if not rows:
        return []
    return ["## Rejections by reason", "", *_markdown_table(("reason", "count"), rows)]


def _setting_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(name) for name in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return [*lines, ""]


def _accuracy_series(history: Mapping[str, Any]) -> tuple[list[tuple[int, float]], dict[str, list[tuple[int, float]]]]:
    """Points (round, accuracy) of the global accuracy and of each domain, round 0 included; gaps skipped."""
    records: list[tuple[int, Mapping[str, Any]]] = []
    if history.get("initial"):
        records.append((0, history["initial"]))
    records += [(_round_number(record, index), record) for index, record in enumerate(_rounds(history))]
    overall: list[tuple[int, float]] = []
    domains: dict[str, list[tuple[int, float]]] = {}
    for number, record in records:
        accuracy = _number(record.get("accuracy"))
        if accuracy is not None and math.isfinite(accuracy):
            overall.append((number, accuracy))
        for domain, value in (record.get("accuracy_per_domain") or {}).items():
            value = _number(value)
            if value is not None and math.isfinite(value):
                domains.setdefault(str(domain), []).append((number, value))
    return overall, domains


def _accuracy_figure(history: Mapping[str, Any]) -> Figure:
    overall, domains = _accuracy_series(history)
    if not overall and not domains:
        return _federated_figure(history)
    figure = Figure(figsize=(7, 4), dpi=110)
    axes = figure.add_subplot()
    axes.set_title("Server accuracy per round")
    axes.set_xlabel("round")
    axes.set_ylabel("accuracy")
    if overall:
        axes.plot(*zip(*overall, strict=False), marker="o", linewidth=2.2, color="black", label="global", zorder=3)
    for domain, points in sorted(domains.items()):
        axes.plot(*zip(*points, strict=False), linewidth=0.9, alpha=0.8, label=domain)
    axes.xaxis.get_major_locator().set_params(integer=True)  # type: ignore[call-arg]  # stub types the base Locator
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")
    return figure


def _federated_figure(history: Mapping[str, Any]) -> Figure:
    """Without server evaluation: the clients' example-weighted local loss and accuracy per round."""
    figure = Figure(figsize=(9, 4), dpi=110)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for axes, key, label in ((loss_axes, "client_loss", "loss"), (accuracy_axes, "client_accuracy", "accuracy")):
        points = federated_series(history, key)
        axes.set_title(f"Federated {label} per round")
        axes.set_xlabel("round")
        axes.set_ylabel(label)
        if not points:
            axes.text(0.5, 0.5, "no evaluation", ha="center", va="center", transform=axes.transAxes)
            continue
        axes.plot(*zip(*points, strict=False), marker="o", linewidth=2.0, color="black")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
    return figure


def _uplink_figure(history: Mapping[str, Any]) -> Figure:
    figure = Figure(figsize=(7, 4), dpi=110)
    axes = figure.add_subplot()
    axes.set_title("Uplink per round")
    axes.set_xlabel("round")
    axes.set_ylabel("uplink MB")
    bars = [
        (_round_number(record, index), _number(record.get("uplink_bytes")))
        for index, record in enumerate(_rounds(history))
    ]
    bars = [(number, size / 1e6) for number, size in bars if size is not None]
    if not bars:
        axes.text(0.5, 0.5, "no uplink recorded", ha="center", va="center", transform=axes.transAxes)
        return figure
    axes.bar(*zip(*bars, strict=False), color="tab:blue")
    axes.xaxis.get_major_locator().set_params(integer=True)  # type: ignore[call-arg]  # stub types the base Locator
    axes.grid(axis="y", alpha=0.3)
    return figure


def _save_png(figure: Figure, path: Path) -> None:
    """Render with the Agg canvas (no pyplot, no global backend), legends outside the axes included."""
    FigureCanvasAgg(figure)
    try:
        figure.savefig(path, format="png", bbox_inches="tight")
    finally:
        figure.clear()
