"""The ServerApp's resident memory, as the kernel counts it: now and the process's high-water mark."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from pathlib import Path

STATUS = Path("/proc/self/status")
M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter: allocations at least this large get pages of their own (``mmap``)."""
LARGE_ALLOCATION_BYTES = 1 << 20


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


def return_large_frees_to_the_system() -> bool:
    """Make glibc give every freed allocation of 1 MiB or more back to the kernel at once (Linux; True if set).

    A round's server work allocates and frees many matrix-sized temporaries (a factor product, an SVD, its
    residual). glibc raises its mmap threshold after such frees, so later ones come from the heap and the
    freed memory stays in the process: measured on a 340M-parameter Llama with ``broadcast = svd``, the
    ServerApp's peak RSS went from 1,392 MB to 666 MB above its start with the threshold pinned at 1 MiB.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION_BYTES))
