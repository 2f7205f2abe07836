"""``fedfuse merge search`` in process: what it writes, that ``fedfuse merge --config`` remakes it, and its errors.

Also the lm-eval scorer (lm-evaluation-harness on the in-memory model, in process) on a shipped-style skill task.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from search_helpers import good_and_noise, write_chats
from typer.testing import CliRunner

from fedfuse.cli.main import app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tiny_chat_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return good_and_noise(tiny_chat_llama_dir, tmp_path_factory.mktemp("search-cli"))


def _invoke(*args: str):
    return CliRunner().invoke(app, ["merge", *args], env={"COLUMNS": "200"})


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _inputs(setup: dict[str, Path]) -> list[str]:
    return ["--base", str(setup["base"]), "-m", str(setup["good"]), "-m", str(setup["noise"])]


def test_search_writes_the_model_its_recipe_the_log_and_the_plot(setup, tmp_path):
    out = tmp_path / "out"
    args = ["--method", "ties", "--search", "weights,density", "--layer-groups", "2", "--optimizer", "tpe"]
    result = _invoke("search", *_inputs(setup), *args, "--scorer", f"loss:{setup['val']}", "--budget", "5",
                     "--seed", "3", "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "5 evaluations" in result.output
    for name in ("recipe.yaml", "search.json", "search.png", "config.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    log = json.loads((out / "search.json").read_text())
    assert len(log["evaluations"]) == 5 and log["optimizer"] == "tpe" and log["layer_groups"] == 2
    assert log["best"]["score"] == max(e["score"] for e in log["evaluations"])
    assert (out / "search.png").read_bytes().startswith(b"\x89PNG")
    assert yaml.safe_load((out / "recipe.yaml").read_text())["merge_method"] == "ties"
    again = _invoke("--config", str(out / "recipe.yaml"), "--out", str(tmp_path / "again"), "--seed", "3", "-q")
    assert again.exit_code == 0, again.output
    written, remade = _tensors(out), _tensors(tmp_path / "again")
    assert written.keys() == remade.keys() and all(torch.equal(written[n], remade[n]) for n in written)


def test_greedy_soup_from_the_command_line_keeps_only_the_good_model(setup, tmp_path):
    out = tmp_path / "soup"
    result = _invoke("search", *_inputs(setup), "--method", "greedy_soup", "--scorer", f"loss:{setup['val']}",
                     "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "soup: good" in result.output
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["merge_method"] == "linear" and [m["model"] for m in recipe["models"]] == [str(setup["good"])]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scorer", "bleu:val.jsonl"], "KIND one of loss, exact-match, accuracy, lm-eval"),
        (["--scorer", "loss:nowhere.jsonl"], "no such file nowhere.jsonl"),
        (["--method", "greedy_soup", "--budget", "5"], "drop --budget"),
        (["--method", "slerp"], "choose one of task_arithmetic"),
        (["--optimizer", "grid"], "choose one of cma, tpe"),
        (["--out", "{val}"], "exists: pass --force to replace it"),
        (["--budget", "1"], "at least 2"),
        (["--method", "linear", "--search", "lam"], "linear has no λ"),
        (["--scorer", "accuracy:{val}"], "scorer accuracy needs a sequence classifier as the base"),
    ],
)
def test_user_mistakes_are_one_line_errors_with_exit_2(setup, tmp_path, args, message):
    given = [a.format(val=setup["val"]) for a in args]
    scorer = [] if "--scorer" in given else ["--scorer", f"loss:{setup['val']}"]
    out = [] if "--out" in given else ["--out", str(tmp_path / "x")]
    result = _invoke("search", *_inputs(setup), *given, *scorer, *out)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "x").exists()


def test_lm_eval_scorer_runs_a_skill_task_on_the_in_memory_merge(setup, tmp_path):
    pytest.importorskip("lm_eval")
    from fedfuse.automerge import CoefficientModel
    from fedfuse.automerge.inputs import load_inputs
    from fedfuse.automerge.scorers import build_scorer, greedy_answers

    inputs = load_inputs(setup["base"], models=[setup["good"], setup["noise"]])
    inputs.tokenizer.eos_token = "[SEP]"  # ends each chat turn of the tiny model's template
    cmodel = CoefficientModel(inputs.model, inputs.candidates)
    cmodel.load(torch.tensor([1.0, 0.0]))
    prompts = [f"Say the word number {i}." for i in range(3)]
    own = greedy_answers(inputs.model, inputs.tokenizer, prompts, 16)
    scores = []
    for name, answers in (("own", own), ("wrong", [f"never said {a}" for a in own])):
        data = tmp_path / name
        data.mkdir()
        write_chats(data / "echo-test.jsonl", list(zip(prompts, answers, strict=True)))
        spec = f"lm-eval:fedfuse_echo,data={data},limit=2"
        scorer = build_scorer(spec, inputs.model, inputs.tokenizer, causal=True)
        scores.append(scorer.score(cmodel))
        assert scorer.evaluations == 1
    assert scores == [1.0, 0.0]  # the harness decodes as greedy_answers does


def test_an_adapters_search_writes_the_scored_merge_as_the_full_model(setup, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from fedfuse.automerge import CoefficientModel
    from fedfuse.automerge.inputs import load_inputs
    from fedfuse.automerge.search import Point, load_point

    adapters = []
    for seed in (1, 2):
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(setup["base"], dtype=torch.float32), config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
        peft_model.save_pretrained(tmp_path / f"adapter{seed}")
        adapters += ["--adapter", str(tmp_path / f"adapter{seed}")]
    out = tmp_path / "out"
    args = ["--method", "dare_linear", "--search", "weights,density", "--scorer", f"loss:{setup['val']}"]
    result = _invoke("search", "--base", str(setup["base"]), *adapters, *args, "--budget", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert not (out / "recipe.yaml").exists() and (out / "search.json").is_file() and (out / "config.json").is_file()
    best = json.loads((out / "search.json").read_text())["best"]["point"]
    inputs = load_inputs(setup["base"], adapters=[tmp_path / "adapter1", tmp_path / "adapter2"])
    cmodel = CoefficientModel(inputs.model, inputs.candidates)
    point = Point(tuple(tuple(row) for row in best["weights"]), best["lam"], best["density"])
    load_point(cmodel, "dare_linear", point, 0)
    written, scored = _tensors(out), dict(inputs.model.named_parameters())
    assert written.keys() >= scored.keys()
    for name in inputs.candidates.names:
        assert torch.allclose(written[name], scored[name], atol=1e-6), name
