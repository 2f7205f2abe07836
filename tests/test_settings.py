"""Run settings: defaults, run-config parsing, errors that name the key, and pyproject in sync."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedfuse.settings import RunSettings, SettingsError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def test_empty_run_config_gives_the_defaults():
    assert RunSettings.from_run_config({}) == RunSettings()


def test_pyproject_app_config_lists_every_setting_with_its_default():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert RunSettings.from_run_config(config) == RunSettings()
    assert set(config) == set(RunSettings().to_run_config())


def test_dashed_keys_and_cli_strings_are_coerced():
    settings = RunSettings.from_run_config(
        {"num-server-rounds": "3", "density": "0.2", "error-feedback": "false", "learning-rate": "0.01"},
        strategy="ties",
    )
    assert settings.run.num_server_rounds == 3 and settings.compression.density == 0.2
    assert (
        settings.compression.error_feedback is False
        and settings.training.lr == 0.01
        and settings.merge.strategy == "ties"
    )


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(SettingsError, match=r"unknown run-config key 'num-rounds'.*num-server-rounds"):
        RunSettings.from_run_config({"num-rounds": 3})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"strategy": "nope"}, "strategy must be one of"),
        ({"density": 0}, r"density must be in \(0, 1\]"),
        ({"num-server-rounds": "many"}, "num-server-rounds: cannot read 'many'"),
        ({"mode": "qlora"}, "mode must be one of lora, full"),
        ({"strategy": "fisher"}, "strategy 'fisher' needs mode 'full'"),
        ({"local-steps": 0}, "would not train"),
        (
            {"mode": "full", "sparsifier": "dare", "seed-scope": "round", "error-feedback": True},
            "same entries every round",
        ),
        ({"error-feedback": "maybe"}, "error-feedback: cannot read"),
    ],
)
def test_bad_values_name_the_key(config, message):
    with pytest.raises(SettingsError, match=message):
        RunSettings.from_run_config(config)


def test_auto_values_resolve_by_mode_and_strategy():
    assert RunSettings.from_run_config(mode="lora").training.lr == 3e-3
    assert RunSettings.from_run_config(mode="full").training.lr == 1e-4
    assert RunSettings.from_run_config(mode="full", strategy="fisher").fisher_batch_count == 4
    assert RunSettings().fisher_batch_count == 0
    assert RunSettings().training.target_modules is None
    assert RunSettings.from_run_config(lora_target_modules="query, key").training.target_modules == ["query", "key"]


def test_error_feedback_auto_means_trim_only_and_never_lora():
    assert RunSettings.from_run_config(mode="full", sparsifier="trim").uses_error_feedback
    assert not RunSettings.from_run_config(mode="full", sparsifier="dare").uses_error_feedback
    assert RunSettings.from_run_config(mode="full", sparsifier="dare", error_feedback=True).uses_error_feedback
    assert not RunSettings.from_run_config(mode="full", sparsifier="trim", error_feedback=False).uses_error_feedback
    assert not RunSettings.from_run_config(mode="lora", sparsifier="trim").uses_error_feedback
    assert not RunSettings.from_run_config(mode="full", sparsifier="none").uses_error_feedback
    assert RunSettings.from_run_config({"error-feedback": "auto"}).compression.error_feedback == "auto"
    assert RunSettings.from_run_config(sparsifier="dare", seed_scope="round").uses_error_feedback is False


def test_sparsifier_spec_ignores_density_when_dense():
    assert RunSettings.from_run_config(sparsifier="none", density=0.1).compression.sparsifier_spec.density == 1.0
    assert RunSettings.from_run_config(sparsifier="trim", density=0.1).compression.sparsifier_spec.density == 0.1


# --- settings by section ------------------------------------------------------------------------


def test_each_key_lives_in_one_section_and_flat_keys_round_trip() -> None:
    settings = RunSettings.from_run_config(local_steps=3, strategy="ties", seed=7, density=0.5, model="smollm2")
    assert (settings.training.local_steps, settings.merge.strategy, settings.run.seed) == (3, "ties", 7)
    assert (settings.compression.density, settings.source.model) == (0.5, "smollm2")
    assert RunSettings.from_run_config(settings.to_run_config()) == settings
    assert all("_" not in key for key in settings.to_run_config())


def test_replace_takes_flat_names_and_checks_again() -> None:
    settings = RunSettings().replace(strategy="ties", local_steps=5)
    assert settings.merge.strategy == "ties" and settings.training.local_steps == 5
    with pytest.raises(SettingsError, match=r"unknown setting 'local_step'.*local-steps"):
        RunSettings().replace(local_step=5)
    with pytest.raises(SettingsError, match="needs mode 'full'"):
        RunSettings().replace(strategy="fisher")


def test_a_section_checks_its_own_fields_when_built_alone() -> None:
    from fedfuse.settings import CompressionSettings, TrainingSettings

    with pytest.raises(SettingsError, match="mode must be one of lora, full"):
        TrainingSettings(mode="qlora")
    with pytest.raises(SettingsError, match=r"density must be in \(0, 1\]"):
        CompressionSettings(density=1.5)


# --- declared strategy parameters in the settings ------------------------------------------------


def test_strategy_params_are_parsed_and_built_with_lam_and_device() -> None:
    from fedfuse.settings import build_merge_strategy

    fisher = build_merge_strategy(
        RunSettings.from_run_config(strategy="fisher", mode="full", lam=0.5, device="cpu", strategy_params="eps=1e-8")
    )
    assert (fisher.name, fisher.eps, fisher.lam, fisher.device.type) == ("fisher", 1e-8, 0.5, "cpu")
    ties = build_merge_strategy(RunSettings.from_run_config(strategy="dare_ties", strategy_params="vote=count"))
    assert (ties.name, ties.vote) == ("dare_ties", "count")
    assert build_merge_strategy(RunSettings.from_run_config(strategy="ties", vote="count")).vote == "count"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"strategy": "ties", "strategy-params": "eps=1e-8"},
            "strategy-params: strategy 'ties' has no parameter 'eps'",
        ),
        ({"strategy": "fisher", "mode": "full", "strategy-params": "eps=small"}, "strategy-params:.*'eps'.*small"),
        ({"strategy": "fisher", "mode": "full", "strategy-params": "eps=0"}, "strategy-params:.*eps must be > 0"),
        ({"strategy-params": "lam"}, "strategy-params: strategy parameters are name=value"),
        ({"strategy": "ties", "vote": "majority"}, "vote:.*must be one of mass, count"),
        ({"vote": "count"}, "vote applies only to strategies that declare it.*'fedavg' does not"),
        ({"strategy": "ties", "vote": "count", "strategy-params": "vote=mass"}, "vote is 'count' but strategy-params"),
    ],
)
def test_bad_strategy_parameters_name_the_key(config, message) -> None:
    with pytest.raises(SettingsError, match=message):
        RunSettings.from_run_config(config)


@pytest.fixture
def fisher_plugin(monkeypatch):
    """A registered plug-in strategy that needs Fisher, under a name that is not 'fisher'."""
    from fedfuse.strategies import MergeStrategy, add_at, register_strategy, registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_strategy("fisher_like_test")
    class FisherLike(MergeStrategy):
        statistics = ("S",)
        needs_fisher = True

        def accumulate(self, stats, values, weight, fisher, index) -> None:
            add_at(stats["S"], fisher * values, index, alpha=weight)

        def finalize_tensor(self, stats, total_weight):
            return stats["S"].clone()

    return "fisher_like_test"


def test_a_plugin_that_needs_fisher_is_refused_in_lora_mode(fisher_plugin) -> None:
    with pytest.raises(SettingsError, match="strategy 'fisher_like_test' needs mode 'full'"):
        RunSettings.from_run_config(strategy=fisher_plugin)
    with pytest.raises(SettingsError, match="strategy 'fisher_like_test' needs fisher-batches >= 1"):
        RunSettings.from_run_config(strategy=fisher_plugin, mode="full", fisher_batches=0)


def test_a_plugin_that_needs_fisher_gets_fisher_batches_so_its_updates_are_not_rejected(fisher_plugin) -> None:
    import torch

    from fedfuse.settings import build_merge_strategy

    settings = RunSettings.from_run_config(strategy=fisher_plugin, mode="full")
    assert settings.fisher_batch_count == 4  # clients compute a Fisher diagonal and send it
    state = build_merge_strategy(settings).new_state()
    with pytest.raises(ValueError, match="needs a Fisher diagonal"):
        state.add({"w": torch.ones(2)})  # what every update was without it
    state.add({"w": torch.ones(2)}, 1.0, {"w": torch.full((2,), 3.0)})
    assert torch.equal(state.finalize()["w"], torch.full((2,), 3.0))
