"""Specification of declared strategy parameters: the method table, coercion, refusals, presets, plug-ins."""

from __future__ import annotations

import pytest
import torch

from fedfuse.strategies import (
    BUILT_IN_PRESETS,
    BUILT_IN_STRATEGIES,
    Capabilities,
    MergeStrategy,
    Param,
    Preset,
    SpilledStrategy,
    StatisticsStrategy,
    Ties,
    add_at,
    build_strategy,
    format_strategy_params,
    method_spec,
    parse_strategy_params,
    register_preset,
    register_strategy,
    registry,
)

# Tiers are marked per test here: this module mixes integration and unit tests.

DECLARED = {
    "fedavg": ("lam",),
    "linear": ("lam", "normalize"),
    "task_arithmetic": ("lam", "normalize"),
    "ties": ("lam", "vote", "normalize"),
    "model_stock": ("lam", "filter_wise"),
    "fisher": ("lam", "eps"),
    "regmean": ("lam", "alpha"),
    "slerp": ("lam", "t"),
    "dare_linear": ("lam", "normalize"),
    "dare_ties": ("lam", "vote", "normalize"),
    "breadcrumbs": ("lam", "normalize"),
    "breadcrumbs_ties": ("lam", "vote", "normalize"),
    "della": ("lam", "vote", "normalize"),
    "della_linear": ("lam", "normalize"),
    "median": ("lam",),
    "trimmed_mean": ("lam", "trim"),
    "krum": ("lam", "byzantine", "select"),
    "multi_krum": ("lam", "byzantine"),
}
"""Every built-in method with its declared parameters, ``lam`` first."""


