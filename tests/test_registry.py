"""Specification of strategies by name: built-ins, ``@register_strategy`` and ``fedfuse.strategies`` entry points."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from fedfuse.strategies import (
    ENTRY_POINT_GROUP,
    FedAvg,
    MergeStrategy,
    Ties,
    add_at,
    available_strategies,
    get_strategy,
    register_strategy,
    registry,
    strategy_class,
)

pytestmark = pytest.mark.unit

BUILT_INS = ["dare_linear", "dare_ties", "fedavg", "fisher", "task_arithmetic", "ties"]


@pytest.fixture
def private_registry(monkeypatch):
    """Registrations made by a test are undone afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_PRESETS", dict(registry._PRESETS))


@pytest.mark.parametrize("name", BUILT_INS)
def test_every_built_in_is_available_by_name(name) -> None:
    assert name in available_strategies()
    strategy = get_strategy(name, lam=0.5)
    assert strategy.name == name and strategy.lam == 0.5 and strategy_class(name) is type(strategy)


def test_get_strategy_passes_the_strategy_own_parameters() -> None:
    strategy = get_strategy("ties", vote="count", dtype="float64")
    assert isinstance(strategy, Ties) and strategy.vote == "count" and strategy.dtype == torch.float64
    assert get_strategy("fisher", eps=1e-6).eps == 1e-6


def test_an_unknown_name_lists_the_available_strategies() -> None:
    with pytest.raises(ValueError, match="unknown merge strategy 'geometric_median'") as error:
        get_strategy("geometric_median")
    for name in BUILT_INS:
        assert name in str(error.value)


def test_an_unexpected_parameter_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"strategy 'fedavg'.*density"):
        get_strategy("fedavg", density=0.2)


def test_a_bad_parameter_value_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="vote"):
        get_strategy("ties", vote="majority")


def test_register_strategy_makes_a_class_available_by_name(private_registry) -> None:
    @register_strategy("sum_of_squares_test")
    class SumOfSquares(MergeStrategy):
        statistics = ("S",)

        def accumulate(self, stats, values, weight, fisher, index) -> None:
            add_at(stats["S"], values * values, index, alpha=weight)

        def finalize_tensor(self, stats, total_weight):
            return stats["S"].clone()

    assert "sum_of_squares_test" in available_strategies()
    strategy = get_strategy("sum_of_squares_test")
    assert isinstance(strategy, SumOfSquares) and strategy.name == "sum_of_squares_test"
    merged = strategy.new_state().add({"w": torch.tensor([1.0, -2.0])}).add({"w": torch.tensor([3.0, 0.0])}, 2.0)
    assert torch.equal(merged.finalize()["w"], torch.tensor([19.0, 4.0]))


def test_a_name_cannot_be_taken_twice(private_registry) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("fedavg")(type("OtherAvg", (FedAvg,), {}))
    assert register_strategy("fedavg")(FedAvg) is FedAvg


def test_only_merge_strategies_can_be_registered(private_registry) -> None:
    with pytest.raises(TypeError, match="not a MergeStrategy"):
        register_strategy("not_a_strategy")(dict)


PLUGIN_SOURCE = '''
"""A third-party strategy: twice the weighted sum."""
from fedfuse.strategies import MergeStrategy, add_at


class MyStrategy(MergeStrategy):
    statistics = ("S",)

    def accumulate(self, stats, values, weight, fisher, index):
        add_at(stats["S"], values, index, alpha=2 * weight)

    def finalize_tensor(self, stats, total_weight):
        return stats["S"].clone()
'''


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch, private_registry):
    """A module plus dist-info on sys.path, as ``pip install`` of a plug-in package would leave them."""
    (tmp_path / "fedfuse_test_plugin.py").write_text(PLUGIN_SOURCE)
    dist_info = tmp_path / "fedfuse_test_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedfuse-test-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        textwrap.dedent(f"""\
            [{ENTRY_POINT_GROUP}]
            my_plugin = fedfuse_test_plugin:MyStrategy
            """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("fedfuse_test_plugin", None)


def test_a_strategy_installed_through_an_entry_point_is_found_and_used(installed_plugin) -> None:
    assert "fedfuse_test_plugin" not in sys.modules
    assert "my_plugin" in available_strategies()
    strategy = get_strategy("my_plugin", lam=0.5)
    assert type(strategy).__module__ == "fedfuse_test_plugin" and strategy.name == "my_plugin"
    state = strategy.new_state().add({"w": torch.tensor([1.0, -3.0])}).add({"w": torch.tensor([2.0, 1.0])}, 3.0)
    assert torch.equal(state.finalize()["w"], 0.5 * 2 * torch.tensor([1.0 + 6.0, -3.0 + 3.0]))


def test_entry_points_are_not_found_without_the_plugin(private_registry) -> None:
    assert "my_plugin" not in available_strategies()
    with pytest.raises(ValueError, match="unknown merge strategy 'my_plugin'"):
        get_strategy("my_plugin")


def test_a_plugin_that_fails_to_import_is_a_clear_error(tmp_path, monkeypatch, private_registry) -> None:
    dist_info = tmp_path / "broken_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nbroken = no_such_module_xyz:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"'broken'.*failed to load"):
        get_strategy("broken")
