"""Shared test helpers: hypothesis strategies for updates, every built-in merge configuration, tolerances.

Updates are drawn as a seed plus shapes (torch fills the values), so hypothesis explores counts,
shapes, weights, densities and dense/sparse representations while tensors stay cheap to build.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import strategies as st

from fedfuse.algebra import SparseTensor, dare_drop, ties_trim, to_dense
from fedfuse.strategies import MergeState, MergeStrategy, ModelStock, Ties, TreeLeaf, get_strategy
from fedfuse.strategies.model_stock import row_length


@pytest.fixture(scope="session")
def tiny_chat_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The own-data tiny chat Llama (tests/own_data_helpers.py), saved once per session: tests only read it."""
    from own_data_helpers import tiny_chat_llama

    return tiny_chat_llama(tmp_path_factory.mktemp("tiny-chat-llama"))


@pytest.fixture
def server_identity(monkeypatch):
    """Messages can only be built inside a Flower task; pose as the server of run 1."""
    for field, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)


STRATEGY_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("fedavg", {}),
    ("linear", {}),
    ("task_arithmetic", {}),
    ("task_arithmetic", {"normalize": True}),
    ("fisher", {}),
    ("ties", {"vote": "mass"}),
    ("ties", {"vote": "count"}),
    ("ties", {"vote": "mass", "normalize": False}),
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
    ("dare_linear", {}),
    ("dare_ties", {}),
    ("breadcrumbs_ties", {}),
    ("della", {}),
]
"""Every built-in mergeable strategy that needs no base tensors, with both TIES votes and the declared switches."""

CONFIG_IDS = ["-".join([name, *(f"{k}={v}" for k, v in params.items())]) for name, params in STRATEGY_CONFIGS]


def make_strategy(config: tuple[str, dict[str, Any]], **common: Any) -> MergeStrategy:
    """Build one of :data:`STRATEGY_CONFIGS` with extra common parameters (lam, dtype, device)."""
    name, params = config
    return get_strategy(name, **params, **common)


def seeded_values(shape: tuple[int, ...], seed: int, dyadic: bool = False) -> torch.Tensor:
    """fp32 values with ~10% exact zeros; ``dyadic`` puts them on the grid k/8, |k| ≤ 16 (exact sums)."""
    gen = torch.Generator().manual_seed(seed)
    if dyadic:
        values = torch.randint(-16, 17, shape, generator=gen).to(torch.float32) / 8
    else:
        values = torch.randn(shape, generator=gen)
    return values * (torch.rand(shape, generator=gen) > 0.1)


shapes_st = st.dictionaries(
    st.sampled_from(["w", "b", "emb"]),
    st.lists(st.integers(1, 6), min_size=1, max_size=2).map(tuple),
    min_size=1,
    max_size=2,
)
"""Parameter names → small shapes."""


@st.composite
def contributions(draw: st.DrawFn, min_size: int = 1, max_size: int = 5, dyadic: bool = False) -> list[TreeLeaf]:
    """Updates of one model with weights and Fisher diagonals; each tensor dense, trimmed or DARE-dropped.

    ``dyadic`` keeps values, weights, Fisher entries and DARE rescales on a power-of-two grid so
    every sum the strategies form is exact in fp32, whatever the order.
    """
    shapes = draw(shapes_st)
    count = draw(st.integers(min_size, max_size))
    weights_st = st.sampled_from([0.5, 1.0, 2.0]) if dyadic else st.floats(0.1, 4.0)
    out = []
    for _ in range(count):
        update: dict[str, torch.Tensor | SparseTensor] = {}
        fisher: dict[str, torch.Tensor] = {}
        for name, shape in shapes.items():
            seed = draw(st.integers(0, 2**31 - 1))
            tau = seeded_values(shape, seed, dyadic)
            kind = draw(st.sampled_from(["dense", "trim", "dare"]))
            if kind == "trim":
                update[name] = ties_trim(tau, draw(st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0])))
            elif kind == "dare":
                update[name] = dare_drop(tau, draw(st.sampled_from([0.25, 0.5, 1.0])), seed + 1)
            else:
                update[name] = tau
            grid = torch.tensor([0.25, 0.5, 1.0, 2.0])
            fisher_gen = torch.Generator().manual_seed(seed + 2)
            fisher[name] = (
                grid[torch.randint(0, 4, shape, generator=fisher_gen)]
                if dyadic
                else torch.rand(shape, generator=fisher_gen) + 0.05
            )
        out.append(TreeLeaf(update, draw(weights_st), fisher))
    return out


