"""mergekit reads and runs the recipe a coefficient search writes, and merges what fedfuse merged.

The recipe has per-layer-group weights (``{filter, value}`` lists) and a density; mergekit runs in its own
cached virtualenv (tests/test_mergekit_differential.py builds it, or skips when it cannot).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from search_helpers import good_and_noise
from test_mergekit_differential import DRIVER, mergekit_python

from fedfuse.automerge import CoefficientModel
from fedfuse.automerge.inputs import load_inputs
from fedfuse.automerge.recipe_out import write_outputs
from fedfuse.automerge.scorers import build_scorer
from fedfuse.automerge.search import SearchSpace, search

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_mergekit_merges_the_searched_recipe_as_fedfuse_does(tiny_chat_llama_dir: Path, tmp_path: Path) -> None:
    import subprocess

    python = mergekit_python()
    setup = good_and_noise(tiny_chat_llama_dir, tmp_path)
    models = [setup["good"], setup["noise"]]
    inputs = load_inputs(setup["base"], models=models, layer_groups=2)
    scorer = build_scorer(f"loss:{setup['val']}", inputs.model, inputs.tokenizer, causal=True)
    cmodel = CoefficientModel(inputs.model, inputs.candidates)
    result = search(cmodel, scorer, method="ties", space=SearchSpace.parse("weights,density", "ties"), budget=4)
    out = tmp_path / "fedfuse"
    write_outputs(result, inputs, base=setup["base"], models=models, out=out, seed=0, force=False, settings={})
    weights = [m["parameters"]["weight"] for m in yaml.safe_load((out / "recipe.yaml").read_text())["models"]]
    assert all(isinstance(w, list) for w in weights)  # per layer group: the {filter, value} form
    jobs = [{"recipe": str(out / "recipe.yaml"), "out": str(tmp_path / "mergekit"), "seeds": None}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "driver.py").write_text(DRIVER)
    done = subprocess.run(
        [str(python), str(tmp_path / "driver.py"), str(tmp_path / "jobs.json")],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    theirs, ours = _tensors(tmp_path / "mergekit"), _tensors(out)
    assert set(theirs) == set(ours)
    for name in inputs.candidates.names:
        assert torch.allclose(theirs[name].float(), ours[name].float(), atol=1e-5), name
