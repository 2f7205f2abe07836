"""``fedfuse bench merge-quality``: its statistics on known numbers, the skill data, and a tiny end-to-end run.

The end-to-end runs use a 2-layer Llama built from a config (nothing downloaded) and check structure —
files, rows, the interference matrix, the λ choice, the expert cache — never quality.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from own_data_helpers import tiny_chat_llama
from typer.testing import CliRunner

from fedfuse.bench import merge_quality
from fedfuse.bench import merge_quality_experts as experts
from fedfuse.bench.merge_quality_eval import geometric_mean, mean_interval, retention, t_quantile
from fedfuse.cli.main import app
from fedfuse.data import skills

# Tiers are marked per test here: this module mixes e2e and integration and unit tests.


@pytest.mark.unit
def test_retention_is_merged_over_expert_and_nan_without_an_expert_skill():
    assert retention(0.45, 0.9) == pytest.approx(0.5)
    assert retention(0.9, 0.9) == 1.0
    assert math.isnan(retention(0.3, 0.0))


@pytest.mark.unit
def test_geometric_mean_on_known_numbers_skips_nan_and_is_zero_when_a_skill_is_lost():
    assert geometric_mean([1.0, 4.0]) == pytest.approx(2.0)
    assert geometric_mean([0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert geometric_mean([2.0, math.nan, 8.0]) == pytest.approx(4.0)
    assert geometric_mean([0.9, 0.0, 1.0]) == 0.0
    assert math.isnan(geometric_mean([math.nan]))
    with pytest.raises(ValueError):
        geometric_mean([-1.0, 1.0])


@pytest.mark.unit
def test_confidence_interval_is_the_student_t_half_width():
    mean, half = mean_interval([1.0, 2.0, 3.0])
    # s = 1, n = 3, t(0.975, 2) = 4.302653
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    mean, half = mean_interval([0.7, 0.7, 0.7, 0.7])
    assert (mean, half) == (pytest.approx(0.7), pytest.approx(0.0))
    assert t_quantile(0.975, 1) == pytest.approx(12.706205, rel=1e-5)
    assert t_quantile(0.975, 9) == pytest.approx(2.262157, rel=1e-5)
    mean, half = mean_interval([0.5])
    assert mean == 0.5 and math.isnan(half)


@pytest.mark.unit
def test_skill_generators_are_deterministic_with_disjoint_splits():
    assert len(skills.SKILLS) >= 4
    for name in skills.SKILLS:
        splits = {split: skills.examples(name, split, 40) for split in skills.SPLITS}
        assert splits["train"] == skills.examples(name, "train", 40), f"{name} is not deterministic"
        prompts = {split: {p for p, _ in pairs} for split, pairs in splits.items()}
        assert all(len(p) == 40 for p in prompts.values()), f"{name} repeats a prompt within a split"
        assert not prompts["train"] & prompts["validation"], name
        assert not prompts["train"] & prompts["test"], name
        assert not prompts["validation"] & prompts["test"], name
        assert all(skills.split_of(p) == split for split, ps in prompts.items() for p in ps)
    for prompt, answer in skills.examples("arithmetic", "test", 5):
        a, b = map(int, re.findall(r"\d+", prompt))
        assert answer == str(a + b), prompt


@pytest.mark.unit
def test_answers_match_after_normalizing_only():
    assert skills.is_correct(" 85.\n", "85")
    assert skills.is_correct('"APPLE-apple"', "apple-apple")
    assert not skills.is_correct("The answer is 85", "85")
    assert not skills.is_correct("", "85")


@pytest.mark.unit
def test_skill_files_and_institution_folder_have_the_promised_names_and_rows(tmp_path):
    files = skills.write_skill_files(tmp_path, ["repeat", "sort"], counts={"train": 5, "validation": 2, "test": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{s}-{split}.jsonl" for s in ("repeat", "sort") for split in skills.SPLITS
    )
    rows = [json.loads(line) for line in files["sort"]["test"].read_text().splitlines()]
    assert len(rows) == 3 and {r["skill"] for r in rows} == {"sort"}
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]
    inst = skills.write_institution_dir(tmp_path / "inst", ["sort", "repeat"], count=4)
    assert [p.name for p in inst] == ["repeat.jsonl", "sort.jsonl"]


@pytest.mark.unit
def test_merges_of_identical_experts_give_back_the_expert():
    delta = {"w.weight": torch.randn(6, 5)}
    for method in ("task_arithmetic", "fedavg", "ties"):
        tau = experts.merge(method, [delta, delta], seed=0)
        expected = delta["w.weight"] * (2 if method == "task_arithmetic" else 1)
        if method == "ties":  # trimmed to 20 % before the disjoint mean
            kept = tau["w.weight"] != 0
            assert int(kept.sum()) == int(0.2 * 30)
            expected = expected * kept
        assert torch.allclose(tau["w.weight"], expected, atol=1e-6), method
    factors = {"m.lora_A": torch.randn(2, 5), "m.lora_B": torch.randn(6, 2)}
    naive = experts.naive_merge([factors, factors], scale=2.0)
    assert torch.allclose(naive["m.weight"], experts.expert_deltas(factors, 2.0)["m.weight"], atol=1e-5)
    assert experts.lambda_grid("task_arithmetic", 4) == experts.SUM_GRID
    assert experts.lambda_grid("fedavg", 4) == (1.0, 2.0, 3.0, 4.0)


@pytest.mark.integration
def test_unknown_method_or_skill_is_a_one_line_error(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "merge-quality", "--methods", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown merge methods" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["bench", "merge-quality", "--skills", "juggling", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "juggling" in result.output


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_chat_llama(tmp_path_factory.mktemp("merge-quality") / "tiny-chat-llama")


TINY_ARGS = [
    "--skills", "repeat,arithmetic", "--steps", "2", "--seeds", "1", "--batch-size", "4", "--lora-rank", "2",
    "--train-rows", "8", "--validation-rows", "3", "--test-rows", "4", "--max-length", "96",
    "--threads", "1",  # the tests' one torch thread (tests/conftest.py): a second one only spins on tiny models
    "--search-budget", "3", "--learn-steps", "2", "--layer-groups", "2",
    "--methods", "task_arithmetic,ties,dare_ties,regmean,naive_factor_average",  # last: the federated test swaps it
]  # fmt: skip


@pytest.mark.integration
def test_bench_end_to_end_on_a_tiny_llama_writes_json_png_and_reuses_cached_experts(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "mq"
    args = ["bench", "merge-quality", "--model", str(tiny_model), *TINY_ARGS, "--out", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads((out / "merge-quality.json").read_text())
    assert (out / "merge-quality.png").stat().st_size > 0 and (out / "merge-quality.md").is_file()
    assert report["skills"] == ["repeat", "arithmetic"]
    seed = report["seeds"][0]
    assert set(seed["interference"]) == {"repeat", "arithmetic"}
    assert all(set(row) == {"repeat", "arithmetic"} for row in seed["interference"].values())
    for method in ("task_arithmetic", "ties", "dare_ties", "regmean", "naive_factor_average"):
        merged = seed["merges"][method]
        assert merged["lam"] in experts.lambda_grid(method, 2)
        assert len(merged["validation"]) == len(experts.lambda_grid(method, 2))
        assert all(0.0 <= a <= 1.0 for a in merged["test"].values())
    names = [row["name"] for row in report["rows"]]
    assert names[:2] == ["base model", "own expert"] and "ties" in names
    for method, spent in [("greedy_soup", "validation evaluations"), ("searched", "3 validation evaluations"),
                          ("adamerging", "2 gradient steps"), ("learned", "2 gradient steps")]:  # fmt: skip
        row = next(r for r in report["rows"] if r["name"] == method)
        normalized = row["normalized"][0]  # NaN when no tiny expert learned its own skill
        assert spent in row["budget"] and (math.isnan(normalized) or 0.0 <= normalized <= 2.0), row
        assert all(0.0 <= a <= 1.0 for a in seed["merges"][method]["test"].values())
    assert (
        seed["merges"]["searched"]["detail"]["scores"][0]
        == seed["merges"]["searched"]["detail"]["validation"]["baseline"]
    )
    assert set(seed["merges"]["learned"]["detail"]["coefficients"]) == {"repeat", "arithmetic"}
    assert all(len(v) == 2 for v in seed["merges"]["learned"]["detail"]["coefficients"].values())  # 2 layer groups
    assert any("without Gram matrices" in c["check"] for c in report["checks"])
    assert len(list((out / "auto").glob("*.json"))) == 4
    assert any("mean normalized retention" in c["check"] for c in report["checks"])
    assert any("task arithmetic" in c["check"] for c in report["checks"])
    assert "PASS" in result.output or "FAIL" in result.output
    cached = sorted(p.name for p in (out / "experts").iterdir())
    assert len(cached) == 2 and all("steps2" in name for name in cached)

    def no_training(*args, **kwargs):
        raise AssertionError("a cached expert was trained again")

    def no_scoring(*args, **kwargs):
        raise AssertionError("a cached seed was scored again")

    monkeypatch.setattr(experts, "run_local_round", no_training)
    monkeypatch.setattr(merge_quality, "run_seed", no_scoring)
    again = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert again.exit_code == 0, again.output
    assert "scores read from" in again.output and "scoring the base model" not in again.output
    assert json.loads((out / "merge-quality.json").read_text())["seeds"] == report["seeds"]
    next((out / "seeds").iterdir()).unlink()  # scores gone, experts cached: merged and scored, not trained
    monkeypatch.undo()
    monkeypatch.setattr(experts, "run_local_round", no_training)
    third = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert third.exit_code == 0, third.output
    assert json.loads((out / "merge-quality.json").read_text())["seeds"][0]["interference"] == seed["interference"]
    assert not [p for p in out.rglob("*") if ".fedfuse-tmp-" in p.name]


@pytest.mark.e2e
def test_federated_variant_merges_seed_0s_experts_through_a_fedfuse_round(tiny_model, tmp_path):
    out = tmp_path / "mq"
    args = [*TINY_ARGS[:-1], "task_arithmetic", "--automated", "learned", "--federated-methods", "learned"]
    command = ["bench", "merge-quality", "--model", str(tiny_model), *args, "--federated", "--out", str(out)]
    result = CliRunner().invoke(app, command, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads((out / "merge-quality.json").read_text())
    federated = report["seeds"][0]["federated"]
    assert list(federated) == ["learned"]  # the institutions learned the coefficients; no fixed-λ run asked for
    assert set(federated["learned"]) == {"repeat", "arithmetic"}
    assert all(0.0 <= a <= 1.0 for a in federated["learned"].values())
    row = next(r for r in report["rows"] if r["name"] == "federated learned")
    assert "each institution's gradient" in row["budget"]
    assert any("federated coefficient learning within" in c["check"] for c in report["checks"])
    assert list((out / "federated").glob("learned-seed0-*.json")), "the federated result is cached"
    run = next(p for p in (out / "federated").iterdir() if p.is_dir())
    rounds = json.loads((run / "report.json").read_text())["rounds"]
    learned = rounds[-1]["coefficients"]  # the one real simulate run of coefficient learning in the suite
    assert learned["objective"] == "loss" and len(learned["history"]) == 2  # --learn-steps 2
    assert learned["labels"] == ["partition-0", "partition-1"] and learned["nodes"] == 2 and not learned["dropped"]
    assert [len(row) for row in learned["coefficients"]] == [2, 2]  # 2 institutions × --layer-groups 2
    assert learned["bytes_down_candidates"] > 0 and learned["bytes_up"] > 0
    assert "Learned merge coefficients" in (run / "report.md").read_text()