def dense_equivalent(c: TreeLeaf) -> TreeLeaf:
    """The same contribution with every tensor dense; Fisher mass only on the entries the update kept.

    A sparse update's dropped entries mean "τ = 0" for the sums, and "no information" for Fisher.
    """
    update, fisher = {}, {}
    for name, tensor in c.update.items():
        update[name] = to_dense(tensor)
        fisher[name] = c.fisher[name] * _support(tensor) if c.fisher is not None else None
    return TreeLeaf(update, c.weight, fisher if c.fisher is not None else None)


def absolute(c: TreeLeaf) -> TreeLeaf:
    """The same contribution with |τ|: its statistics bound the rounding error of any summation order."""
    update = {
        name: SparseTensor(t.indices, t.values.abs(), t.shape) if isinstance(t, SparseTensor) else t.abs()
        for name, t in c.update.items()
    }
    return TreeLeaf(update, c.weight, c.fisher)


def _support(tensor: torch.Tensor | SparseTensor) -> torch.Tensor:
    if isinstance(tensor, SparseTensor):
        mask = torch.zeros(tensor.numel)
        mask[tensor.indices] = 1.0
        return mask.reshape(tensor.shape)
    return torch.ones(tensor.shape)


def fold(strategy: MergeStrategy, items: Sequence[TreeLeaf]) -> MergeState:
    """A state with ``items`` added in order."""
    state = strategy.new_state()
    for c in items:
        state.add(c.update, c.weight, c.fisher)
    return state


ABS_STAT = {"N": "P", "Wn": "Wp"}
"""For each statistic, the one of the |τ| state that bounds its magnitude (others: itself)."""


def stat_scales(strategy: MergeStrategy, items: Sequence[TreeLeaf]) -> dict[str, dict[str, torch.Tensor]]:
    """Per statistic, Σ of the absolute values of its terms (fp64): the scale of its rounding error."""
    abs_state = fold(_as_fp64(strategy), [absolute(c) for c in items])
    return {
        name: {stat: abs_state.stats[name][ABS_STAT.get(stat, stat)] for stat in stats}
        for name, stats in abs_state.stats.items()
    }


def output_scales(strategy: MergeStrategy, items: Sequence[TreeLeaf]) -> dict[str, torch.Tensor]:
    """Per entry, the magnitude against which a merged value's rounding error is measured (fp64)."""
    if isinstance(strategy, Ties):
        exact = fold(_as_fp64(strategy), items).finalize()
        return {name: exact[name].abs() for name in exact}
    if isinstance(strategy, ModelStock):
        return _model_stock_scales(strategy, items)
    abs_out = fold(_as_fp64(strategy), [absolute(c) for c in items]).finalize()
    return {name: t.abs() for name, t in abs_out.items()}


def _model_stock_scales(strategy: ModelStock, items: Sequence[TreeLeaf]) -> dict[str, torch.Tensor]:
    """|mean|·(|t| + |dt/dc|·(‖U‖² + ΣQ)/(K(K − 1))): the ratio t amplifies the rounding of the angle c."""
    mean_abs = fold(get_strategy("fedavg", dtype="float64"), [absolute(c) for c in items]).finalize()
    state = fold(_as_fp64(strategy), items)
    count = state.num_updates
    out = {}
    for name, stats in state.stats.items():
        if count == 1:
            out[name] = mean_abs[name]
            continue
        length = row_length(state.shapes[name], strategy.filter_wise)
        u2 = stats["U"].reshape(-1, length).square().sum(1, keepdim=True)
        q = stats["Q"].reshape(-1, length).sum(1, keepdim=True)
        cosine = (u2 - q) / (count * (count - 1))
        denominator = 1 + (count - 1) * cosine
        regular = denominator > 1e-12
        ratio = torch.where(regular, count * cosine / denominator.clamp_min(1e-12), 0.0)
        slope = torch.where(regular, count / denominator.clamp_min(1e-12).square(), 0.0)
        amplification = ratio.abs() + slope * (u2 + q) / (count * (count - 1))
        out[name] = (mean_abs[name].reshape(-1, length) * amplification).reshape(state.shapes[name])
    return out


