"""`fedfuse merge --adapter`: PEFT LoRA adapters merged exactly in ΔW space, checked against PEFT itself.

The oracle is PEFT's own ``merge_and_unload`` of each adapter (its ΔWₖ, with its scale: alpha/r or
rsLoRA's alpha/√r), merged by hand; fedfuse must give the same model, and an ``--out-adapter`` of rank
≥ the sum of the input ranks must load in PEFT and reproduce it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import typer
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

from fedfuse.cli.merge import merge
from fedfuse.offline import AdapterMergeResult, MergeInputError, merge_adapters

# Tiers are marked per test here: this module mixes integration and unit tests.

ADAPTERS = {
    # name: (rank, alpha, use_rslora, target modules, modules_to_save)
    "a2": (2, 4.0, False, ["q_proj", "v_proj"], None),
    "a4": (4, 16.0, True, ["q_proj", "k_proj", "v_proj", "o_proj"], None),
    "a8": (8, 8.0, False, ["q_proj", "v_proj", "down_proj"], ["lm_head"]),
}
SUM_OF_RANKS = 2 + 4 + 8


def llama() -> LlamaForCausalLM:
    return tiny_llama(intermediate_size=48)


def load_base(folder: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)


def make_adapter(base: Path, out: Path, seed: int, rank: int, alpha: float, rslora: bool, targets, saved) -> None:
    """A PEFT adapter with random non-zero A and B (PEFT starts B at 0) and a perturbed saved module."""
    config = LoraConfig(
        r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=targets, modules_to_save=saved, lora_dropout=0.0
    )
    model = get_peft_model(load_base(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    paths = {"base": root / "base"}
    llama().save_pretrained(paths["base"])
    for seed, (name, spec) in enumerate(ADAPTERS.items()):
        paths[name] = root / name
        make_adapter(paths["base"], paths[name], seed, *spec)
    return paths


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge of one adapter into the base: ``merge_and_unload``'s weights."""
    model = PeftModel.from_pretrained(load_base(base), adapter).merge_and_unload()
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def peft_deltas(folders) -> dict[str, dict[str, torch.Tensor]]:
    base = {name: t.detach().clone() for name, t in load_base(folders["base"]).state_dict().items()}
    deltas = {}
    for name in ADAPTERS:
        merged = peft_merged(folders["base"], folders[name])
        deltas[name] = {key: merged[key] - base[key] for key in base}
    return {"base": base, **deltas}


def invoke(args: list) -> object:
    app = typer.Typer()
    app.command()(merge)
    return CliRunner().invoke(app, [str(a) for a in args])


def adapter_args(folders, names=tuple(ADAPTERS)) -> list:
    return [x for name in names for x in ("--adapter", folders[name])]


def model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.integration
def test_fedavg_of_adapters_equals_fedavg_of_peft_merged_deltas(folders, peft_deltas, tmp_path):
    out = tmp_path / "merged"
    weights = [1.0, 2.0, 3.0]
    args = ["--base", folders["base"], *adapter_args(folders), "--method", "fedavg", "--out", out, "-q"]
    result = invoke([*args, *(x for w in weights for x in ("--weight", w))])
    assert result.exit_code == 0, result.output
    merged = model_tensors(out)
    base = peft_deltas["base"]
    assert set(merged) == set(base)
    for key, base_tensor in base.items():
        expected = base_tensor + sum(w * peft_deltas[n][key] for n, w in zip(ADAPTERS, weights, strict=True)) / 6.0
        torch.testing.assert_close(merged[key], expected, atol=1e-5, rtol=0, msg=key)
    assert any(not torch.equal(merged[k], base[k]) for k in base if "lm_head" in k)
    assert (out / "config.json").is_file()
    assert isinstance(load_base(out), LlamaForCausalLM)


@pytest.mark.unit
def test_task_arithmetic_of_adapters_equals_the_sum_of_peft_deltas(folders, peft_deltas, tmp_path):
    out = tmp_path / "ta"
    result = merge_adapters(folders["base"], [folders["a2"], folders["a4"]], method="task_arithmetic", lam=0.7, out=out)
    merged = model_tensors(result.out)
    for key, base_tensor in peft_deltas["base"].items():
        expected = base_tensor + 0.7 * (peft_deltas["a2"][key] + peft_deltas["a4"][key])
        torch.testing.assert_close(merged[key], expected, atol=1e-5, rtol=0, msg=key)


