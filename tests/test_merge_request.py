"""The merge request (``fedfuse.offline.request``): one validated model per ``fedfuse merge`` mode.

Each mode refuses the fields of another in one line naming them; library errors name fields, never
CLI flags, and the CLI renders them as its flags; a mergekit recipe loads into the same
``ModelsRequest`` the flag form builds; ``fedfuse merge`` has a subcommand per mode.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from fedfuse.cli.main import app
from fedfuse.offline import (
    AdaptersRequest,
    CombineRequest,
    MergeInputError,
    ModelsRequest,
    RecipeRequest,
    RequestError,
    combine_partials,
    merge_models,
)
from fedfuse.offline.recipe import load_recipe, merge_recipe, recipe_request
from fedfuse.offline.request import REQUESTS, parse_request, request_fields

# Tiers are marked per test here: this module mixes integration and unit tests.

NAMES = ["model.embed_tokens.weight", *(f"model.layers.{i}.mlp.up_proj.weight" for i in range(2)), "lm_head.weight"]


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """base, a, b as tiny .safetensors files in the working directory."""
    monkeypatch.chdir(tmp_path)
    for seed, name in enumerate(("base", "a", "b")):
        generator = torch.Generator().manual_seed(seed)
        save_file({n: torch.randn(4, 6, generator=generator) for n in NAMES}, tmp_path / f"{name}.safetensors")
    return tmp_path


def refusal(kind: type, **fields: Any) -> RequestError:
    with pytest.raises(RequestError) as caught:
        kind(**fields)
    message = str(caught.value)
    assert "\n" not in message and "--" not in message, message
    return caught.value


# ---------------------------------------------------------------- each mode's refusals name fields


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kind", "fields", "message", "named"),
    [
        (
            CombineRequest,
            {"base": "b", "partials": ["p"], "models": ["m"], "method": "ties", "density": 0.2},
            "models, method, density cannot be used with partials: the merge settings come from the partial files",
            ("models", "method", "density", "partials"),
        ),
        (
            RecipeRequest,
            {"config": "r.yml", "out": "o", "base": "b", "partial_out": "p"},
            "base, partial_out cannot be used with config: the recipe sets the merge",
            ("base", "partial_out", "config"),
        ),
        (RecipeRequest, {"config": "r.yml"}, "give an output folder (out) for the recipe's merge", ("out",)),
        (
            AdaptersRequest,
            {"base": "b", "adapters": ["a"], "fishers": ["f"]},
            "adapters cannot be mixed with fishers: merge either fine-tuned models or LoRA adapters",
            ("adapters", "fishers"),
        ),
        (
            AdaptersRequest,
            {"base": "b", "rank": 4, "models": ["m"]},
            "rank cannot be mixed with models",
            ("rank", "models"),
        ),
        (AdaptersRequest, {"base": "b", "adapters": ["a"], "out_adapter": True}, "out_adapter needs rank", ()),
        (AdaptersRequest, {"base": "b", "adapters": ["a"], "rank": 4}, "rank applies only with out_adapter", ()),
        (
            AdaptersRequest,
            {"base": "b", "adapters": ["a"], "out_adapter": True, "rank": 0},
            "rank must be an integer >= 1, got 0",
            ("rank",),
        ),
        (AdaptersRequest, {"base": "b", "adapters": ["a"], "rank": True, "out_adapter": True}, "rank:", ("rank",)),
        (
            AdaptersRequest,
            {"base": "b", "adapters": ["a"], "partial_out": "p"},
            "partial_out is not supported with adapters: merge into out",
            ("partial_out", "adapters", "out"),
        ),
        (AdaptersRequest, {"base": "b"}, "give at least one PEFT LoRA adapter folder to merge (adapters)", ()),
        (AdaptersRequest, {"base": "b", "adapters": ["a"], "method": "fisher"}, "LoRA adapters do not carry", ()),
        (ModelsRequest, {"models": ["m"]}, "base is required", ("base",)),
        (ModelsRequest, {"base": "b", "adapters": ["a"]}, "adapters: not options of a merge of fine-tuned models", ()),
        (ModelsRequest, {"base": "b", "colour": "red"}, "'colour': not options of", ()),
        (ModelsRequest, {"base": "b", "density": "lots"}, "density: Input should be a valid number", ("density",)),
        (ModelsRequest, {"base": "b", "params": ["eps"]}, "params: strategy parameters are name=value", ("params",)),
        (
            ModelsRequest,
            {"base": "b", "out_dtype": "float16", "partial_out": "p"},
            "an output dtype applies to a model (out)",
            ("out",),
        ),
        (ModelsRequest, {"base": "b", "sparsifier_options": 0.3}, "sparsifier_options: expected a mapping", ()),
    ],
)
def test_each_mode_refuses_in_one_line_naming_fields(kind, fields, message, named) -> None:
    error = refusal(kind, **fields)
    assert message in str(error)
    assert set(named) <= set(error.fields)


@pytest.mark.unit
def test_the_plan_names_fields_not_flags(files: Path) -> None:
    base, models = files / "base.safetensors", [files / "a.safetensors", files / "b.safetensors"]
    cases = [
        ({"method": "fedavg", "lam": 2.0, "params": {"lam": 0.5}}, "λ is given twice (lam and params lam=…)"),
        ({"method": "ties", "density": 0.2, "vote": "count", "params": {"vote": "mass"}}, "(vote and params vote=…)"),
        ({"method": "fedavg", "weights": [1.0]}, "give one weights per models, or none"),
        ({"method": "fedavg", "seed": -1}, "seed and first_model_index must be >= 0"),
        ({"method": "regmean"}, "needs a Gram-matrix file per model (grams;"),
        ({"method": "fedavg", "fishers": models}, "fishers was given but method 'fedavg'"),
        ({"method": "fedavg", "out": files / "o", "partial_out": files / "p"}, "output folder (out) or a partial"),
    ]
    for fields, message in cases:
        with pytest.raises(RequestError) as caught:
            merge_models(base, models, **{"out": files / "out", **fields})
        text = re.sub(r"`[^`]*`", "", str(caught.value))  # a quoted command of another tool may have flags
        assert message in str(caught.value) and "--" not in text, str(caught.value)
    with pytest.raises(MergeInputError, match="sparsifier 'trim' has no parameter 'k'"):
        merge_models(base, models, method="ties", density=0.2, sparsifier_params={"k": 2}, out=files / "out")
    with pytest.raises(RequestError, match=r"at least one partial-statistics file \(partials\)"):
        combine_partials([], base=base, out=files / "out")
    assert not (files / "out").exists()


@pytest.mark.unit
def test_requests_are_one_discriminated_family() -> None:
    request = parse_request({"mode": "combine", "base": "b", "partials": ["p1", "p2"], "out": "o"})
    assert isinstance(request, CombineRequest) and request.partials == (Path("p1"), Path("p2"))
    assert {kind.model_fields["mode"].default for kind in REQUESTS.values()} == set(REQUESTS)
    assert {"density", "partials", "config", "adapters", "rank"} <= request_fields()
    with pytest.raises(RequestError, match="mode must be one of models, adapters, combine, recipe"):
        parse_request({"mode": "soup"})
    legacy = ModelsRequest(base="b", models=["a"], sparsifier_options={"gamma": 0.05, "rescale": "l1", "k": 2})
    assert (legacy.gamma, legacy.rescale, legacy.sparsifier_params) == (0.05, "l1", {"k": 2})
    assert ModelsRequest(base="b", models=["a"], params="eps=1e-8,vote=count").params == {
        "eps": "1e-8",
        "vote": "count",
    }


@pytest.mark.unit
def test_a_request_is_what_the_keyword_form_builds(files: Path) -> None:
    base, models = files / "base.safetensors", [files / "a.safetensors", files / "b.safetensors"]
    request = ModelsRequest(base=base, models=models, method="ties", density=0.5, out=files / "by-request")
    merge_models(request)
    merge_models(base, models, method="ties", density=0.5, out=files / "by-keywords")
    assert (files / "by-request" / "model.safetensors").read_bytes() == (
        files / "by-keywords" / "model.safetensors"
    ).read_bytes()
    with pytest.raises(TypeError, match="not both"):
        merge_models(request, method="fedavg")


# ---------------------------------------------------------------- recipes load into the same request


def _recipe(files: Path) -> Path:
    doc = {
        "merge_method": "dare_ties",
        "base_model": "base.safetensors",
        "models": [
            {"model": "a.safetensors", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "b.safetensors", "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "dtype": "bfloat16",
    }
    path = files / "recipe.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.unit
def test_a_recipe_loads_into_the_models_request(files: Path) -> None:
    path = _recipe(files)
    request = recipe_request(load_recipe(path), RecipeRequest(config=path, out=files / "r", seed=3))
    assert isinstance(request, ModelsRequest)
    assert request.method == "dare_ties" and request.models == (Path("a.safetensors"), Path("b.safetensors"))
    assert (request.base, request.seed, request.out, request.out_dtype) == (
        Path("base.safetensors"),
        3,
        files / "r",
        "bfloat16",
    )
    assert request.params == {"normalize": False, "lam": 1.0} and request.tensor_settings is not None
    settings = request.tensor_settings(NAMES[1])
    assert settings.weights == (1.0, 0.5) and settings.sparsifiers[0].kind == "dare"
    merge_models(request)
    merge_recipe(path, out=files / "again", seed=3)
    assert (files / "r" / "model.safetensors").read_bytes() == (files / "again" / "model.safetensors").read_bytes()


# ---------------------------------------------------------------- the command line


def invoke(*args: Any) -> Any:
    return CliRunner().invoke(app, ["merge", *(str(a) for a in args)])


def one_line(result: Any) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.integration
def test_merge_help_lists_the_subcommands_and_each_has_its_own() -> None:
    listing = invoke("--help")
    assert listing.exit_code == 0
    assert all(name in listing.output for name in ("models", "adapters", "combine", "recipe"))
    models = " ".join(invoke("models", "--help").output.split())
    assert "--density" in models and "--fisher" in models and "--adapter" not in models and "--combine" not in models
    recipe = " ".join(invoke("recipe", "--help").output.split())
    assert "--seed" in recipe and "--method" not in recipe and "CONFIG" in recipe


@pytest.mark.integration
def test_the_cli_renders_field_errors_as_its_flags(files: Path) -> None:
    common = ["--base", "base.safetensors", "-m", "a.safetensors", "-m", "b.safetensors", "--out", "o"]
    line = one_line(invoke("models", *common, "--method", "fedavg", "--lambda", "2", "--param", "lam=0.5"))
    assert "λ is given twice (--lambda and --param lam=…)" in line
    line = one_line(invoke("models", *common, "--method", "fedavg", "-w", "1"))
    assert "give one --weight per --model, or none" in line
    line = one_line(invoke("adapters", "--base", "base.safetensors", "--adapter", "x", "--out-adapter", "--out", "o"))
    assert "--out-adapter needs --rank" in line
    assert "(PARTIALS)" in one_line(invoke("combine", "--base", "base.safetensors", "--out", "o"))
    assert "give an output folder (--out)" in one_line(invoke("recipe", _recipe(files)))
    flag_form = one_line(invoke(*common, "--method", "fedavg", "--combine", "p.bin"))
    assert "--model, --method cannot be used with --combine" in flag_form
    assert not (files / "o").exists()


@pytest.mark.integration
def test_subcommands_and_the_flag_form_write_the_same_files(files: Path) -> None:
    inputs = ["--base", "base.safetensors", "-m", "a.safetensors", "-m", "b.safetensors", "-w", "1", "-w", "0.5"]
    options = ["--method", "dare_ties", "--density", "0.5", "--seed", "2", "-q"]
    assert invoke("models", *inputs, *options, "--out", "sub").exit_code == 0
    assert invoke(*inputs, *options, "--out", "flags").exit_code == 0
    assert (files / "sub" / "model.safetensors").read_bytes() == (files / "flags" / "model.safetensors").read_bytes()
    part = ["--method", "fedavg", "-q"]
    assert (
        invoke("models", "--base", "base.safetensors", "-m", "a.safetensors", *part, "--partial-out", "p1").exit_code
        == 0
    )
    assert invoke("combine", "p1", "--base", "base.safetensors", "--out", "c", "-q").exit_code == 0
    assert invoke("--base", "base.safetensors", "--combine", "p1", "--out", "c2", "-q").exit_code == 0
    assert (files / "c" / "model.safetensors").read_bytes() == (files / "c2" / "model.safetensors").read_bytes()
    path = _recipe(files)
    assert invoke("recipe", path, "--out", "r1", "-q").exit_code == 0
    assert invoke("--config", path, "--out", "r2", "-q").exit_code == 0
    assert (files / "r1" / "model.safetensors").read_bytes() == (files / "r2" / "model.safetensors").read_bytes()


@pytest.mark.unit
def test_a_request_error_is_a_merge_input_error() -> None:
    error = RequestError("give {density} or {nothing}")
    assert isinstance(error, MergeInputError) and error.fields == ("density",)
    assert str(error) == "give density or {nothing}"
    assert error.render({"density": "--density"}) == "give --density or {nothing}"
