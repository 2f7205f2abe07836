"""Run settings: defaults, run-config parsing, errors that name the key, and pyproject in sync."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedfuse.settings import RunSettings, SettingsError

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
    assert settings.num_server_rounds == 3 and settings.density == 0.2
    assert settings.error_feedback is False and settings.lr == 0.01 and settings.strategy == "ties"


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(SettingsError, match="unknown run-config key 'num-rounds'.*num-server-rounds"):
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
        ({"mode": "full", "sparsifier": "dare", "seed-scope": "round", "error-feedback": True}, "same entries every round"),
        ({"error-feedback": "maybe"}, "error-feedback: cannot read"),
    ],
)
def test_bad_values_name_the_key(config, message):
    with pytest.raises(SettingsError, match=message):
        RunSettings.from_run_config(config)


def test_auto_values_resolve_by_mode_and_strategy():
    assert RunSettings(mode="lora").lr == 3e-3
    assert RunSettings(mode="full").lr == 1e-4
    assert RunSettings(mode="full", strategy="fisher").fisher_batch_count == 4
    assert RunSettings().fisher_batch_count == 0
    assert RunSettings().target_modules is None
    assert RunSettings(lora_target_modules="query, key").target_modules == ["query", "key"]


def test_error_feedback_auto_means_trim_only_and_never_lora():
    assert RunSettings(mode="full", sparsifier="trim").uses_error_feedback
    assert not RunSettings(mode="full", sparsifier="dare").uses_error_feedback
    assert RunSettings(mode="full", sparsifier="dare", error_feedback=True).uses_error_feedback
    assert not RunSettings(mode="full", sparsifier="trim", error_feedback=False).uses_error_feedback
    assert not RunSettings(mode="lora", sparsifier="trim").uses_error_feedback
    assert not RunSettings(mode="full", sparsifier="none").uses_error_feedback
    assert RunSettings.from_run_config({"error-feedback": "auto"}).error_feedback == "auto"
    assert RunSettings(sparsifier="dare", seed_scope="round").uses_error_feedback is False


def test_sparsifier_spec_ignores_density_when_dense():
    assert RunSettings(sparsifier="none", density=0.1).sparsifier_spec.density == 1.0
    assert RunSettings(sparsifier="trim", density=0.1).sparsifier_spec.density == 0.1
