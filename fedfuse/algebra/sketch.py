"""Seeded fixed-size sketches of a task vector, streamed tensor by tensor (pure torch, no I/O).

An :class:`UpdateSketch` keeps, whatever the size of the model:

* a CountSketch (sparse Johnson–Lindenstrauss projection) to ``dim`` buckets. Each tensor is seen as a matrix
  (rows = its first dimension, a 1-D tensor is one row) and entry (i, j) of tensor ``name`` is added into bucket
  ``h(i, j) = (h₁(i) + h₂(j)) mod dim`` with sign ``s(i, j) = s₁(i)·s₂(j)`` (a tensor sketch, Pham & Pagh 2013).
  The row and column hashes are drawn from ``torch.Generator`` objects seeded by
  :func:`~fedfuse.algebra.seeds.derive_seed` of (seed, chunk, axis, name), :data:`CHUNK` indices at a time, so
  memory stays bounded for big tensors and drawing them costs O(rows + columns), not O(rows·columns). A
  :class:`~fedfuse.algebra.low_rank.LowRank` B·A is then sketched from its factors alone: the circular
  convolution (by FFT) of each column of B's row sketch with each row of A's column sketch, never forming B·A.
  The map is linear (the sketch of a sum is the sum of the sketches) and ``<S x, S y>`` is an unbiased
  estimate of ``<x, y>``: a cosine read from two sketches is off by about ``1/√dim`` (≈ 0.016 at 4096);
  :data:`COSINE_TOLERANCE` (5/√dim) states a bound that holds with overwhelming probability for vectors not
  dominated by a handful of entries;
* the exact squared L2 norm, accumulated in float64 while streaming;
* the values at a seeded sample of coordinates (the same positions for every update given the seed, the
  names and the shapes: a :class:`SamplePlan`), for sign-conflict mass.

Dense tensors, :class:`~fedfuse.algebra.sparse.SparseTensor` (only its support is sketched) and
:class:`~fedfuse.algebra.low_rank.LowRank` give the same sketch for the same matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from fedfuse.algebra.low_rank import LowRank
from fedfuse.algebra.seeds import derive_seed
from fedfuse.algebra.sparse import SparseTensor

DEFAULT_DIM = 4096
"""Buckets of a sketch: a cosine's error is about 1/√dim."""
DEFAULT_SAMPLES = 4096
"""Coordinates sampled per update (their values; for sign-conflict mass)."""
CHUNK = 1 << 20
"""Hashes drawn at once along an axis, and entries of a tensor sketched at once (memory: ~24 bytes each)."""
SAMPLE_SCOPE = "sample"

SketchInput = torch.Tensor | SparseTensor | LowRank
"""One tensor a sketch takes: dense, sparse (kept entries) or low-rank factors."""


def cosine_tolerance(dim: int) -> float:
    """The stated error of a sketched cosine: 5/√dim (the standard error is about 1/√dim to √2/√dim)."""
    return 5.0 / math.sqrt(dim)


COSINE_TOLERANCE = cosine_tolerance(DEFAULT_DIM)
"""The stated error of a sketched cosine at the default ``dim`` (≈ 0.078)."""


def shape_of(tensor: SketchInput) -> torch.Size:
    """The shape of the (dense) tensor ``tensor`` stands for."""
    return torch.Size(tensor.shape)


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """How a sketch sees a tensor: (first dimension, the rest); a 0-D or 1-D tensor is one row."""
    numel = math.prod(shape)
    if len(shape) < 2 or shape[0] == 0:
        return 1, numel
    return int(shape[0]), numel // int(shape[0])


HashKey = tuple[str, str, int, int]


