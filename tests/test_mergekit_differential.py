"""Differential tests against mergekit: the same recipe through ``mergekit`` and ``fedfuse merge --config``.

mergekit pins its own dependencies, so it lives in its own virtualenv, built once and cached under
``~/.cache/fedfuse-tests/mergekit-venv/<version>`` (``FEDFUSE_MERGEKIT_VENV`` overrides the path):
``pip install torch==2.13.0`` (the CPU build this machine's pip finds on local disk), then
``pip install mergekit==<version>``, which accepts that torch. A tiny Llama (3 layers) is saved with
three seeded fine-tuned variants, one recipe per case is written, and one mergekit process runs every
recipe (``mergekit.merge.run_merge``, what ``mergekit-yaml`` calls). Every output tensor must agree
within 1e-5.

DARE and DELLA draw their masks from torch's global generator in mergekit and from one seeded
generator per (model, tensor) in fedfuse, so the mergekit process of the ``*_seeded`` cases seeds
the global generator with fedfuse's seed right before each model's tensor is sparsified
(``torch.manual_seed(derive_seed(seed, 0, i, name))``): then the masks, and so the merges, agree
exactly. Unpatched, the two agree only in distribution, which ``test_dare_unseeded_agrees_in_distribution``
checks.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
import yaml
from safetensors.torch import load_file
from tiny_models import tiny_llama
from typer.testing import CliRunner

from fedfuse.algebra import derive_seed
from fedfuse.cli.merge import merge
from fedfuse.offline.recipe import load_recipe
from fedfuse.strategies import available_strategies

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MERGEKIT_VERSION = "0.1.5"
TORCH_VERSION = "2.13.0"
VENV = (
    Path(os.environ.get("FEDFUSE_MERGEKIT_VENV", Path.home() / ".cache" / "fedfuse-tests" / "mergekit-venv"))
    / MERGEKIT_VERSION
)
SEED = 7
TOLERANCE = 1e-5

A, B, C = "ft_a", "ft_b", "ft_c"


def _recipe(method: str, *models: tuple[str, dict[str, Any] | None], **top: Any) -> dict[str, Any]:
    entries = [{"model": name, **({"parameters": params} if params else {})} for name, params in models]
    return {"merge_method": method, "models": entries, **top}


def _w(weight: Any, density: Any = None, **more: Any) -> dict[str, Any]:
    return {"weight": weight, **({"density": density} if density is not None else {}), **more}


SLERP_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]
WEIGHT_FILTERED = [{"filter": "self_attn", "value": [0.2, 1.0]}, {"filter": "mlp", "value": 0.7}, {"value": 0.5}]
NO_BASE = {"base_model": None}  # linear: mergekit merges a base_model as one more input
CASES: dict[str, dict[str, Any]] = {
    "linear": _recipe("linear", ("base", _w(1.0)), (A, _w(2.0)), (B, _w(0.5))),
    "linear_unnormalized": _recipe(
        "linear", (A, _w(0.3)), (B, _w(0.5)), (C, _w(0.4)), parameters={"normalize": False}, **NO_BASE
    ),
    "linear_negative_weight": _recipe("linear", (A, _w(1.5)), (B, _w(-0.5)), **NO_BASE),
    "task_arithmetic": _recipe("task_arithmetic", (A, _w(0.5)), (B, _w(0.3)), (C, _w(0.7)), parameters={"lambda": 0.8}),
    "task_arithmetic_negation": _recipe("task_arithmetic", (A, _w(1.0)), (B, _w(-1.0))),
    "task_arithmetic_normalize": _recipe("task_arithmetic", (A, _w(1.0)), (B, _w(3.0)), parameters={"normalize": True}),
    "ties": _recipe("ties", (A, _w(1.0, 0.5)), (B, _w(0.5, 0.4)), (C, _w(0.8, 0.6)), tokenizer_source="base"),
    "ties_unnormalized_top_level": _recipe(
        "ties", (A, None), (B, None), (C, None), parameters={"weight": 0.6, "density": 0.5, "normalize": False}
    ),
    "ties_density_gradient": _recipe("ties", (A, _w(1.0, [0.3, 0.9])), (B, _w(1.0, 0.5))),
    "weight_gradient": _recipe("task_arithmetic", (A, _w([0, 0.5, 1])), (B, _w([1, 0.5, 0]))),
    "weight_filtered": _recipe("linear", (A, _w(WEIGHT_FILTERED)), (B, _w(1.0)), **NO_BASE),
    "breadcrumbs": _recipe("breadcrumbs", (A, _w(1.0, 0.6, gamma=0.05)), (B, _w(0.7, 0.5, gamma=0.05))),
    "breadcrumbs_ties": _recipe(
        "breadcrumbs_ties", (A, _w(1.0)), (B, _w(0.5)), (C, _w(0.8)), parameters={"density": 0.6, "gamma": 0.05}
    ),
    "model_stock": _recipe("model_stock", (A, None), (B, None), (C, None)),
    "model_stock_filter_wise": _recipe(
        "model_stock", (A, None), (B, None), (C, None), parameters={"filter_wise": True}
    ),
    "slerp": _recipe("slerp", ("base", None), (A, None), parameters={"t": 0.3}),
    "slerp_gradient": _recipe("slerp", ("base", None), (B, None), parameters={"t": SLERP_T}),
    "dare_ties_density_one": _recipe("dare_ties", (A, _w(1.0)), (B, _w(0.6)), (C, _w(0.4))),
    "dare_linear_density_one": _recipe("dare_linear", (A, _w(0.5)), (B, _w(0.6))),
    "dare_ties_seeded": _recipe("dare_ties", (A, _w(1.0, 0.5)), (B, _w(0.6, 0.7)), (C, _w(0.4, 0.4))),
    "dare_linear_seeded": _recipe("dare_linear", (A, _w(0.5, 0.6)), (B, _w(0.6, 0.3))),
    "della_seeded": _recipe("della", (A, _w(1.0, 0.5, epsilon=0.1)), (B, _w(0.6, 0.6)), (C, _w(0.4, 0.4))),
    "della_linear_seeded": _recipe(
        "della_linear", (A, _w(0.5, 0.5)), (B, _w(0.6, 0.7, epsilon=0.2)), parameters={"lambda": 1.2}
    ),
    "ties_out_bfloat16": _recipe("ties", (A, _w(1.0, 0.5)), (B, _w(0.5, 0.5)), dtype="float32", out_dtype="bfloat16"),
    "dare_linear_unseeded": _recipe("dare_linear", (A, _w(1.0, 0.3))),
}
"""Recipe per case (model names are folders in the working directory); ``base_model: base`` unless None."""

METHOD_OF_CASE = {name: case["merge_method"] for name, case in CASES.items()}
SEEDED = {name for name in CASES if name.endswith("_seeded")}
DISTRIBUTION_ONLY = {"dare_linear_unseeded"}

DRIVER = textwrap.dedent(
    """
    import json, sys
    import torch, yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from mergekit.merge_methods import generalized_task_arithmetic as gta

    jobs = json.load(open(sys.argv[1]))
    state = {"seeds": None, "name": None, "ids": [], "next": 0}
    merge_group, sparsify = gta.GeneralizedTaskArithmeticMerge.merge_group, gta.sparsify

    def seeded_merge_group(self, group, /, **parameters):
        state.update(name=group.metadata.name, ids=[str(e.id) for e in group.non_base], next=0)
        return merge_group(self, group, **parameters)

    def seeded_sparsify(*args, **kwargs):
        if state["seeds"] is not None:  # fedfuse's seed for this (model, tensor)
            model = state["ids"][state["next"]]
            torch.manual_seed(state["seeds"][model][state["name"]])
        state["next"] += 1
        return sparsify(*args, **kwargs)

    gta.GeneralizedTaskArithmeticMerge.merge_group = seeded_merge_group
    gta.sparsify = seeded_sparsify
    for job in jobs:
        state["seeds"] = job["seeds"]
        with open(job["recipe"]) as f:
            config = MergeConfiguration.model_validate(yaml.safe_load(f))
        options = MergeOptions(random_seed=0, quiet=True, write_model_card=False, copy_tokenizer=False)
        run_merge(config, job["out"], options=options)
    """
)


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def mergekit_python() -> Path:
    """The cached virtualenv's interpreter, building the virtualenv first when it is missing (locked)."""
    python = VENV / "bin" / "python"
    marker = VENV / ".complete"
    if marker.exists():
        return python
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / f".{MERGEKIT_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return python
        shutil.rmtree(VENV, ignore_errors=True)
        steps = {
            "python -m venv": [sys.executable, "-m", "venv", str(VENV)],
            f"pip install torch=={TORCH_VERSION}": [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                f"torch=={TORCH_VERSION}",
            ],
            f"pip install mergekit=={MERGEKIT_VERSION}": [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                f"mergekit=={MERGEKIT_VERSION}",
            ],
            "import mergekit": [str(python), "-c", "import mergekit.merge"],
        }
        for label, step in steps.items():
            try:
                done = _run(step, timeout=1800)
            except (OSError, subprocess.TimeoutExpired) as exc:
                pytest.skip(f"cannot build mergekit's virtualenv ({label}): {exc}")
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                pytest.skip(f"cannot build mergekit's virtualenv ({label}; no package index?): {last}")
        marker.touch()
    return python


