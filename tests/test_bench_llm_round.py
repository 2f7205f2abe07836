"""``fedfuse bench llm-round``: the quick preset end to end (dense and the FlowerTune baseline), its pure parts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord
from peft import get_peft_model_state_dict
from typer.testing import CliRunner

from fedfuse.bench.llm_round import (
    common_config,
    default_data,
    memory_bound,
    svd_checks,
    variant_names,
    variant_overrides,
)
from fedfuse.bench.llm_round_measure import max_relative_difference
from fedfuse.cli.main import app
from fedfuse.settings import RunSettings
from fedfuse.training.run_model import attach_lora, base_model

# Tiers are marked per test here: this module mixes e2e and unit tests.


def _run(out: Path, variants: str, *extra: str) -> dict[str, Any]:
    args = ["bench", "llm-round", "--preset", "quick", "--variants", variants, "--out", str(out), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "fedfuse bench llm-round" in result.output
    return json.loads((out / "llm_round.json").read_text())


def _runs(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {run["variant"]: run for run in document["runs"]}


def _adapter_record(out: Path) -> ArrayRecord:
    """What a FlowerTune server sends: the PEFT adapter of the quick model as an ArrayRecord."""
    overrides = common_config(
        str(out / "llama-tiny"), default_data(), rounds=2, clients=2, local_steps=1, batch_size=2, max_length=64
    )
    settings = RunSettings.from_run_config({}, **overrides)
    model, _ = base_model(settings)
    return ArrayRecord(dict(get_peft_model_state_dict(attach_lora(model, settings, 1))))


@pytest.mark.e2e
@pytest.mark.slow
def test_quick_preset_reports_every_variant_round_by_round(tmp_path: Path) -> None:
    document = _run(tmp_path, "dense,factors,svd,flowertune", "--svd-ranks", "4")
    runs = _runs(document)
    assert list(runs) == ["dense", "factors", "svd-4", "flowertune"]
    for run in runs.values():
        assert [row["round"] for row in run["rounds"]] == [1, 2]
        for row in run["rounds"]:
            assert row["up_per_node"] > 0 and row["accepted"] == 2
            assert row["rss_above_start"] > 0 and row["fold_per_update"] > 0
            assert math.isfinite(row["train_loss"])
        assert run["rounds"][-1]["down_per_node"] > 0
    assert runs["factors"]["rounds"][-1]["max_rel_diff"] == 0.0, "the same merges sent as factors land on dense's bits"
    assert runs["factors"]["rounds"][-1]["down_per_node"] < runs["dense"]["rounds"][-1]["down_per_node"]
    assert runs["svd-4"]["rounds"][-1]["down_per_node"] < runs["factors"]["rounds"][-1]["down_per_node"]
    fold = document["fold_per_update"]["llama-tiny"]
    assert fold["fold_factors_s"] > 0 and fold["fold_dense_s"] > 0 and fold["decode_s"] > 0
    flowertune = runs["flowertune"]
    adapter = _adapter_record(tmp_path)
    adapter_bytes = sum(len(array.data) for array in adapter.values())
    assert [row["down_per_node"] for row in flowertune["rounds"]] == [adapter_bytes, adapter_bytes]
    headers = adapter_bytes - flowertune["adapter_bytes"]
    assert 0 < headers <= 128 * len(adapter), "4 bytes per entry plus each array's .npy header"
    dense_first, baseline_first = runs["dense"]["rounds"][0], flowertune["rounds"][0]
    assert baseline_first["train_loss"] == pytest.approx(dense_first["train_loss"], rel=1e-6), "same round-1 training"
    assert (tmp_path / "llm_round.md").read_text().count("| llama-tiny |") == 8


@pytest.mark.unit
def test_variants_run_dense_first_and_expand_svd_per_rank() -> None:
    assert variant_names(["flowertune", "svd", "dense"], [8, 32]) == ["dense", "svd-8", "svd-32", "flowertune"]
    assert variant_overrides("svd-32", True) == {"broadcast": "svd", "broadcast-rank": 32}
    assert variant_overrides("dense", False) == {} and variant_overrides("flowertune", True) == {}


@pytest.mark.unit
def test_relative_difference_is_against_the_reference_scale() -> None:
    reference = {"w": torch.tensor([[2.0, -4.0]]), "only_here": torch.ones(1)}
    assert max_relative_difference({"w": torch.tensor([[2.0, -3.0]])}, reference) == pytest.approx(0.25)
    assert math.isnan(max_relative_difference({"x": torch.ones(1)}, reference))


@pytest.mark.unit
def test_memory_bound_and_svd_target() -> None:
    rounds = [{"down_per_node": 10, "up_per_node": 20, "train_loss": 1.0, "accepted": 4, "fold_seconds": 1.0}]
    dense = {"variant": "dense", "clients": 4, "adapted_entries": 100, "factor_entries": 10, "rounds": rounds}
    factors = {**dense, "variant": "factors"}
    assert memory_bound(dense) == 400 + 400 + 20 + 400 * 10**6
    assert memory_bound(factors) == 4 * 4 * 10 + 400 + 20 + 400 * 10**6
    svd = {**dense, "variant": "svd-8", "rounds": [{**rounds[0], "train_loss": 1.01}]}
    assert memory_bound(svd) == 2 * 400 + 400 + 20 + 400 * 10**6, "the dense change and the residual it keeps"
    assert svd_checks("m", {"dense": dense, "svd-8": svd})[0][0]
    worse = {**svd, "rounds": [{**rounds[0], "train_loss": 1.05}]}
    assert not svd_checks("m", {"dense": dense, "svd-8": worse})[0][0]