@pytest.fixture
def private_registry(monkeypatch):
    """Registrations made by a test are undone afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_PRESETS", dict(registry._PRESETS))


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(DECLARED))
def test_every_built_in_declares_its_parameters(name) -> None:
    assert method_spec(name).param_names == DECLARED[name]


@pytest.mark.unit
def test_the_method_table_lists_the_built_ins_and_presets() -> None:
    assert set(BUILT_IN_STRATEGIES) | {p.name for p in BUILT_IN_PRESETS} == set(DECLARED)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("name", "needs_fisher", "sparsifier", "preset_of"),
    [
        ("fedavg", False, "none", None),
        ("task_arithmetic", False, "none", None),
        ("ties", False, "trim", None),
        ("fisher", True, "none", None),
        ("dare_linear", False, "dare", "task_arithmetic"),
        ("dare_ties", False, "dare", "ties"),
    ],
)
def test_each_method_declares_fisher_need_sparsifier_and_mergeability(name, needs_fisher, sparsifier, preset_of):
    spec = method_spec(name)
    assert (spec.capabilities.needs_fisher, spec.default_sparsifier, spec.preset_of) == (
        needs_fisher,
        sparsifier,
        preset_of,
    )
    assert spec.capabilities.mergeable


@pytest.mark.unit
def test_declarations_carry_type_default_and_choices() -> None:
    vote = method_spec("ties").param("vote")
    assert (vote.type, vote.default, vote.choices) == (str, "mass", ("mass", "count"))
    eps = method_spec("fisher").param("eps")
    assert (eps.type, eps.default, eps.choices) == (float, 1e-12, ())


@pytest.mark.unit
def test_a_preset_is_a_row_over_its_base_class_not_a_subclass() -> None:
    strategy = build_strategy("dare_ties", {"vote": "count"})
    assert type(strategy) is Ties and strategy.name == "dare_ties" and strategy.default_sparsifier == "dare"
    assert strategy.identity() == {"strategy": "dare_ties", "lam": 1.0, "dtype": "float32", "vote": "count"}
    assert build_strategy("ties").default_sparsifier == "trim"


@pytest.mark.unit
def test_string_values_are_coerced_by_the_declared_type() -> None:
    fisher = build_strategy("fisher", {"eps": "1e-8", "lam": "0.5"})
    assert fisher.eps == 1e-8 and fisher.lam == 0.5
    assert build_strategy("ties", {"vote": "count"}, dtype="float64").dtype == torch.float64


@pytest.mark.unit
def test_an_undeclared_parameter_is_refused_in_one_line_listing_the_declared_ones() -> None:
    message = r"^strategy 'ties' has no parameter 'eps'; its parameters: lam, vote, normalize$"
    with pytest.raises(ValueError, match=message):
        build_strategy("ties", {"eps": 1e-8})


@pytest.mark.unit
@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("ties", {"vote": "majority"}, "parameter 'vote' must be one of mass, count; got 'majority'"),
        ("fisher", {"eps": "tiny"}, "parameter 'eps': cannot read 'tiny' as float"),
        ("fisher", {"eps": 0.0}, "eps must be > 0"),
        ("fedavg", {"lam": "nan"}, "parameter 'lam'"),
        ("fedavg", {"lam": True}, "parameter 'lam'"),
    ],
)
def test_bad_values_are_refused_naming_the_parameter(name, params, message) -> None:
    with pytest.raises(ValueError, match=f"strategy '{name}'.*{message}"):
        build_strategy(name, params)


@pytest.mark.unit
def test_parse_strategy_params_reads_commas_and_repeated_options() -> None:
    assert parse_strategy_params("eps=1e-8, vote=count") == {"eps": "1e-8", "vote": "count"}
    assert parse_strategy_params(["eps=1e-8", "vote=count"]) == {"eps": "1e-8", "vote": "count"}
    assert parse_strategy_params("") == {}
    assert parse_strategy_params(format_strategy_params({"eps": 1e-8, "vote": "count"})) == {
        "eps": "1e-08",
        "vote": "count",
    }


@pytest.mark.unit
@pytest.mark.parametrize(("text", "message"), [("eps", "name=value"), ("=1", "name=value"), ("a=1,a=2", "twice")])
def test_parse_strategy_params_refuses_malformed_entries(text, message) -> None:
    with pytest.raises(ValueError, match=message):
        parse_strategy_params(text)


class _Doubled(StatisticsStrategy):
    statistics = ("S",)

    def accumulate(self, stats, values, weight, fisher, index) -> None:
        add_at(stats["S"], values, index, alpha=2 * weight)

    def finalize_tensor(self, stats, total_weight):
        return stats["S"].clone()


@pytest.mark.unit
def test_a_plugin_without_declarations_gets_only_the_common_parameters(private_registry) -> None:
    register_strategy("doubled_test")(_Doubled)
    assert method_spec("doubled_test").param_names == ("lam",)
    assert build_strategy("doubled_test", {"lam": "0.5"}).lam == 0.5
    with pytest.raises(ValueError, match="no parameter 'beta'; its parameters: lam"):
        build_strategy("doubled_test", {"beta": 1})


@pytest.mark.unit
def test_a_plugin_declares_its_own_parameters(private_registry) -> None:
    @register_strategy("scaled_test")
    class Scaled(_Doubled):
        parameters = (Param("scale", float, 2.0, help="extra factor"),)

        def __init__(self, *, scale: float = 2.0, **common) -> None:
            super().__init__(**common)
            self.scale = scale

    assert method_spec("scaled_test").param_names == ("lam", "scale")
    assert build_strategy("scaled_test", {"scale": "3"}).scale == 3.0


@pytest.mark.unit
def test_a_plugin_cannot_redeclare_lam(private_registry) -> None:
    bad = type("BadLam", (_Doubled,), {"parameters": (Param("lam", float, 1.0),)})
    with pytest.raises(TypeError, match="lam"):
        register_strategy("bad_lam_test")(bad)


@pytest.mark.unit
def test_a_preset_fixes_base_parameters_which_are_then_not_settable(private_registry) -> None:
    register_preset(Preset("ties_count_test", base="ties", default_sparsifier="trim", fixed={"vote": "count"}))
    spec = method_spec("ties_count_test")
    assert spec.param_names == ("lam", "normalize") and spec.fixed == {"vote": "count"}
    assert build_strategy("ties_count_test").vote == "count"
    with pytest.raises(ValueError, match="fixes vote"):
        build_strategy("ties_count_test", {"vote": "mass"})


@pytest.mark.unit
def test_a_preset_cannot_fix_an_undeclared_parameter(private_registry) -> None:
    with pytest.raises(ValueError, match="eps"):
        register_preset(Preset("fedavg_eps_test", base="fedavg", fixed={"eps": 1.0}))


@pytest.mark.integration
def test_simulate_passes_strategy_param_options_as_the_strategy_params_key(monkeypatch) -> None:
    from typer.testing import CliRunner

    from fedfuse.cli import simulate as simulate_cli
    from fedfuse.cli.main import app

    seen: dict = {}
    monkeypatch.setattr(simulate_cli, "run_simulation", lambda overrides, **kwargs: seen.update(overrides))
    args = ["simulate", "--strategy", "fisher", "--mode", "full", "--run-config", "strategy-params=eps=1e-6"]
    result = CliRunner().invoke(app, [*args, "--strategy-param", "eps=1e-8", "--strategy-param", "lam=0.5"])
    assert result.exit_code == 0, result.output
    assert seen["strategy-params"] == "eps=1e-8,lam=0.5"  # the option wins over --run-config


@pytest.mark.integration
def test_simulate_refuses_an_undeclared_strategy_param_before_anything_starts(monkeypatch) -> None:
    from typer.testing import CliRunner

    from fedfuse.cli import simulate as simulate_cli
    from fedfuse.cli.main import app

    monkeypatch.setattr(simulate_cli, "run_simulation", lambda *a, **k: pytest.fail("the simulation started"))
    result = CliRunner().invoke(
        app, ["simulate", "--strategy", "ties", "--strategy-param", "eps=1"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 2
    assert "strategy 'ties' has no parameter 'eps'; its parameters: lam, vote" in result.output
    assert "Traceback" not in result.output


@pytest.mark.unit
def test_capabilities_are_one_record_on_the_spec_and_the_instance() -> None:
    assert method_spec("fisher").capabilities == Capabilities(needs_fisher=True, averages=True)
    assert method_spec("dare_ties").capabilities == method_spec("ties").capabilities
    assert method_spec("median").capabilities.mergeable is False
    plain = build_strategy("linear", {"normalize": False})
    assert (plain.capabilities.needs_base, plain.capabilities.averages) == (True, False)
    assert method_spec("linear").capabilities.needs_base is False  # the class's record is left as declared
    assert not plain.reference_free and build_strategy("linear").reference_free


@pytest.mark.unit
def test_the_two_bases_have_no_stubs_of_the_other() -> None:
    median = build_strategy("median")
    assert isinstance(median, MergeStrategy) and isinstance(median, SpilledStrategy)
    assert not hasattr(median, "accumulate") and not hasattr(median, "finalize_tensor")
    assert not hasattr(build_strategy("fedavg"), "merge_rows")
    with pytest.raises(TypeError, match="must define finalize_tensor"):

        class _NoFinalize(StatisticsStrategy):
            def accumulate(self, stats, values, weight, fisher, index) -> None:
                pass


@pytest.mark.unit
def test_a_plugin_written_before_the_split_still_works(private_registry) -> None:
    with pytest.warns(DeprecationWarning, match="Capabilities"):

        class Old(MergeStrategy):  # the pre-split form: MergeStrategy with accumulate and flag attributes
            statistics = ("S",)
            needs_fisher = True

            def accumulate(self, stats, values, weight, fisher, index) -> None:
                add_at(stats["S"], values * fisher, index, alpha=weight)

            def finalize_tensor(self, stats, total_weight):
                return stats["S"] / total_weight

    register_strategy("old_test")(Old)
    assert isinstance(build_strategy("old_test"), StatisticsStrategy)
    assert method_spec("old_test").capabilities == Capabilities(needs_fisher=True)
    state = build_strategy("old_test").new_state().add({"w": torch.ones(2)}, 2.0, {"w": torch.full((2,), 3.0)})
    assert state.finalize()["w"].tolist() == [3.0, 3.0]