@pytest.mark.integration
def test_out_adapter_at_full_rank_reproduces_the_merged_model_in_peft(folders, tmp_path):
    full = tmp_path / "full"
    adapter = tmp_path / "adapter"
    common = ["--base", folders["base"], *adapter_args(folders), "--method", "task_arithmetic", "--lambda", "0.5"]
    assert invoke([*common, "--out", full, "-q"]).exit_code == 0
    result = invoke([*common, "--out", adapter, "--out-adapter", "--rank", SUM_OF_RANKS])
    assert result.exit_code == 0, result.output
    assert "relative error" in result.output
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (SUM_OF_RANKS, SUM_OF_RANKS, "LORA")
    loaded = peft_merged(folders["base"], adapter)
    expected = model_tensors(full)
    for key, tensor in expected.items():
        torch.testing.assert_close(loaded[key], tensor, atol=1e-4, rtol=0, msg=key)


@pytest.mark.integration
def test_out_adapter_at_low_rank_reports_a_nonzero_relative_error(folders, tmp_path):
    result = merge_adapters(
        folders["base"],
        [folders["a2"], folders["a4"], folders["a8"]],
        method="ties",
        density=0.5,
        out=tmp_path / "low",
        out_adapter=True,
        rank=1,
    )
    assert isinstance(result, AdapterMergeResult)
    assert 0 < result.mean_error <= result.max_error < 1
    assert result.rank == 1 and result.num_modules > 0
    common = ["--base", folders["base"], *adapter_args(folders), "--method", "fedavg"]
    low = invoke([*common, "--out", tmp_path / "low-cli", "--out-adapter", "--rank", "1"])
    assert low.exit_code == 0, low.output
    found = re.search(r"relative error max ([0-9.e-]+).*mean ([0-9.e-]+)", low.output.replace("\n", " "))
    assert found and float(found.group(1)) > 0 and float(found.group(2)) > 0


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def _broken_adapter(folders, tmp_path: Path, kind: str) -> Path:
    bad = tmp_path / f"bad-{kind}"
    bad.mkdir()
    config = json.loads((folders["a2"] / "adapter_config.json").read_text())
    tensors = load_file(folders["a2"] / "adapter_model.safetensors")
    if kind == "dora":
        config["use_dora"] = True
    if kind == "shape":
        key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
        tensors[key] = torch.ones(tensors[key].shape[0] + 1, tensors[key].shape[1])
    if kind != "no-config":
        (bad / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, bad / "adapter_model.safetensors")
    return bad


@pytest.mark.integration
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no-config", "has no adapter_config.json"),
        ("shape", "was the adapter trained on another base model"),
        ("dora", "DoRA"),
        ("no-rank", "--out-adapter needs --rank"),
        ("with-model", "--adapter cannot be mixed with --model"),
    ],
)
def test_bad_adapter_merges_fail_with_one_line_and_write_nothing(folders, tmp_path, case, message):
    out = tmp_path / "out"
    adapters = [folders["a4"]]
    extra: list = []
    if case in ("no-config", "shape", "dora"):
        adapters.append(_broken_adapter(folders, tmp_path, case))
    if case == "no-rank":
        extra = ["--out-adapter"]
    if case == "with-model":
        extra = ["--model", folders["base"]]
    args = ["--base", folders["base"], *(x for a in adapters for x in ("--adapter", a)), "--method", "fedavg"]
    result = invoke([*args, "--out", out, *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert message in " ".join(result.output.split())
    _no_output(out)


@pytest.mark.unit
def test_an_adapter_for_another_base_model_name_is_refused(folders, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((folders["a2"] / "adapter_config.json").read_text())
    first = json.loads((folders["a4"] / "adapter_config.json").read_text())
    first["base_model_name_or_path"] = "org/llama-tiny"
    config["base_model_name_or_path"] = "org/mistral-tiny"
    a4 = tmp_path / "a4"
    a4.mkdir()
    (a4 / "adapter_config.json").write_text(json.dumps(first))
    (other / "adapter_config.json").write_text(json.dumps(config))
    save_file(load_file(folders["a4"] / "adapter_model.safetensors"), a4 / "adapter_model.safetensors")
    save_file(load_file(folders["a2"] / "adapter_model.safetensors"), other / "adapter_model.safetensors")
    with pytest.raises(MergeInputError, match="must share their base model"):
        merge_adapters(folders["base"], [a4, other], method="fedavg", out=tmp_path / "out")
    _no_output(tmp_path / "out")
