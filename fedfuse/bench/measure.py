"""Measure a function in a fresh process: wall time of chosen sections and peak-RSS growth.

Each measurement runs in a fresh ``python -c`` subprocess, so it starts with a fresh interpreter
and heap: nothing another method allocated can hide or inflate its memory (and, unlike a
``multiprocessing`` spawn child, it does not re-import the caller's ``__main__``).

Inside the child the function gets a :class:`Meter`. It wraps the section whose memory counts in
``meter.memory()`` and the parts whose time counts in ``meter.timed()`` (any number of times; the
times add up). Peak-RSS growth is ``VmHWM − VmRSS``: before the section, free heap memory is
handed back to the OS (``gc.collect`` + glibc ``malloc_trim``), the kernel's high-water mark is
reset by writing ``5`` to ``/proc/self/clear_refs`` and ``VmRSS`` is read as the baseline; ``VmHWM``
is read after. Where ``clear_refs`` cannot be written (not root, not Linux) a thread samples
``VmRSS`` every 5 ms instead, and the measurement says so. Work inside the section that only feeds
the measured code (a benchmark generating its synthetic inputs) goes in ``meter.untracked()``: its own
transient peak is left out, what it leaves allocated still counts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
SAMPLE_INTERVAL_S = 0.005
"""How often the fallback sampler reads ``VmRSS``."""


def read_status_bytes(field_name: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``"VmRSS"``, ``"VmHWM"``) in bytes."""
    try:
        text = _STATUS.read_text()
    except OSError as exc:
        raise RuntimeError(f"cannot read {_STATUS} (memory measurement needs Linux procfs): {exc}") from exc
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name == field_name:
            return int(rest.split()[0]) * 1024
    raise RuntimeError(f"{_STATUS} has no {field_name!r} field")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (``VmHWM``); False when it cannot be done here."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def release_free_memory() -> None:
    """Collect garbage and return free heap pages to the OS, so a baseline holds only live data."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class _RssSampler(threading.Thread):
    """Fallback peak tracker: reads ``VmRSS`` every few milliseconds and keeps the maximum."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.interval_s = interval_s
        self.peak = read_status_bytes("VmRSS")
        self.paused = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            if not self.paused.is_set():
                self.peak = max(self.peak, read_status_bytes("VmRSS"))

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, read_status_bytes("VmRSS"))


@dataclass(frozen=True)
class Measurement:
    """What one isolated run measured.

    ``seconds`` is the sum of the ``timed`` sections; ``rss_growth_bytes`` the peak RSS during the
    ``memory`` section minus the RSS just before it; ``peak_method`` is ``"clear_refs"`` (kernel
    high-water mark) or ``"sampling"`` (5 ms sampler); ``extra`` is what the function returned.
    """

    seconds: float
    rss_growth_bytes: int
    rss_baseline_bytes: int
    peak_method: str
    extra: dict[str, Any] = field(default_factory=dict)