class HashCache:
    """The (bucket, sign) chunks already drawn, kept up to ``max_bytes`` (every update of a round shares them)."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._chunks: dict[HashKey, tuple[torch.Tensor, torch.Tensor]] = {}
        self._bytes = 0

    def get(self, key: HashKey) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._chunks.get(key)

    def put(self, key: HashKey, value: tuple[torch.Tensor, torch.Tensor]) -> None:
        size = value[0].numel() * 16
        if self._bytes + size <= self.max_bytes:
            self._chunks[key] = value
            self._bytes += size


def chunk_hashes(
    seed: int, name: str, axis: str, chunk: int, length: int, dim: int, cache: HashCache | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets (int64) and signs (float64 ±1) of indices ``chunk·CHUNK …`` (``length``) along ``axis`` of ``name``."""
    key = (name, axis, chunk, length)
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        return cached
    generator = torch.Generator().manual_seed(derive_seed(seed, chunk, f"sketch-{axis}", name))
    draw = torch.randint(0, 2 * dim, (length,), generator=generator, dtype=torch.int64)
    value = (draw >> 1, (draw & 1).to(torch.float64).mul_(2.0).sub_(1.0))
    if cache is not None:
        cache.put(key, value)
    return value


def axis_hashes(
    seed: int, name: str, axis: str, size: int, start: int, stop: int, dim: int, cache: HashCache | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets and signs of indices ``start … stop − 1`` of an axis of ``size`` (drawn by chunks of CHUNK)."""
    buckets, signs = [], []
    for chunk in range(start // CHUNK, (stop - 1) // CHUNK + 1 if stop > start else start // CHUNK):
        first = chunk * CHUNK
        b, s = chunk_hashes(seed, name, axis, chunk, min(CHUNK, size - first), dim, cache)
        lo, hi = max(start - first, 0), min(stop - first, CHUNK)
        buckets.append(b[lo:hi])
        signs.append(s[lo:hi])
    if not buckets:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64)
    return torch.cat(buckets), torch.cat(signs)


@dataclass(frozen=True)
class SamplePlan:
    """How many coordinates each tensor contributes to the sample: ``samples`` split by size (largest remainder)."""

    counts: Mapping[str, int]
    numels: Mapping[str, int]
    seed: int

    @classmethod
    def of(cls, shapes: Mapping[str, torch.Size | tuple[int, ...]], samples: int, seed: int) -> SamplePlan:
        """The plan for tensors of ``shapes`` (names sorted, so the order they stream in does not matter)."""
        numels = {name: math.prod(shapes[name]) for name in sorted(shapes)}
        total = sum(numels.values())
        if total == 0 or samples <= 0:
            return cls({name: 0 for name in numels}, numels, seed)
        budget = min(samples, total)
        exact = {name: budget * n / total for name, n in numels.items()}
        counts = {name: int(value) for name, value in exact.items()}
        spare = budget - sum(counts.values())
        for name in sorted(exact, key=lambda k: (counts[k] - exact[k], k))[:spare]:
            counts[name] += 1
        return cls(counts, numels, seed)

    @property
    def total(self) -> int:
        """Coordinates sampled per update."""
        return sum(self.counts.values())

    def positions(self, name: str) -> torch.Tensor:
        """Tensor ``name``'s sampled flat positions (sorted, drawn with replacement from its seeded generator)."""
        count, numel = self.counts.get(name, 0), self.numels.get(name, 0)
        if count == 0:
            return torch.zeros(0, dtype=torch.int64)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, 0, SAMPLE_SCOPE, name))
        return torch.randint(0, numel, (count,), generator=generator, dtype=torch.int64).sort().values

    def offsets(self) -> dict[str, int]:
        """Where each tensor's samples start in the flat sample vector (names sorted)."""
        offsets, at = {}, 0
        for name, count in self.counts.items():
            offsets[name] = at
            at += count
        return offsets


