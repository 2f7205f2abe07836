"""Fixed-point encoding of merge statistics into the ring Z_{2^32} or Z_{2^64}, and ring arithmetic.

SecAgg+ masks cancel only under exact modular addition, so floats are scaled, rounded to integers and
wrapped into an unsigned ring; numpy's unsigned array arithmetic is that ring (it wraps silently).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_BITS = 2
MAX_BITS = 62
RING_BITS = (32, 64)


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point encoding of floats into the ring Z_{2^ring_bits} (numpy unsigned arithmetic wraps)."""

    bits: int
    """Bits of one encoded value, sign included (2..62)."""
    clip_range: float
    """Values are clipped to [-clip_range, clip_range] first (> 0)."""
    ring_bits: int
    """32 or 64."""

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        _check_clip_range(self.clip_range)
        if self.ring_bits not in RING_BITS:
            raise ValueError(f"secagg ring_bits must be 32 or 64, got {self.ring_bits}")
        if self.bits > self.ring_bits:
            raise ValueError(f"secagg bits ({self.bits}) exceed the ring's {self.ring_bits} bits")

    @classmethod
    def for_nodes(cls, bits: int, clip_range: float, num_nodes: int) -> FixedPoint:
        """The smallest ring whose signed range holds the sum of num_nodes values of `bits` bits each."""
        _check_bits(bits)
        _check_clip_range(clip_range)
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
            raise ValueError(f"secagg needs num_nodes >= 1, got {num_nodes!r}")
        needed = bits + num_nodes.bit_length()  # bits + ceil(log2(num_nodes + 1))
        if needed > 64:
            raise ValueError(
                f"secagg bits={bits} plus {num_nodes.bit_length()} bits of headroom for {num_nodes} nodes "
                f"need {needed} > 64 ring bits: lower the bits"
            )
        return cls(bits=bits, clip_range=float(clip_range), ring_bits=32 if needed <= 32 else 64)

    @property
    def dtype(self) -> np.dtype:
        """np.uint32 or np.uint64, the ring's element type."""
        return np.dtype(np.uint32 if self.ring_bits == 32 else np.uint64)

    @property
    def scale(self) -> float:
        """Encoded integer per unit of value: clip_range maps to the largest positive `bits`-bit integer."""
        return float(2 ** (self.bits - 1) - 1) / self.clip_range

    def encode(self, values: np.ndarray) -> tuple[np.ndarray, int]:
        """Floats (flattened) → (ring elements, how many were clipped); rounds to nearest, refuses non-finite."""
        flat = np.asarray(values).reshape(-1)
        if flat.dtype.kind != "f":
            raise ValueError(f"secagg encodes float arrays, got dtype {flat.dtype}")
        flat = flat.astype(np.float64, copy=False)
        if not np.all(np.isfinite(flat)):
            raise ValueError("secagg cannot encode non-finite values (NaN or inf)")
        clipped = int(np.count_nonzero(np.abs(flat) > self.clip_range))
        limit = 2 ** (self.bits - 1) - 1
        integers = np.clip(np.rint(np.clip(flat, -self.clip_range, self.clip_range) * self.scale), -limit, limit)
        return self._wrap(integers.astype(np.int64)), clipped

    def encode_integers(self, values: np.ndarray) -> np.ndarray:
        """Exact small integers (counts, may be negative) into the ring, unscaled; floats must be integral."""
        flat = np.asarray(values).reshape(-1)
        if flat.dtype.kind == "f":
            if not np.all(np.isfinite(flat)) or not np.all(flat == np.rint(flat)):
                raise ValueError("secagg encode_integers needs integral finite values")
        elif flat.dtype.kind not in "iub":
            raise ValueError(f"secagg encode_integers needs integers, got dtype {flat.dtype}")
        half = 2 ** (self.ring_bits - 1)
        if flat.size and (float(np.max(flat)) >= half or float(np.min(flat)) < -half):
            raise ValueError(f"secagg integers must lie in [-2^{self.ring_bits - 1}, 2^{self.ring_bits - 1})")
        return self._wrap(flat.astype(np.int64))

    def decode(self, summed: np.ndarray) -> np.ndarray:
        """Summed ring elements → float64 sums (signed: the upper half of the ring is negative)."""
        return self.decode_integers(summed).astype(np.float64) / self.scale

    def decode_integers(self, summed: np.ndarray) -> np.ndarray:
        """Summed ring elements → their signed int64 values (two's complement in the ring)."""
        ring = np.asarray(summed).reshape(-1)
        if ring.dtype.kind != "u":
            raise ValueError(f"secagg decodes unsigned ring elements, got dtype {ring.dtype}")
        if self.ring_bits == 32:
            return ring.astype(np.uint32).view(np.int32).astype(np.int64)
        return ring.astype(np.uint64).view(np.int64)

    def error_bound(self, num_summands: int) -> float:
        """Largest absolute error of one decoded sum of num_summands unclipped values (rounding: ½ each)."""
        return num_summands * 0.5 / self.scale

    def _wrap(self, integers: np.ndarray) -> np.ndarray:
        """int64 → ring element: two's complement bits, truncated to the ring (q mod 2^ring_bits)."""
        return integers.view(np.uint64).astype(self.dtype)


def ring_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a + b) mod 2^ring, elementwise, in the operands' unsigned dtype; wraps without warnings."""
    left, right = _operands(a, b)
    with np.errstate(over="ignore"):
        return np.add(left, right)


def ring_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a - b) mod 2^ring, elementwise: removes a mask that was added."""
    left, right = _operands(a, b)
    with np.errstate(over="ignore"):
        return np.subtract(left, right)


def ring_negate(a: np.ndarray) -> np.ndarray:
    """(-a) mod 2^ring, elementwise."""
    array = np.asarray(a)
    return ring_difference(np.zeros_like(array), array)


def _operands(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both operands as arrays of one unsigned ring dtype (uint32 or uint64), else ValueError."""
    left, right = np.asarray(a), np.asarray(b)
    if left.dtype != right.dtype or left.dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
        dtypes = f"{left.dtype}, {right.dtype}"
        raise ValueError(f"secagg ring arithmetic needs two uint32 or two uint64 arrays, got {dtypes}")
    return left, right


def _check_bits(bits: int) -> None:
    """`bits` is an int in [2, 62]."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"secagg bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def _check_clip_range(clip_range: float) -> None:
    """`clip_range` is a finite number > 0."""
    if not (isinstance(clip_range, (int, float)) and np.isfinite(clip_range) and clip_range > 0):
        raise ValueError(f"secagg clip_range must be a finite number > 0, got {clip_range!r}")
