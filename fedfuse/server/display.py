"""What a person watching a run sees: a progress bar per round and one line per finished round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from fedfuse.server.report import summary_table


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def evaluation_text(record: dict[str, Any]) -> str:
    """Server evaluation when the run has one, else the clients' federated evaluation (loss, perplexity)."""
    if record.get("accuracy") is not None or record.get("loss") is not None:
        return f"accuracy {_fmt(record.get('accuracy'))}  loss {_fmt(record.get('loss'))}"
    text = f"federated loss {_fmt(record.get('client_loss'))}"
    if record.get("client_perplexity") is not None:
        text += f"  perplexity {_fmt(record['client_perplexity'], 2)}"
    return text + f"  accuracy {_fmt(record.get('client_accuracy'))}"


class RoundDisplay:
    """Rich progress (replies folded in the current round) and per-round result lines, on stderr."""

    def __init__(self, num_rounds: int, console: Console | None = None) -> None:
        if console is None:
            console = Console(stderr=True)
            if not console.is_terminal:
                console = Console(stderr=True, width=120)
        self.console = console
        self.num_rounds = num_rounds
        self.progress = Progress(
            TextColumn("[bold]round {task.fields[round]}/{task.fields[rounds]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("updates folded"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._task: Any = None
        self._round = 0

    def __enter__(self) -> RoundDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def reply(self, received: int, expected: int) -> None:
        """One more reply of the current round was folded (or rejected)."""
        if self._task is None:
            self._round += 1
            self._task = self.progress.add_task("round", total=expected, round=self._round, rounds=self.num_rounds)
        self.progress.update(self._task, completed=received, total=max(expected, received))

    def initial(self, evaluation: dict[str, Any] | None) -> None:
        """The base model's accuracy before round 1."""
        if evaluation:
            self.console.print(f"round 0: {evaluation_text(evaluation)}")

    def round(self, record: dict[str, Any]) -> None:
        """A finished round's line."""
        if self._task is not None:
            self.progress.remove_task(self._task)
            self._task = None
        self._round = record["round"]
        rejected = f"  [red]rejected {record['rejected']}[/red] {record['rejections']}" if record["rejected"] else ""
        self.console.print(
            f"round {record['round']}/{self.num_rounds}: {evaluation_text(record)}  "
            f"train loss {_fmt(record['train_loss'])}  "
            f"uplink {record['uplink_bytes'] / 1e6:.2f} MB  accepted {record['accepted']}{rejected}  "
            f"{record['seconds']:.1f} s"
        )

    def summary(self, history: dict[str, Any], run_dir: Path) -> None:
        """The summary table and where the report went."""
        self.console.print(summary_table(history))
        self.console.print(f"report: {run_dir / 'report.md'}  checkpoint: {history.get('checkpoint', '—')}")