class UpdateSketch:
    """One update's fixed-size summary: CountSketch to ``dim`` buckets, exact squared norm, sampled values.

    ``add_tensor`` streams the update tensor by tensor; its size never grows with the tensors
    (``dim`` + the plan's samples floats). Two sketches compare only with the same ``dim`` and ``seed``.
    """

    def __init__(
        self,
        dim: int = DEFAULT_DIM,
        seed: int = 0,
        plan: SamplePlan | None = None,
        cache: HashCache | None = None,
    ) -> None:
        if dim < 1:
            raise ValueError(f"a sketch needs dim >= 1 buckets; got {dim}")
        self.dim = dim
        self.seed = seed
        self.plan = plan
        self.cache = cache
        self.vector = torch.zeros(dim, dtype=torch.float64)
        self.squared_norm = 0.0
        self.samples = torch.zeros(plan.total if plan is not None else 0, dtype=torch.float64)
        self._offsets = plan.offsets() if plan is not None else {}
        self.tensors = 0

    @property
    def norm(self) -> float:
        """The exact L2 norm of what was added."""
        return math.sqrt(max(self.squared_norm, 0.0))

    @property
    def nbytes(self) -> int:
        """Bytes this sketch holds (independent of the size of the update)."""
        return self.vector.numel() * 8 + self.samples.numel() * 8

    def add_tensor(self, name: str, tensor: SketchInput) -> None:
        """Add tensor ``name`` of the update (dense, sparse or low-rank) into the sketch, norm and sample."""
        if isinstance(tensor, SparseTensor):
            self._add_sparse(name, tensor)
        elif isinstance(tensor, LowRank):
            self._add_low_rank(name, tensor)
        else:
            self._add_dense(name, tensor)
        self.tensors += 1

    def _hashes(self, name: str, axis: str, size: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return axis_hashes(self.seed, name, axis, size, start, stop, self.dim, self.cache)

    def _add_entries(
        self, name: str, shape: tuple[int, int], rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Add ``values`` at (``rows``, ``cols``) (row-sorted, rows spanning few chunks) of matrix ``name``."""
        if values.numel() == 0:
            return
        self.squared_norm += float(values.square().sum())
        first, last = int(rows[0]), int(rows[-1]) + 1
        row_buckets, row_signs = self._hashes(name, "rows", shape[0], first, last)
        lo, hi = int(cols.min()), int(cols.max()) + 1
        col_buckets, col_signs = self._hashes(name, "cols", shape[1], lo, hi)
        r, c = rows - first, cols - lo
        buckets = (row_buckets[r] + col_buckets[c]) % self.dim
        self.vector.index_add_(0, buckets, values * row_signs[r] * col_signs[c])

    def _add_block(self, name: str, shape: tuple[int, int], block: torch.Tensor, row: int, col: int) -> None:
        """Add a dense block whose top-left entry is (``row``, ``col``) of matrix ``name``."""
        values = block.detach().to("cpu", torch.float64)
        self.squared_norm += float(values.square().sum())
        row_buckets, row_signs = self._hashes(name, "rows", shape[0], row, row + values.shape[0])
        col_buckets, col_signs = self._hashes(name, "cols", shape[1], col, col + values.shape[1])
        buckets = (row_buckets[:, None] + col_buckets[None, :]) % self.dim
        signed = values * row_signs[:, None] * col_signs[None, :]
        self.vector.index_add_(0, buckets.reshape(-1), signed.reshape(-1))

    def _add_dense(self, name: str, tensor: torch.Tensor) -> None:
        shape = matrix_shape(tensor.shape)
        matrix = tensor.reshape(shape)
        step_cols = min(shape[1], CHUNK) or 1
        step_rows = max(1, CHUNK // step_cols)
        for row in range(0, shape[0], step_rows):
            for col in range(0, shape[1], step_cols):
                self._add_block(name, shape, matrix[row : row + step_rows, col : col + step_cols], row, col)
        flat = tensor.reshape(-1)
        self._sample(name, flat.numel(), lambda idx: flat[idx.to(flat.device)].detach().to("cpu", torch.float64))

    def _add_sparse(self, name: str, tensor: SparseTensor) -> None:
        shape = matrix_shape(tensor.shape)
        indices, values = tensor.indices.cpu(), tensor.values.detach().to("cpu", torch.float64)
        for start in range(0, indices.numel(), CHUNK // 4):
            part = indices[start : start + CHUNK // 4]
            self._add_entries(name, shape, part // shape[1], part % shape[1], values[start : start + CHUNK // 4])

        def lookup(idx: torch.Tensor) -> torch.Tensor:
            if indices.numel() == 0:
                return torch.zeros(idx.numel(), dtype=torch.float64)
            where = torch.searchsorted(indices, idx).clamp(max=indices.numel() - 1)
            return torch.where(indices[where] == idx, values[where], torch.zeros((), dtype=torch.float64))

        self._sample(name, tensor.numel, lookup)

    def _axis_sketch(self, name: str, axis: str, factor: torch.Tensor) -> torch.Tensor:
        """R × dim: the CountSketch of each row of ``factor`` (R × size) along ``axis``."""
        out = torch.zeros(factor.shape[0], self.dim, dtype=torch.float64)
        size = factor.shape[1]
        for start in range(0, size, CHUNK):
            buckets, signs = self._hashes(name, axis, size, start, min(start + CHUNK, size))
            out.index_add_(1, buckets, factor[:, start : start + CHUNK] * signs)
        return out

    def _add_low_rank(self, name: str, tensor: LowRank) -> None:
        """B·A from its factors: Σᵣ CS_rows(B[:, r]) ⊛ CS_cols(A[r, :]) by FFT, O(R·(rows + cols + dim log dim))."""
        b, a = tensor.b.detach().to("cpu", torch.float64), tensor.a.detach().to("cpu", torch.float64)
        rows, cols = tensor.shape
        self.squared_norm += float(((b.T @ b) * (a @ a.T)).sum())
        left = torch.fft.rfft(self._axis_sketch(name, "rows", b.T), n=self.dim)
        right = torch.fft.rfft(self._axis_sketch(name, "cols", a), n=self.dim)
        self.vector += torch.fft.irfft((left * right).sum(dim=0), n=self.dim)
        self._sample(name, rows * cols, lambda idx: (b[idx // cols] * a[:, idx % cols].T).sum(dim=1))

    def _sample(self, name: str, numel: int, values_at: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Store the values at tensor ``name``'s sampled positions (``values_at(positions)``)."""
        if self.plan is None or name not in self._offsets:
            return
        if self.plan.numels[name] != numel:
            raise ValueError(f"tensor {name!r} has {numel} entries; the sample plan expects {self.plan.numels[name]}")
        positions = self.plan.positions(name)
        if positions.numel():
            at = self._offsets[name]
            self.samples[at : at + positions.numel()] = values_at(positions).to(torch.float64)

    def add(self, tensors: Mapping[str, SketchInput]) -> UpdateSketch:
        """Add every tensor of an update; returns ``self``."""
        for name, tensor in tensors.items():
            self.add_tensor(name, tensor)
        return self


def sketch_cosine(x: UpdateSketch, y: UpdateSketch) -> float:
    """The cosine of two updates estimated from their sketches (0 when either is zero), in [-1, 1]."""
    if (x.dim, x.seed) != (y.dim, y.seed):
        raise ValueError(f"sketches differ: dim/seed {x.dim}/{x.seed} vs {y.dim}/{y.seed}")
    nx, ny = float(x.vector.norm()), float(y.vector.norm())
    if nx == 0.0 or ny == 0.0:
        return 0.0
    return max(-1.0, min(1.0, float(x.vector @ y.vector) / (nx * ny)))


def sketch_update(
    tensors: Mapping[str, SketchInput], *, dim: int = DEFAULT_DIM, seed: int = 0, samples: int = 0
) -> UpdateSketch:
    """The sketch of a whole update (with ``samples`` sampled coordinates, planned over its own shapes)."""
    plan = SamplePlan.of({n: shape_of(t) for n, t in tensors.items()}, samples, seed) if samples else None
    return UpdateSketch(dim, seed, plan).add(tensors)


__all__ = [
    "CHUNK",
    "COSINE_TOLERANCE",
    "DEFAULT_DIM",
    "DEFAULT_SAMPLES",
    "HashCache",
    "SamplePlan",
    "SketchInput",
    "UpdateSketch",
    "axis_hashes",
    "chunk_hashes",
    "cosine_tolerance",
    "matrix_shape",
    "shape_of",
    "sketch_cosine",
    "sketch_update",
]
