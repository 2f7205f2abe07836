"""Mergeability diagnostics: planted outliers rank first, sign conflicts, the round engine's report, report.json,
and ``fedfuse merge … --diagnose`` (a report, no model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_runs import SEEDED_RUN
from typer.testing import CliRunner

from fedfuse.algebra.diagnostics import DiagnosticsReport, MergeDiagnostics, outlier_scores, sign_conflicts
from fedfuse.algebra.sketch import COSINE_TOLERANCE
from fedfuse.cli.main import app
from fedfuse.offline import MergeInputError, diagnose_models, merge_models
from fedfuse.rounds import RoundEngine, RoundPolicy, UpdateSpace
from fedfuse.server.history import RoundRecord, RunHistory
from fedfuse.server.report import write_report
from fedfuse.strategies import get_strategy
from fedfuse.wire import UpdateHeader, encode_partial, fingerprint

# Tiers are marked per test: pure and in-process engine tests are unit, CLI and grid runs integration.

SHAPES = {"layer.weight": (16, 12), "layer.bias": (12,), "head.weight": (4, 16)}


def _direction(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}


def _cohort(outlier: float, noise: float = 0.3, count: int = 8, planted: int = 5) -> list[dict[str, torch.Tensor]]:
    """``count`` updates: one direction plus noise; update ``planted`` is the direction times ``outlier``."""
    base, g = _direction(), torch.Generator().manual_seed(1)
    updates = [{n: t + noise * torch.randn(t.shape, generator=g) for n, t in base.items()} for _ in range(count)]
    updates[planted] = {n: outlier * t for n, t in updates[planted].items()}
    return updates


def _mean(updates: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {n: sum(u[n] for u in updates) / len(updates) for n in updates[0]}


def _report(updates: list[dict[str, torch.Tensor]], merged=None) -> DiagnosticsReport:
    diagnostics = MergeDiagnostics(seed=7)
    for i, update in enumerate(updates):
        diagnostics.add(f"inst-{i}", update, weight=1.0)
    return diagnostics.report(_mean(updates) if merged is None else merged)


@pytest.mark.unit
@pytest.mark.parametrize("outlier", [-1.0, -3.0, 12.0, 0.05])
def test_a_planted_outlier_ranks_first(outlier: float) -> None:
    """Reversed, reversed and scaled, scaled far up, scaled far down: each ranks first."""
    report = _report(_cohort(outlier))
    assert report.outlier_ranking[0] == "inst-5"
    scores = {u.label: u.outlier_score for u in report.updates}
    assert scores["inst-5"] > 3 * max(s for label, s in scores.items() if label != "inst-5")


@pytest.mark.unit
def test_without_an_outlier_no_score_stands_out() -> None:
    report = _report(_cohort(1.0))
    assert max(u.outlier_score for u in report.updates) < 3.0


@pytest.mark.unit
def test_norms_are_exact_and_cosines_are_within_the_tolerance() -> None:
    updates = _cohort(-1.0)
    merged = _mean(updates)
    report = _report(updates, merged)

    def flat(u: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([u[n].reshape(-1).double() for n in SHAPES])

    for row, update in zip(report.updates, updates, strict=True):
        assert row.norm == pytest.approx(float(flat(update).norm()), rel=1e-9)
        exact = float(torch.nn.functional.cosine_similarity(flat(update), flat(merged), dim=0))
        assert row.cosine_to_merged == pytest.approx(exact, abs=COSINE_TOLERANCE)
    exact_pair = float(torch.nn.functional.cosine_similarity(flat(updates[0]), flat(updates[5]), dim=0))
    assert report.cosines[0][5] == pytest.approx(exact_pair, abs=COSINE_TOLERANCE)
    assert report.cosines[0][5] == report.cosines[5][0] and report.cosines[2][2] == pytest.approx(1.0)


@pytest.mark.unit
def test_sign_conflict_mass_is_zero_for_identical_updates_and_high_for_opposite_ones() -> None:
    same = _report([_direction()] * 4)
    assert same.sign_conflict_mass == 0.0 and all(u.sign_conflict == 0.0 for u in same.updates)
    assert same.norm_ratio == pytest.approx(1.0) and same.norm_cv == pytest.approx(0.0, abs=1e-12)
    x = _direction()
    opposite = _report([x, {n: -1.1 * t for n, t in x.items()}])
    assert opposite.sign_conflict_mass == pytest.approx(1 / 2.1, rel=1e-6)
    assert opposite.updates[0].sign_conflict == pytest.approx(1.0)
    assert opposite.updates[1].sign_conflict == pytest.approx(0.0)
    tied = _report([x, {n: -t for n, t in x.items()}])
    assert tied.sign_conflict_mass == pytest.approx(1.0)


@pytest.mark.unit
def test_sign_conflicts_and_scores_by_hand() -> None:
    samples = torch.tensor([[1.0, -2.0, 3.0], [1.0, 1.0, -1.0]], dtype=torch.float64)
    per_update, mass = sign_conflicts(samples)
    assert per_update == pytest.approx([0.0, 2 / 3]) and mass == pytest.approx(2 / 9)
    scores = outlier_scores([0.9, 0.9, 0.9, -0.9], [1.0, 1.0, 1.0, 1.0])
    assert scores[:3] == [0.0, 0.0, 0.0] and scores[3] == pytest.approx(1.8 / 0.05)


@pytest.mark.unit
def test_memory_is_one_fixed_sketch_per_update() -> None:
    small, large = MergeDiagnostics(), MergeDiagnostics()
    small.add("a", {"w": torch.randn(10, 10)})
    large.add("a", {"w": torch.randn(1000, 1000)})
    assert small.sketches[0][2].vector.numel() == large.sketches[0][2].vector.numel() == 4096
    assert large.sketches[0][2].nbytes == 8 * (4096 + 4096)


@pytest.mark.unit
def test_the_report_round_trips_through_json_and_renders_markdown() -> None:
    report = _report(_cohort(-2.0))
    document = json.loads(json.dumps(report.to_json()))
    assert DiagnosticsReport.from_json(document).to_json() == report.to_json()
    table = report.markdown()
    assert table.splitlines()[2].startswith("| 1 | inst-5 |") and "Sign-conflict mass" in table


# ---------------------------------------------------------------- the round engine


def _engine(policy: RoundPolicy | None = None, strategy: str = "fedavg") -> RoundEngine:
    return (policy or RoundPolicy()).engine(
        get_strategy(strategy), UpdateSpace.full({n: tuple(s) for n, s in SHAPES.items()}), round_number=2
    )


@pytest.mark.unit
def test_a_round_gives_a_report_labelled_by_node_with_the_outlier_first() -> None:
    engine = _engine()
    updates = _cohort(-2.0)
    for i, update in enumerate(updates):
        assert engine.offer_task_vector(update, node=f"hospital-{i}", num_examples=10) is None
    assert engine.diagnostics_report() is None  # made when the merge is finalized
    merged = engine.merged_task_vector()
    report = engine.diagnostics_report()
    assert report is not None and report.labels == [f"hospital-{i}" for i in range(8)]
    assert report.outlier_ranking[0] == "hospital-5"
    assert report.merged_norm == pytest.approx(
        math.sqrt(sum(float(t.double().square().sum()) for t in merged.values())), rel=1e-9
    )
    assert all(u.weight == 10 for u in report.updates)


@pytest.mark.unit
def test_diagnostics_change_nothing_in_the_merge_and_can_be_turned_off() -> None:
    merged = {}
    for on in (True, False):
        engine = _engine(RoundPolicy(diagnostics=on), "ties")
        for i, update in enumerate(_cohort(-2.0)):
            engine.offer_task_vector(update, node=str(i), num_examples=5 + i)
        merged[on] = engine.merged_task_vector()
        assert (engine.diagnostics_report() is not None) is on
    for name in SHAPES:
        assert torch.equal(merged[True][name], merged[False][name])


@pytest.mark.unit
def test_gateway_partial_states_are_counted_not_diagnosed() -> None:
    engine = RoundEngine(get_strategy("fedavg"), UpdateSpace.full(SHAPES), round_number=3, run_id="r")
    state = get_strategy("fedavg").new_state()
    state.add(_direction(3), weight=4)
    header = UpdateHeader("r", 3, fingerprint({n: torch.zeros(s) for n, s in SHAPES.items()}), "gw", num_examples=4)
    assert engine.offer(encode_partial(state, header=header), kind="partial") is None
    engine.offer_task_vector(_direction(4), node="n1", num_examples=3)
    engine.merged_task_vector()
    report = engine.diagnostics_report()
    assert report is not None and report.labels == ["n1"] and report.skipped == 1


@pytest.mark.unit
def test_a_secure_sum_has_no_diagnostics() -> None:
    """The server never sees one node's update under secure aggregation: no report, rather than a wrong one."""
    engine = _engine()
    state = get_strategy("fedavg").new_state()
    state.add(_direction(5), weight=2)
    engine.fold_secure_sum(state, {"a": {}, "b": {}})
    engine.merged_task_vector()
    assert engine.diagnostics_report() is None


