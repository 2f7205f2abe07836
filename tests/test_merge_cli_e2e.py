"""`fedfuse merge` end to end: tiny transformers models in, a merged model that transformers loads out."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file
from tiny_models import tiny_llama
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizerFast,
)
from typer.testing import CliRunner

from fedfuse.algebra import Sparsifier, apply_task_vector, dare_seed_fn, sparsify_update, task_vector
from fedfuse.checkpoints import INDEX_FILE
from fedfuse.cli.merge import merge
from fedfuse.strategies import get_strategy

# Tiers are marked per test here: this module mixes e2e and integration tests.

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "federated", "merge", "model", "task", "vector", "base"]


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A deterministic "fine-tuned" copy: every floating parameter moved by small seeded noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_((0.02 * torch.randn(param.shape, generator=g)).to(param.dtype))
    return model


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bert")
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
        max_position_embeddings=64,
    )
    (root / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(root / "vocab.txt"))
    paths = {"base": root / "base", "m1": root / "m1", "m2": root / "m2"}
    for key, seed in [("base", None), ("m1", 1), ("m2", 2)]:
        torch.manual_seed(0)
        model = BertModel(config)
        if seed is not None:
            perturbed(model, seed)
        model.save_pretrained(paths[key])
    tokenizer.save_pretrained(paths["base"])
    return paths


def reference(paths: list[Path], base: Path, method: str, *, weights=None, density=1.0, lam=1.0, seed=0) -> dict:
    """The merge of the saved weights computed in memory with the strategies API."""
    base_sd = load_file(base / "model.safetensors")
    strategy = get_strategy(method, lam=lam)
    sparsifier = Sparsifier(strategy.default_sparsifier, density)
    state = strategy.new_state()
    for k, path in enumerate(paths):
        tau = task_vector(load_file(path / "model.safetensors"), base_sd)
        update = sparsify_update(tau, sparsifier, dare_seed_fn(seed, 0, k))
        state.add(update, weight=1.0 if weights is None else weights[k])
    return apply_task_vector(base_sd, state.finalize())


def assert_loaded_equals(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(merge)
    return app


def invoke(args: list[str]):
    return CliRunner().invoke(cli(), [str(a) for a in args])


@pytest.mark.e2e
def test_console_script_merges_a_bert_that_transformers_loads(tmp_path: Path, bert) -> None:
    out = tmp_path / "merged"
    result = subprocess.run(
        [
            "fedfuse",
            "merge",
            "--base",
            bert["base"],
            "--model",
            bert["m1"],
            "--model",
            bert["m2"],
            "--method",
            "ties",
            "--density",
            "0.2",
            "--weight",
            "1",
            "--weight",
            "0.5",
            "--lambda",
            "1.0",
            "--seed",
            "0",
            "--device",
            "cpu",
            "--out",
            out,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote model" in result.stdout
    written = sorted(p.name for p in out.iterdir())
    assert written == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    expected = reference([bert["m1"], bert["m2"]], bert["base"], "ties", weights=[1.0, 0.5], density=0.2)
    assert_loaded_equals(AutoModel.from_pretrained(out), expected)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("federated model merge")["input_ids"] == [2, 5, 7, 6, 3]


@pytest.mark.integration
def test_sharded_output_still_loads(tmp_path: Path, bert) -> None:
    out = tmp_path / "sharded"
    result = invoke(
        [
            "--base",
            bert["base"],
            "-m",
            bert["m1"],
            "-m",
            bert["m2"],
            "--method",
            "task_arithmetic",
            "--lambda",
            "0.5",
            "--max-shard-size",
            "20KB",
            "--out",
            out,
            "--quiet",
        ]
    )
    assert result.exit_code == 0, result.output
    assert result.output == ""
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and sorted(p.name for p in out.glob("model-*.safetensors")) == shards
    expected = reference([bert["m1"], bert["m2"]], bert["base"], "task_arithmetic", lam=0.5)
    assert_loaded_equals(AutoModel.from_pretrained(out), expected)


@pytest.mark.integration
def test_bf16_llama_with_dare_ties_keeps_its_dtype_and_loads(tmp_path: Path) -> None:
    paths = [tmp_path / name for name in ("base", "m1", "m2", "m3")]
    for i, path in enumerate(paths):
        model = tiny_llama(vocab_size=100, num_attention_heads=2, num_key_value_heads=1).to(torch.bfloat16)
        if i:
            perturbed(model, i)
        model.save_pretrained(path)
    out = tmp_path / "out"
    result = invoke(
        [
            "--base",
            paths[0],
            "-m",
            paths[1],
            "-m",
            paths[2],
            "-m",
            paths[3],
            "--method",
            "dare_ties",
            "--density",
            "0.5",
            "--seed",
            "42",
            "--out",
            out,
        ]
    )
    assert result.exit_code == 0, result.output
    assert (out / "generation_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    assert_loaded_equals(merged, reference(paths[1:], paths[0], "dare_ties", density=0.5, seed=42))


@pytest.mark.integration
def test_tiers_through_the_cli_equal_the_flat_merge(tmp_path: Path, bert) -> None:
    common = ["--base", bert["base"], "--method", "ties", "--density", "0.3"]
    assert invoke([*common, "-m", bert["m1"], "-m", bert["m2"], "--out", tmp_path / "flat"]).exit_code == 0
    assert invoke([*common, "-m", bert["m1"], "--partial-out", tmp_path / "p1.safetensors"]).exit_code == 0
    assert invoke([*common, "-m", bert["m2"], "--partial-out", tmp_path / "p2.safetensors"]).exit_code == 0
    result = invoke(
        [
            "--base",
            bert["base"],
            "--combine",
            tmp_path / "p1.safetensors",
            "--combine",
            tmp_path / "p2.safetensors",
            "--out",
            tmp_path / "tiered",
        ]
    )
    assert result.exit_code == 0, result.output
    flat = load_file(tmp_path / "flat" / "model.safetensors")
    tiered = AutoModel.from_pretrained(tmp_path / "tiered").state_dict()
    for name, tensor in flat.items():
        torch.testing.assert_close(tiered[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.integration
def test_partials_written_under_plain_names_are_combined_by_the_cli(tmp_path: Path, bert, monkeypatch) -> None:
    """What --partial-out writes, --combine reads: whatever name the user typed (no .safetensors needed)."""
    monkeypatch.chdir(tmp_path)
    common = ["--base", bert["base"], "--method", "ties", "--density", "0.3"]
    assert invoke([*common, "-m", bert["m1"], "-m", bert["m2"], "--out", "flat"]).exit_code == 0
    first = invoke([*common, "-m", bert["m1"], "--partial-out", "p1"])
    assert first.exit_code == 0, first.output
    assert "wrote partial statistics to p1" in first.output
    assert invoke([*common, "-m", bert["m2"], "--partial-out", "p2"]).exit_code == 0
    region = invoke(["--base", bert["base"], "--combine", "p1", "--combine", "p2", "--partial-out", "region"])
    assert region.exit_code == 0, region.output
    result = invoke(["--base", bert["base"], "--combine", "region", "--out", "tiered"])
    assert result.exit_code == 0, result.output
    flat = load_file(tmp_path / "flat" / "model.safetensors")
    tiered = AutoModel.from_pretrained(tmp_path / "tiered").state_dict()
    for name, tensor in flat.items():
        torch.testing.assert_close(tiered[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat", "p1", "p2", "region", "tiered"]


@pytest.mark.integration
def test_param_sets_a_declared_strategy_parameter(tmp_path: Path, bert) -> None:
    common = ["--base", bert["base"], "-m", bert["m1"], "-m", bert["m2"], "--method", "ties", "--density", "0.3"]
    assert invoke([*common, "--vote", "count", "--out", tmp_path / "flag", "-q"]).exit_code == 0
    assert invoke([*common, "--param", "vote=count", "--out", tmp_path / "param", "-q"]).exit_code == 0
    assert invoke([*common, "--out", tmp_path / "mass", "-q"]).exit_code == 0
    flag, param, mass = (load_file(tmp_path / d / "model.safetensors") for d in ("flag", "param", "mass"))
    assert all(torch.equal(flag[n], param[n]) for n in flag)
    assert any(not torch.equal(flag[n], mass[n]) for n in flag)


@pytest.mark.integration
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "ties"], "give --density"),
        (["--method", "nope"], "unknown merge strategy 'nope'; available: breadcrumbs, breadcrumbs_ties, dare_linear"),
        (["--method", "fedavg", "--weight", "1"], "got 1 weight(s) for 2 model(s)"),
        (["--method", "fisher"], "needs a Fisher diagonal file per model"),
        (
            ["--method", "ties", "--density", "0.2", "--combine", "p.safetensors"],
            "--model, --method, --density cannot be used with --combine",
        ),
        (
            ["--method", "fedavg", "--param", "eps=1e-8"],
            "strategy 'fedavg' has no parameter 'eps'; its parameters: lam",
        ),
        (["--method", "fisher", "--param", "eps"], "--param: strategy parameters are name=value, got 'eps'"),
        (["--method", "ties", "--density", "0.2", "--vote", "count", "--param", "vote=mass"], "vote is given twice"),
        (["--method", "fedavg", "--param", "lam=0.5", "--lambda", "2"], "λ is given twice"),
    ],
)
def test_bad_input_prints_a_red_error_and_exits_2_without_a_traceback(tmp_path: Path, bert, extra, message) -> None:
    result = invoke(["--base", bert["base"], "-m", bert["m1"], "-m", bert["m2"], "--out", tmp_path / "out", *extra])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_a_mismatched_model_is_named(tmp_path: Path, bert) -> None:
    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=100
    )
    BertModel(config).save_pretrained(tmp_path / "shallow")
    result = invoke(
        [
            "--base",
            bert["base"],
            "-m",
            bert["m1"],
            "-m",
            tmp_path / "shallow",
            "--method",
            "fedavg",
            "--out",
            tmp_path / "out",
        ]
    )
    assert result.exit_code == 2
    assert "model 2" in result.output and "lacks tensor 'encoder.layer.1." in " ".join(result.output.split())


@pytest.mark.integration
def test_help_lists_every_method() -> None:
    result = invoke(["--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for name in ("fedavg", "task_arithmetic", "fisher", "ties", "dare_linear", "dare_ties"):
        assert name in text
