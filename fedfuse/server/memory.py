"""The ServerApp's resident memory, as the kernel counts it: now and the process's high-water mark."""

from __future__ import annotations

from pathlib import Path

STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` in bytes (0 where there is no such file: not Linux)."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def resident_bytes() -> int:
    """The process's resident set now (``VmRSS``)."""
    return _status_bytes("VmRSS")


def server_memory(rss_start: int) -> dict[str, int]:
    """What ``report.json`` records: the RSS when the ServerApp started and the process's peak (``VmHWM``).

    In a simulation the peak also counts what ran in this process before the ServerApp (Flower, Ray's
    driver); a benchmark resets the high-water mark just before the run.
    """
    return {"rss_start_bytes": rss_start, "rss_peak_bytes": _status_bytes("VmHWM")}