class Meter:
    """Collects the timed sections and the one memory section of a measured function."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.rss_baseline_bytes: int | None = None
        self.rss_peak_bytes: int | None = None
        self.peak_method = ""
        self._in_memory = False
        self._sampler: _RssSampler | None = None
        self._peak_before_untracked = 0

    @contextmanager
    def timed(self, sync: Callable[[], None] | None = None) -> Iterator[None]:
        """Add the wall time of the block to :attr:`seconds`; ``sync`` (e.g. a CUDA sync) runs at both ends."""
        if sync is not None:
            sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if sync is not None:
                sync()
            self.seconds += time.perf_counter() - start

    @contextmanager
    def memory(self) -> Iterator[None]:
        """Measure the peak-RSS growth of the block (once per run)."""
        if self.rss_baseline_bytes is not None or self._in_memory:
            raise RuntimeError("meter.memory() may be entered once per measured run")
        self._in_memory = True
        release_free_memory()
        sampler = None
        if reset_peak_rss():
            self.peak_method = "clear_refs"
        else:
            self.peak_method = "sampling"
            sampler = _RssSampler()
        self.rss_baseline_bytes = read_status_bytes("VmRSS")
        self._sampler = sampler
        if sampler is not None:
            sampler.start()
        try:
            yield
        finally:
            if sampler is not None:
                self.rss_peak_bytes = sampler.stop()
            else:
                self.rss_peak_bytes = max(self._peak_before_untracked, read_status_bytes("VmHWM"))
            self._in_memory = False

    @contextmanager
    def untracked(self) -> Iterator[None]:
        """Inside :meth:`memory`: leave this block's transient peak out (what it keeps still counts).

        With ``clear_refs`` the high-water mark so far is kept and the kernel's is reset on exit (after
        free heap pages go back to the OS); the sampler pauses instead. For the inputs a benchmark
        generates, whose scratch the measured code never has.
        """
        if not self._in_memory:
            raise RuntimeError("meter.untracked() belongs inside meter.memory()")
        if self._sampler is not None:
            self._sampler.paused.set()
        else:
            self._peak_before_untracked = max(self._peak_before_untracked, read_status_bytes("VmHWM"))
        try:
            yield
        finally:
            release_free_memory()  # the block's freed scratch, which the allocator would keep resident
            if self._sampler is not None:
                self._sampler.paused.clear()
            else:
                reset_peak_rss()

    def measurement(self, extra: Mapping[str, Any] | None = None) -> Measurement:
        """The result, once the function returned; fails if it never opened :meth:`memory`."""
        if self.rss_baseline_bytes is None or self.rss_peak_bytes is None:
            raise RuntimeError("the measured function never opened meter.memory()")
        return Measurement(
            seconds=self.seconds,
            rss_growth_bytes=max(0, self.rss_peak_bytes - self.rss_baseline_bytes),
            rss_baseline_bytes=self.rss_baseline_bytes,
            peak_method=self.peak_method,
            extra=dict(extra or {}),
        )


MeasuredFunction = Callable[[Meter, Mapping[str, Any]], "Mapping[str, Any] | None"]
"""``fn(meter, config) -> extra``: a module-level function; ``config`` and ``extra`` are JSON-able."""

_CHILD_CODE = "import sys; from fedfuse.bench.measure import child_main; child_main(sys.argv[1], sys.argv[2])"


def _target_path(target: MeasuredFunction) -> str:
    """``module:qualname`` of ``target``, resolving ``__main__`` to the module run with ``python -m``."""
    module = target.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:
            raise ValueError(f"{target.__qualname__} lives in a script; measured functions must be importable")
        module = spec.name
    if "<" in target.__qualname__:
        raise ValueError(f"{target.__qualname__} is not a module-level function")
    return f"{module}:{target.__qualname__}"


def child_main(target_path: str, io_path: str) -> None:
    """Entry point of the measuring subprocess: read config from ``io_path``, write the result back."""
    module_name, _, qualname = target_path.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    io_file = Path(io_path)
    config = json.loads(io_file.read_text())
    meter = Meter()
    extra = target(meter, config)
    io_file.write_text(json.dumps(asdict(meter.measurement(extra))))


def run_isolated(
    target: MeasuredFunction, config: Mapping[str, Any], *, label: str = "", timeout_s: float | None = None
) -> Measurement:
    """Run ``target(meter, config)`` in a fresh ``python -c`` subprocess; return its :class:`Measurement`.

    ``target`` must be a module-level function; ``config`` and what it returns must be JSON-able.
    A child that raises, dies (e.g. killed for memory) or passes ``timeout_s`` raises
    ``RuntimeError`` naming ``label`` with the tail of the child's output.
    """
    what = label or target.__qualname__
    with tempfile.TemporaryDirectory(prefix="fedfuse-bench-") as folder:
        io_file = Path(folder) / "io.json"
        io_file.write_text(json.dumps(dict(config)))
        command = [sys.executable, "-c", _CHILD_CODE, _target_path(target), str(io_file)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"benchmark run {what!r} gave no result within {timeout_s} s") from None
        if done.returncode != 0:
            hint = " (killed by a signal; -9 usually means it ran out of memory)" if done.returncode < 0 else ""
            tail = (done.stdout + done.stderr)[-4000:]
            raise RuntimeError(f"benchmark run {what!r} failed with exit code {done.returncode}{hint}:\n{tail}")
        result = json.loads(io_file.read_text())
    return Measurement(**result)


def run_in_process(
    target: MeasuredFunction, config: Mapping[str, Any], *, label: str = "", timeout_s: float | None = None
) -> Measurement:
    """Run ``target(meter, config)`` here, with the signature of :func:`run_isolated`.

    No isolation: earlier work in this process shapes its heap, so memory numbers are indicative
    only. For smoke tests and debugging (it skips each run's interpreter start and imports).
    """
    meter = Meter()
    extra = target(meter, json.loads(json.dumps(dict(config))))
    return Measurement(**json.loads(json.dumps(asdict(meter.measurement(extra)))))


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence (mean of the middle two for even lengths)."""
    if not values:
        raise ValueError("median of an empty sequence")
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def rich_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    """A rich table with right-aligned columns after the first (numbers line up)."""
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"table row has {len(row)} cells but there are {len(columns)} columns")
        table.add_row(*row)
    return table


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    notes: Sequence[str] = (),
    console: Console | None = None,
) -> None:
    """Print a table with rich, then its notes (footnotes, PASS/FAIL lines) one per line."""
    console = console or Console()
    console.print(rich_table(title, columns, rows))
    for note in notes:
        console.print(note, markup=False, highlight=False)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The same table as GitHub markdown (``|`` in cells escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    aligns = ["---"] + ["---:"] * (len(columns) - 1)
    return "\n".join([line(columns), "| " + " | ".join(aligns) + " |", *(line(row) for row in rows)])