@pytest.mark.unit
def test_round_records_keep_diagnostics_and_old_reports_still_load() -> None:
    report = _report(_cohort(-2.0)).to_json()
    rounds = [RoundRecord(round=1, diagnostics=report), RoundRecord(round=2)]
    history = RunHistory(settings={}, run_key="k", rounds=rounds)
    document = json.loads(json.dumps(history.to_json()))
    assert document["rounds"][0]["diagnostics"] == report and "diagnostics" not in document["rounds"][1]
    again = RunHistory.from_json(document)
    assert again.rounds[0].diagnostics == report and again.rounds[1].diagnostics == {}
    old = {"settings": {}, "run_key": "k", "rounds": [{"round": 1, "accepted": 3}]}
    assert RunHistory.from_json(old).rounds[0].diagnostics == {}


@pytest.mark.unit
def test_the_report_has_a_mergeability_section_and_a_heatmap(tmp_path: Path) -> None:
    diagnostics = _report(_cohort(-2.0)).to_json()
    history = RunHistory(settings={}, run_key="k", rounds=[RoundRecord(round=1, diagnostics=diagnostics)]).to_json()
    paths = write_report(history, tmp_path)
    assert paths["diagnostics_plot"] == tmp_path / "diagnostics.png" and paths["diagnostics_plot"].stat().st_size > 0
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert "## Mergeability (round 1)" in markdown and "| 1 | inst-5 |" in markdown
    plain = write_report(RunHistory(settings={}, run_key="k", rounds=[RoundRecord(round=1)]).to_json(), tmp_path / "p")
    assert "diagnostics_plot" not in plain and "Mergeability" not in plain["markdown"].read_text(encoding="utf-8")