def ties_vote_is_close(
    strategy: MergeStrategy, items: Sequence[TreeLeaf], rel: float = 1e-5
) -> dict[str, torch.Tensor]:
    """Entries whose TIES mass vote |P+N| is within ``rel``·(P−N) of 0 (all False for other votes)."""
    state = fold(_as_fp64(strategy), items)
    out = {}
    for name, stats in state.stats.items():
        if isinstance(strategy, Ties) and strategy.vote == "mass":
            mass = stats["P"] - stats["N"]
            out[name] = ((stats["P"] + stats["N"]).abs() <= rel * mass) & (mass > 0)
        else:
            out[name] = torch.zeros_like(stats[strategy.statistics[0]], dtype=torch.bool)
        out[name] = out[name].reshape(state.shapes[name])
    return out


def _as_fp64(strategy: MergeStrategy) -> MergeStrategy:
    params = {k: v for k, v in strategy.params().items() if k != "dtype"}
    return get_strategy(strategy.name, **params, dtype="float64")


def assert_within(
    got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, rel: float, what: str, skip: torch.Tensor | None = None
) -> None:
    """|got − want| ≤ rel·scale entry by entry (entries where ``skip`` is True are not compared)."""
    error = (got.double() - want.double()).abs()
    bad = error > rel * scale.double().reshape(error.shape)
    if skip is not None:
        bad &= ~skip.reshape(bad.shape)
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} entries differ beyond {rel} relative; "
        f"worst error {float(error[bad].max()):.3g} at scale {float(scale.reshape(error.shape)[bad].max()):.3g}"
    )


TIERS = ("unit", "integration", "e2e")
"""The test tiers (declared in pyproject.toml); every test carries exactly one."""


def e2e_group(item: pytest.Item) -> str:
    """The ``xdist_group`` of an end-to-end test: its module, so a module's shared runs happen once."""
    return f"e2e:{item.nodeid.split('::')[0]}"


def run_order(item: pytest.Item) -> int:
    """Long end-to-end modules first, then the other e2e tests, then the rest (short tests even out the end)."""
    if item.get_closest_marker("e2e") is None:
        return 2
    return 0 if item.get_closest_marker("slow") is not None else 1


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a collection in which a test has no tier marker or more than one, naming the files.

    Under the README's ``-n 2 --dist loadgroup`` the end-to-end tests of a module run on one worker (one
    ``xdist_group`` per module: a module-scoped run is not repeated on the other worker), and workers
    list the long e2e modules first, so the two workers start on the longest work and end on short tests.
    """
    wrong: dict[str, list[str]] = {}
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if len(tiers) != 1:
            wrong.setdefault(item.nodeid.split("::")[0], []).append(f"{item.name} ({', '.join(tiers) or 'none'})")
        elif tiers == ["e2e"]:
            item.add_marker(pytest.mark.xdist_group(e2e_group(item)))
    if hasattr(config, "workerinput"):  # an xdist worker: hand out the long e2e modules first
        items.sort(key=run_order)
    if wrong:
        files = "; ".join(f"{path}: {len(names)} test(s), e.g. {names[0]}" for path, names in wrong.items())
        raise pytest.UsageError(
            "every test needs exactly one tier marker: pytest.mark.unit, pytest.mark.integration or pytest.mark.e2e "
            f"(`pytestmark = pytest.mark.unit` after the module's imports, or one per test); wrong in {files}"
        )


TIER_AUDIT_ENV = "FEDFUSE_TIER_AUDIT"
"""A file path: every subprocess a test outside the e2e tier starts (Ray included) is listed there."""

LIBRARY_PROBES = ("ldconfig", "uname")
"""Programs that ctypes and platform run to find a library or the CPU: no test starts these itself."""

_running: list[pytest.Item] = []


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread per test process; under ``$FEDFUSE_TIER_AUDIT``, spy on ``subprocess.Popen``.

    The tests' models are tiny: a second intra-op thread buys nothing and, on a busy 2-core machine (or
    beside a second xdist worker), its spinning doubles the wall time of in-process training and generation.
    The spy lists tests outside the e2e tier that start a process (Ray included): their tier is too low.
    """
    torch.set_num_threads(1)
    audit = os.environ.get(TIER_AUDIT_ENV)
    if not audit:
        return
    start = subprocess.Popen.__init__

    def spy(self: subprocess.Popen, args: Any, *more: Any, **options: Any) -> None:
        item = _running[-1] if _running else None
        program = Path(str(args[0] if isinstance(args, (list, tuple)) else args).split()[0]).name
        if item is not None and item.get_closest_marker("e2e") is None and program not in LIBRARY_PROBES:
            with open(audit, "a", encoding="utf-8") as log:
                log.write(f"{item.nodeid}\t{str(args)[:120]}\n")
        start(self, args, *more, **options)

    subprocess.Popen.__init__ = spy  # type: ignore[method-assign]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _running[:] = [item]
