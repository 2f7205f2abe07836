"""mergekit recipes (``fedfuse merge --config``): parsing, mergekit's defaults, per-layer values and refusals.

The numbers against mergekit itself are in ``test_mergekit_differential.py``; here the models are
plain safetensors files with Llama-like names, so every test runs in well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import typer
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fedfuse.cli.merge import merge
from fedfuse.offline import MergeInputError
from fedfuse.offline.recipe import METHODS, evaluate_setting, layer_positions, load_recipe, merge_recipe
from fedfuse.offline.recipe import resolve_settings as resolve

# Tiers are marked per test here: this module mixes integration and unit tests.

LAYERS = 4
NAMES = [
    "model.embed_tokens.weight",
    *(f"model.layers.{i}.{part}.weight" for i in range(LAYERS) for part in ("self_attn.q_proj", "mlp.up_proj")),
    "model.norm.weight",
    "lm_head.weight",
]


def _state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(8 if "norm" in name else (6, 8), generator=generator) for name in NAMES}


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, torch.Tensor]]:
    """base, a, b as .safetensors files in the working directory (recipes name them relative to it)."""
    monkeypatch.chdir(tmp_path)
    states = {"base": _state(0)}
    for i, name in enumerate(("a", "b"), start=1):
        noise = _state(i)
        states[name] = {k: v + 0.1 * noise[k] for k, v in states["base"].items()}
    for name, state in states.items():
        save_file(state, tmp_path / f"{name}.safetensors")
    return states


def write(tmp_path: Path, doc: Any, name: str = "recipe.yml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def recipe(method: str = "ties", **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "merge_method": method,
        "base_model": "base.safetensors",
        "models": [
            {"model": "a.safetensors", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "b.safetensors", "parameters": {"weight": 0.5, "density": 0.5}},
        ],
    }
    doc.update(extra)
    return doc


def settings_of(tmp_path: Path, doc: dict[str, Any]) -> dict:
    return resolve(load_recipe(write(tmp_path, doc)), NAMES, device="cpu", dtype="float32")


# ---------------------------------------------------------------- values


@pytest.mark.unit
def test_a_list_is_interpolated_over_the_layers_as_mergekit_does() -> None:
    assert [evaluate_setting([0, 0.5, 1], "x", t) for t in (0, 0.25, 0.5, 1)] == [0, 0.25, 0.5, 1]
    assert evaluate_setting([0, 0.5, 0.3, 0.7, 1], "x", 0.375) == pytest.approx(0.4)  # between 0.5 and 0.3
    assert evaluate_setting(0.7, "x", 0.5) == 0.7
    assert evaluate_setting("1e-3", "x", 0) == 0.001  # YAML reads 1e-3 as a string; mergekit takes it as a number


@pytest.mark.unit
def test_filters_pick_the_first_match_and_fall_through_when_none_matches() -> None:
    setting = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.3}, {"value": 0.9}]
    assert evaluate_setting(setting, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate_setting(setting, "model.layers.1.mlp.up_proj.weight", 0.5) == 0.3
    assert evaluate_setting(setting, "lm_head.weight", 0.5) == 0.9
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "lm_head.weight", 0) is None
    assert evaluate_setting({"filter": "*", "value": 2}, "lm_head.weight", 0) == 2


@pytest.mark.unit
def test_layer_positions_follow_mergekit() -> None:
    positions = layer_positions(NAMES)
    assert [positions[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(LAYERS)] == [0, 1 / 3, 2 / 3, 1]
    assert positions["model.embed_tokens.weight"] == positions["lm_head.weight"] == positions["model.norm.weight"] == 0
    assert layer_positions(["model.layers.0.w", "x"]) == {"model.layers.0.w": 1.0, "x": 0.0}


@pytest.mark.unit
def test_a_weight_gradient_merges_the_hand_computed_values(models, tmp_path: Path) -> None:
    doc = {
        "merge_method": "task_arithmetic",
        "base_model": "base.safetensors",
        "models": [{"model": "a.safetensors", "parameters": {"weight": [0, 0.5, 1]}}],
    }
    merge_recipe(write(tmp_path, doc), out=tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    base, a = models["base"], models["a"]
    for i, weight in enumerate([0, 1 / 3, 2 / 3, 1]):  # t = i/3, then 2t along [0, 0.5, 1]
        name = f"model.layers.{i}.mlp.up_proj.weight"
        torch.testing.assert_close(merged[name], base[name] + weight * (a[name] - base[name]), atol=1e-6, rtol=0)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):  # t = 0: weight 0
        torch.testing.assert_close(merged[name], base[name], atol=0, rtol=0)


# ---------------------------------------------------------------- mergekit's defaults per method


@pytest.mark.unit
@pytest.mark.parametrize(
    ("method", "normalize", "kind", "rescale"),
    [
        ("ties", True, "trim", "none"),
        ("dare_ties", False, "dare", "l1"),
        ("dare_linear", False, "dare", "l1"),
        ("breadcrumbs", False, "breadcrumbs", "none"),
        ("breadcrumbs_ties", False, "breadcrumbs", "none"),
        ("della", True, "della", "l1"),
        ("della_linear", False, "della", "l1"),
    ],
)
def test_methods_take_mergekits_defaults(tmp_path: Path, method, normalize, kind, rescale) -> None:
    one = settings_of(tmp_path, recipe(method))["model.layers.0.mlp.up_proj.weight"]
    assert bool(one.strategy.normalize) is normalize
    assert [(s.kind, s.density, s.rescale) for s in one.sparsifiers] == [(kind, 0.5, rescale)] * 2
    assert METHODS[method].method == method


@pytest.mark.unit
def test_top_level_parameters_reach_the_strategy_and_every_model(tmp_path: Path) -> None:
    doc = recipe("breadcrumbs_ties", parameters={"lambda": 0.7, "normalize": True, "rescale": True, "gamma": 0.05})
    doc["models"][1]["parameters"]["gamma"] = 0.1
    one = settings_of(tmp_path, doc)["lm_head.weight"]
    assert (one.strategy.lam, one.strategy.normalize, one.weights) == (0.7, True, (1.0, 0.5))
    assert [(s.gamma, s.rescale) for s in one.sparsifiers] == [(0.05, "l1"), (0.1, "l1")]


@pytest.mark.unit
def test_density_one_does_not_sparsify_and_della_takes_epsilon(tmp_path: Path) -> None:
    doc = recipe("della")
    doc["models"][0]["parameters"].update(density=1.0)
    doc["models"][1]["parameters"].update(density=0.4, epsilon=0.3)
    one = settings_of(tmp_path, doc)["lm_head.weight"]
    assert one.sparsifiers[0].kind == "none"
    assert (one.sparsifiers[1].kind, one.sparsifiers[1].epsilon) == ("della", 0.3)


@pytest.mark.unit
def test_slerp_t_and_model_stock_filter_wise(tmp_path: Path) -> None:
    slerp = {"merge_method": "slerp", "base_model": "base.safetensors", "models": [{"model": "a.safetensors"}]}
    per_tensor = settings_of(tmp_path, {**slerp, "parameters": {"t": [0, 1]}})
    assert [per_tensor[f"model.layers.{i}.mlp.up_proj.weight"].strategy.t for i in range(LAYERS)] == [
        0,
        pytest.approx(1 / 3),
        pytest.approx(2 / 3),
        1,
    ]
    stock = recipe("model_stock", parameters={"filter_wise": True})
    for entry in stock["models"]:
        del entry["parameters"]
    assert settings_of(tmp_path, stock)["lm_head.weight"].strategy.filter_wise is True


@pytest.mark.unit
def test_dtype_writes_the_output_dtype_and_notes_what_is_ignored(models, tmp_path: Path) -> None:
    doc = recipe("ties", dtype="bfloat16", tokenizer_source="base", parameters={"int8_mask": True})
    loaded = load_recipe(write(tmp_path, doc))
    assert loaded.out_dtype == "bfloat16"
    assert any("int8_mask" in note for note in loaded.notes) and any("bfloat16" in note for note in loaded.notes)
    merge_recipe(loaded, out=tmp_path / "out")
    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.bfloat16}
    assert load_recipe(write(tmp_path, recipe(out_dtype="float16", dtype="bfloat16"))).out_dtype == "float16"


@pytest.mark.unit
def test_the_base_listed_among_the_models_is_the_reference(tmp_path: Path) -> None:
    doc = recipe()
    doc["models"].insert(0, {"model": "base.safetensors", "parameters": {"weight": 9.0}})
    assert load_recipe(write(tmp_path, doc)).models == (Path("a.safetensors"), Path("b.safetensors"))
    linear = {"merge_method": "linear", "models": [{"model": "a.safetensors", "parameters": {"weight": 1}}]}
    assert load_recipe(write(tmp_path, linear)).base == Path("a.safetensors")  # linear needs no base_model


# ---------------------------------------------------------------- refusals name the key


def _doc(change) -> dict[str, Any]:
    doc = recipe()
    change(doc)
    return doc


REFUSALS = [
    ("slices", lambda d: d.update(slices=[]), "`slices`"),
    ("modules", lambda d: d.update(modules={}), "`modules`"),
    ("tokenizer", lambda d: d.update(tokenizer={"source": "base"}), "`tokenizer`"),
    ("chat_template", lambda d: d.update(chat_template="chatml"), "`chat_template`"),
    ("union", lambda d: d.update(tokenizer_source="union"), "tokenizer_source 'union'"),
    ("unknown key", lambda d: d.update(merge_options=1), "unknown key `merge_options`"),
    ("method", lambda d: d.update(merge_method="sce"), "merge_method 'sce'"),
    ("model key", lambda d: d["models"][0].update(lora="x"), "models[0].lora"),
    ("param", lambda d: d["models"][1]["parameters"].update(foo=1), "models[1].parameters.foo"),
    (
        "shared per model",
        lambda d: d["models"][0]["parameters"].update(normalize=True),
        "models[0].parameters.normalize",
    ),
    ("bool list", lambda d: d.update(parameters={"normalize": [True, False]}), "parameters.normalize: must be true"),
    ("not a number", lambda d: d["models"][0]["parameters"].update(weight="heavy"), "models[0].parameters.weight"),
    ("bad filter", lambda d: d["models"][0]["parameters"].update(weight=[{"when": "mlp"}]), "weight[0]"),
    ("lora form", lambda d: d["models"][0].update(model="a+lora"), "models[0].model: mergekit's model+lora"),
    ("dtype", lambda d: d.update(dtype="int4"), "dtype: unknown dtype 'int4'"),
    ("no base", lambda d: d.pop("base_model"), "base_model is required by ties"),
    ("no models", lambda d: d.update(models=[]), "`models`"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("change", "message"), [(c, m) for _, c, m in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_every_refusal_names_the_key(tmp_path: Path, change, message: str) -> None:
    with pytest.raises(MergeInputError, match=None) as caught:
        load_recipe(write(tmp_path, _doc(change)))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert str(tmp_path / "recipe.yml") in str(caught.value)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"merge_method": "linear", "models": [{"model": "a.safetensors"}]}, "models[0].parameters.weight is required"),
        (_doc(lambda d: d["models"][1]["parameters"].update(density=0)), "models[1].parameters, tensor"),
        (recipe("della", parameters={"epsilon": 0.6}), "DELLA needs density"),
        ({**recipe("slerp"), "models": [{"model": "a.safetensors"}]}, "parameters.t is required by slerp"),
    ],
)
def test_values_are_checked_per_tensor_before_anything_is_written(models, tmp_path: Path, doc, message) -> None:
    with pytest.raises(MergeInputError) as caught:
        merge_recipe(write(tmp_path, doc), out=tmp_path / "out")
    assert message in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("method", "models", "message"),
    [("slerp", ["a", "b"], "slerp needs exactly one model"), ("model_stock", ["a"], "at least two models")],
)
def test_model_counts_follow_mergekit(tmp_path: Path, method, models, message) -> None:
    doc = {"merge_method": method, "base_model": "base", "models": [{"model": m} for m in models]}
    if method == "slerp":
        doc["parameters"] = {"t": 0.5}
    with pytest.raises(MergeInputError, match=message):
        load_recipe(write(tmp_path, doc))


@pytest.mark.unit
def test_linear_with_an_unlisted_base_model_is_refused(tmp_path: Path) -> None:
    doc = {"merge_method": "linear", "base_model": "base", "models": [{"model": "a", "parameters": {"weight": 1}}]}
    with pytest.raises(MergeInputError, match="base_model: mergekit merges it as one more linear input"):
        load_recipe(write(tmp_path, doc))


@pytest.mark.unit
def test_unreadable_recipes(tmp_path: Path) -> None:
    with pytest.raises(MergeInputError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yml")
    with pytest.raises(MergeInputError, match="not a readable YAML recipe"):
        load_recipe(write(tmp_path, "merge_method: [ties"))
    with pytest.raises(MergeInputError, match="a recipe is a mapping"):
        load_recipe(write(tmp_path, "- ties"))


# ---------------------------------------------------------------- the command line


def invoke(args: list) -> Any:
    app = typer.Typer()
    app.command()(merge)
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result: Any) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.integration
def test_cli_refusal_is_one_line_and_exit_2(models, tmp_path: Path) -> None:
    line = one_line_error(invoke(["--config", write(tmp_path, recipe(slices=[])), "--out", tmp_path / "out"]))
    assert "`slices`" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "ties"], "--method cannot be used with --config"),
        (["--base", "base.safetensors", "-m", "a.safetensors"], "--base, --model cannot be used with --config"),
        (["--partial-out", "p.bin"], "--partial-out cannot be used with --config"),
    ],
)
def test_cli_config_clashes_with_the_flag_form(models, tmp_path: Path, extra, message) -> None:
    line = one_line_error(invoke(["--config", write(tmp_path, recipe()), "--out", tmp_path / "o", *extra]))
    assert message in line


@pytest.mark.integration
def test_cli_config_needs_an_out_and_flags_need_a_base(models, tmp_path: Path) -> None:
    assert "--out" in one_line_error(invoke(["--config", write(tmp_path, recipe())]))
    assert "--base" in one_line_error(invoke(["-m", "a.safetensors", "--method", "ties", "--out", tmp_path / "o"]))


@pytest.mark.integration
@pytest.mark.parametrize(
    ("method", "flags"),
    [
        ("ties", ["--density", "0.5"]),
        ("dare_ties", ["--density", "0.5", "--rescale", "l1", "--param", "normalize=false", "--seed", "3"]),
        ("breadcrumbs", ["--density", "0.5", "--gamma", "0.01"]),
    ],
)
def test_config_and_flags_write_identical_files(models, tmp_path: Path, method, flags) -> None:
    by_recipe = invoke(["--config", write(tmp_path, recipe(method)), "--out", tmp_path / "r", "-q", "--seed", "3"])
    assert by_recipe.exit_code == 0, by_recipe.output
    common = ["--base", "base.safetensors", "-m", "a.safetensors", "-m", "b.safetensors", "-w", "1", "-w", "0.5"]
    by_flags = invoke([*common, "--method", method, *flags, "--out", tmp_path / "f", "-q"])
    assert by_flags.exit_code == 0, by_flags.output
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == (tmp_path / "f" / "model.safetensors").read_bytes()