def _tiny_llama(root: Path) -> list[str]:
    """Save ``base`` and three seeded fine-tunes of a tiny Llama under ``root``; return the tensor names."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = tiny_llama(num_hidden_layers=3)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    for i, name in enumerate(["base", A, B, C]):
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for key, param in base.state_dict().items():
                noise = torch.randn(param.shape, generator=generator) * 0.02
                param.copy_(state[key] + (noise if i else 0))
        base.save_pretrained(root / name)
        fast.save_pretrained(root / name)
    return list(state)


def _fedfuse_seeds(recipe: Path, names: list[str]) -> dict[str, dict[str, int]]:
    """fedfuse's DARE/DELLA seed of each (model, tensor): model i of the merge draws derive_seed(seed, 0, i, name)."""
    loaded = load_recipe(recipe)
    return {str(path): {n: derive_seed(SEED, 0, i, n) for n in names} for i, path in enumerate(loaded.models)}


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Every registered case merged by mergekit (one process) and by fedfuse: name → (mergekit, fedfuse) folder."""
    python = mergekit_python()
    root = tmp_path_factory.mktemp("mergekit-diff")
    names = _tiny_llama(root)
    jobs, cases = [], {}
    cwd = Path.cwd()
    os.chdir(root)  # recipes name models relative to the working directory, in mergekit and fedfuse alike
    try:
        for name, case in CASES.items():
            if METHOD_OF_CASE[name] not in available_strategies():
                continue
            recipe = root / f"{name}.yml"
            doc = {k: v for k, v in {"base_model": "base", **case}.items() if v is not None}
            recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
            seeds = _fedfuse_seeds(recipe, names) if name in SEEDED else None
            jobs.append({"recipe": str(recipe), "out": str(root / f"mk-{name}"), "seeds": seeds})
            cases[name] = recipe
        (root / "jobs.json").write_text(json.dumps(jobs))
        (root / "driver.py").write_text(DRIVER)
        done = _run([str(python), str(root / "driver.py"), str(root / "jobs.json")], 900)
        assert done.returncode == 0, done.stderr[-4000:]
        out = {}
        cli = typer.Typer()
        cli.command()(merge)
        for name, recipe in cases.items():  # `fedfuse merge --config RECIPE --out OUT --seed SEED`
            result = CliRunner().invoke(
                cli, ["--config", str(recipe), "--out", str(root / f"ff-{name}"), "--seed", str(SEED), "-q"]
            )
            assert result.exit_code == 0, result.output
            out[name] = (root / f"mk-{name}", root / f"ff-{name}")
    finally:
        os.chdir(cwd)
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _case(merged: dict[str, tuple[Path, Path]], name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    if name not in merged:
        pytest.skip(f"method {METHOD_OF_CASE[name]!r} is not registered in fedfuse yet")
    theirs, ours = (_tensors(folder) for folder in merged[name])
    assert set(theirs) == set(ours)
    return theirs, ours


@pytest.mark.parametrize("name", [n for n in CASES if n not in DISTRIBUTION_ONLY])
def test_recipe_merges_what_mergekit_merges(merged, name: str) -> None:
    theirs, ours = _case(merged, name)
    bf16 = CASES[name].get("out_dtype") == "bfloat16"
    for key, expected in theirs.items():
        got = ours[key]
        assert got.dtype == expected.dtype, key
        if bf16:  # both round a float32 merge once; values that straddle a rounding boundary may differ by one ulp
            torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-6, msg=key)
        else:
            diff = (got.double() - expected.double()).abs().max().item()
            assert diff <= TOLERANCE, f"{name}: tensor {key} differs from mergekit by {diff:.3g}"


def test_dare_unseeded_agrees_in_distribution(merged) -> None:
    """mergekit's DARE mask comes from torch's global RNG: the kept fraction and the l1 norms agree, not entries."""
    theirs, ours = _case(merged, "dare_linear_unseeded")
    base = _tensors(merged["dare_linear_unseeded"][0].parent / "base")
    for key in ("model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"):
        kept = [float(((t[key] - base[key]) != 0).float().mean()) for t in (theirs, ours)]
        numel = base[key].numel()
        sigma = (0.3 * 0.7 / numel) ** 0.5
        assert all(abs(k - 0.3) < 5 * sigma for k in kept), (key, kept)
        norms = [float((t[key] - base[key]).abs().sum()) for t in (theirs, ours)]
        assert norms[0] == pytest.approx(norms[1], rel=1e-4)  # l1 rescale: both keep ‖τ‖₁ exactly