# ---------------------------------------------------------------- offline: fedfuse merge … --diagnose

NAMES = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]


@pytest.fixture
def checkpoints(tmp_path: Path) -> Path:
    """base and four fine-tuned models as tiny .safetensors files; m3 moves against the others."""
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(8, 6, generator=g) for n in NAMES}
    direction = {n: torch.randn(8, 6, generator=g) for n in NAMES}
    save_file(base, tmp_path / "base.safetensors")
    for i in range(4):
        sign = -3.0 if i == 3 else 1.0
        tuned = {n: base[n] + sign * direction[n] + 0.2 * torch.randn(8, 6, generator=g) for n in NAMES}
        save_file(tuned, tmp_path / f"m{i}.safetensors")
    return tmp_path


def _models(folder: Path) -> list[str]:
    return [x for i in range(4) for x in ("-m", str(folder / f"m{i}.safetensors"))]


@pytest.mark.integration
@pytest.mark.parametrize("form", [["merge", "models"], ["merge"]])
def test_merge_diagnose_writes_the_report_and_no_model(checkpoints: Path, form: list[str]) -> None:
    out = checkpoints / "report"
    args = [*form, "--base", str(checkpoints / "base.safetensors"), *_models(checkpoints)]
    result = CliRunner().invoke(app, [*args, "--method", "ties", "--density", "0.5", "--diagnose", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["diagnostics.json", "diagnostics.md", "diagnostics.png"]
    document = json.loads((out / "diagnostics.json").read_text(encoding="utf-8"))
    assert document["method"] == "ties" and document["outlier_ranking"][0] == "m3"
    assert "m3" in result.output and "sign-conflict mass" in result.output
    assert "| 1 | m3 |" in (out / "diagnostics.md").read_text(encoding="utf-8")


@pytest.mark.integration
def test_diagnose_models_returns_the_report_without_writing(checkpoints: Path) -> None:
    models = [checkpoints / f"m{i}.safetensors" for i in range(4)]
    result = diagnose_models(checkpoints / "base.safetensors", models, method="task_arithmetic")
    assert result.files == () and result.report.outlier_ranking[0] == "m3"
    assert result.report.updates[3].cosine_to_merged is not None and result.report.updates[3].cosine_to_merged < 0
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(["base.safetensors", *(p.name for p in models)])
    with pytest.raises(MergeInputError, match="diagnose"):
        merge_models(checkpoints / "base.safetensors", models, diagnose=True, out=checkpoints / "x")


@pytest.mark.integration
def test_diagnose_refuses_partial_out(checkpoints: Path) -> None:
    args = ["merge", "models", "--base", str(checkpoints / "base.safetensors"), *_models(checkpoints)]
    result = CliRunner().invoke(app, [*args, "--diagnose", "--partial-out", str(checkpoints / "p.partial")])
    assert result.exit_code == 2 and "--diagnose" in result.output and "--partial-out" in result.output


@pytest.mark.integration
def test_merge_adapters_diagnose_reports_each_adapters_delta(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from tiny_models import tiny_llama

    base = tmp_path / "base"
    tiny_llama(intermediate_size=48).save_pretrained(base)
    adapters = []
    for seed, scale in enumerate((1.0, 1.0, -4.0)):
        from transformers import LlamaForCausalLM

        model = get_peft_model(
            LlamaForCausalLM.from_pretrained(base, dtype=torch.float32),
            LoraConfig(r=2, lora_alpha=4.0, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        )
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(0.05 * torch.randn(param.shape, generator=g) * (scale if "lora_B" in name else 1.0))
                    param.add_(0.002 * seed * torch.ones_like(param))
        model.save_pretrained(tmp_path / f"a{seed}")
        adapters += ["--adapter", str(tmp_path / f"a{seed}")]
    out = tmp_path / "report"
    args = ["merge", "adapters", "--base", str(base), *adapters, "--diagnose", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["diagnostics.json", "diagnostics.md", "diagnostics.png"]
    document = json.loads((out / "diagnostics.json").read_text(encoding="utf-8"))
    assert document["outlier_ranking"][0] == "a2" and document["cosines"][0][2] < -0.9


# ---------------------------------------------------------------- a federated run's report.json


@pytest.mark.integration
def test_report_json_has_each_rounds_diagnostics(server_identity, tmp_path: Path) -> None:
    from flwr.app import Context, RecordDict
    from seeded_grid import SeededGrid

    from fedfuse.server.app import run_server
    from fedfuse.settings import RunSettings
    from fedfuse.training.run_model import lora_scale, update_shapes

    config = {**SEEDED_RUN, "output-dir": str(tmp_path / "run")}
    settings = RunSettings.from_run_config(config)
    grid = SeededGrid(dict(settings.update_space(update_shapes(settings), lora_scale(settings)).wire_shapes))
    context = Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config={})
    run_server(grid, context, settings)  # type: ignore[arg-type]
    document = json.loads((tmp_path / "run" / "report.json").read_text(encoding="utf-8"))
    for record in document["rounds"]:
        diagnostics = record["diagnostics"]
        assert len(diagnostics["updates"]) == record["accepted"] == 3
        assert len(diagnostics["cosines"]) == 3 and all(len(row) == 3 for row in diagnostics["cosines"])
        assert all(u["cosine_to_merged"] is not None and u["norm"] > 0 for u in diagnostics["updates"])
    assert (tmp_path / "run" / "diagnostics.png").stat().st_size > 0
    assert "## Mergeability (round 2)" in (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
