"""The offline merge engine: equals the in-memory strategies API (and PEFT), streams, tiers, refuses bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft.utils import merge_utils
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fedfuse.offline.sinks as sinks
from fedfuse.algebra import Sparsifier, apply_task_vector, dare_seed_fn, sparsify_update, task_vector
from fedfuse.checkpoints import INDEX_FILE, open_checkpoint
from fedfuse.offline import MergeInputError, combine_partials, merge_models
from fedfuse.strategies import get_strategy
from fedfuse.wire.container import pack, unpack
from fedfuse.wire.partial_file import open_partial

pytestmark = pytest.mark.unit

NUM_MODELS = 3


def random_base(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb.weight": torch.randn(20, 8, generator=g),
        "layer.0.weight": torch.randn(8, 8, generator=g),
        "layer.0.bias": torch.randn(8, generator=g),
        "layer.1.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "norm.scale": torch.tensor(1.25),
        "empty": torch.zeros(0, 8),
        "position_ids": torch.arange(12),
    }


def tuned_copy(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return {
        name: (t.float() + 0.1 * torch.randn(t.shape, generator=g)).to(t.dtype) if t.is_floating_point() else t.clone()
        for name, t in base.items()
    }


def fisher_of(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + seed)
    return {name: torch.rand(t.shape, generator=g) for name, t in base.items() if t.is_floating_point()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inputs")
    base = random_base()
    models = [tuned_copy(base, k) for k in range(NUM_MODELS)]
    fishers = [fisher_of(base, k) for k in range(NUM_MODELS)]
    save_file(base, root / "base.safetensors", metadata={"format": "pt"})
    for k in range(NUM_MODELS):
        save_file(models[k], root / f"m{k}.safetensors")
        save_file(fishers[k], root / f"f{k}.safetensors")
    return {
        "root": root,
        "base": base,
        "models": models,
        "fishers": fishers,
        "base_path": root / "base.safetensors",
        "model_paths": [root / f"m{k}.safetensors" for k in range(NUM_MODELS)],
        "fisher_paths": [root / f"f{k}.safetensors" for k in range(NUM_MODELS)],
    }


def reference_merge(
    inputs: dict,
    method: str,
    *,
    weights=None,
    density=None,
    kind=None,
    lam=1.0,
    seed=0,
    dtype="float32",
    fishers=False,
    **own,
) -> dict[str, torch.Tensor]:
    """The merge built in memory with the algebra and strategies APIs (the specification)."""
    strategy = get_strategy(method, lam=lam, dtype=dtype, **own)
    kind = kind or strategy.default_sparsifier
    sparsifier = Sparsifier(kind, density if density is not None else 1.0)
    state = strategy.new_state()
    for k, model in enumerate(inputs["models"]):
        update = sparsify_update(task_vector(model, inputs["base"]), sparsifier, dare_seed_fn(seed, 0, k))
        weight = 1.0 if weights is None else weights[k]
        state.add(update, weight=weight, fisher=inputs["fishers"][k] if fishers else None)
    return apply_task_vector(inputs["base"], state.finalize())


def assert_same_model(out: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(out) == set(expected)
    for name in expected:
        assert out[name].dtype == expected[name].dtype, name
        torch.testing.assert_close(out[name], expected[name], rtol=0, atol=0, msg=name)


def run_merge(inputs: dict, out: Path, method: str, **kwargs) -> dict[str, torch.Tensor]:
    result = merge_models(inputs["base_path"], inputs["model_paths"], method=method, out=out, **kwargs)
    assert result.out == out and result.kind == "model" and result.num_updates == NUM_MODELS
    return load_file(out / "model.safetensors")


CASES = [
    ("fedavg", {"weights": [1.0, 2.0, 0.5]}),
    ("task_arithmetic", {"weights": [1.0, 0.5, 0.25], "lam": 0.7}),
    ("ties", {"density": 0.3, "weights": [1.0, 0.5, 2.0], "lam": 1.5}),
    ("ties", {"density": 0.5, "vote": "count"}),
    ("dare_linear", {"density": 0.6, "seed": 7}),
    ("dare_ties", {"density": 0.4, "seed": 3, "weights": [0.2, 1.0, 1.0]}),
    ("task_arithmetic", {"density": 0.25, "sparsifier": "trim"}),
    ("ties", {"density": 0.5, "sparsifier": "dare", "dtype": "float64"}),
]


@pytest.mark.parametrize("method, kwargs", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_streamed_merge_equals_the_in_memory_strategies_merge(tmp_path: Path, inputs, method, kwargs) -> None:
    out = run_merge(inputs, tmp_path / "out", method, **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "sparsifier"}
    expected = reference_merge(inputs, method, kind=kwargs.get("sparsifier"), **ref_kwargs)
    assert_same_model(out, expected)
    assert torch.equal(out["position_ids"], inputs["base"]["position_ids"])


def test_fisher_merge_uses_one_fisher_file_per_model(tmp_path: Path, inputs) -> None:
    out = run_merge(inputs, tmp_path / "out", "fisher", fishers=inputs["fisher_paths"], weights=[1.0, 2.0, 3.0])
    assert_same_model(out, reference_merge(inputs, "fisher", fishers=True, weights=[1.0, 2.0, 3.0]))


def test_declared_parameters_reach_the_strategy_as_strings_or_values(tmp_path: Path, inputs) -> None:
    fishers = inputs["fisher_paths"]
    as_string = run_merge(inputs, tmp_path / "a", "fisher", fishers=fishers, params={"eps": "0.5"})
    assert_same_model(as_string, reference_merge(inputs, "fisher", fishers=True, eps=0.5))
    default = run_merge(inputs, tmp_path / "b", "fisher", fishers=fishers)
    assert any(not torch.equal(as_string[n], default[n]) for n in default)
    with pytest.raises(
        MergeInputError, match=r"strategy 'fisher' has no parameter 'epsilon'; its parameters: lam, eps"
    ):
        run_merge(inputs, tmp_path / "c", "fisher", fishers=fishers, params={"epsilon": 0.5})


def test_task_arithmetic_is_base_plus_lambda_times_the_weighted_sum(tmp_path: Path, inputs) -> None:
    weights, lam = [1.0, 0.5, 2.0], 0.3
    out = run_merge(inputs, tmp_path / "out", "task_arithmetic", weights=weights, lam=lam)
    base = inputs["base"]["layer.0.weight"]
    taus = [m["layer.0.weight"] - base for m in inputs["models"]]
    expected = base + lam * sum(w * t for w, t in zip(weights, taus, strict=False))
    torch.testing.assert_close(out["layer.0.weight"], expected, rtol=1e-6, atol=1e-6)


def test_fedavg_divides_by_the_total_weight(tmp_path: Path, inputs) -> None:
    weights = [3.0, 1.0, 0.0]
    out = run_merge(inputs, tmp_path / "out", "fedavg", weights=weights)
    models = inputs["models"]
    expected = (3 * models[0]["layer.0.bias"] + models[1]["layer.0.bias"]) / 4
    torch.testing.assert_close(out["layer.0.bias"], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_unit_weight_merges_equal_peft_merge_utils(tmp_path: Path, inputs, method) -> None:
    density = 0.4
    kwargs = {"density": density} if method == "ties" else {}
    out = run_merge(inputs, tmp_path / "out", method, **kwargs)
    ones = torch.ones(NUM_MODELS)
    for name, base in inputs["base"].items():
        if base.dtype != torch.float32:
            continue
        taus = [m[name] - base for m in inputs["models"]]
        if method == "ties":
            merged = merge_utils.ties(taus, ones, density, majority_sign_method="total")
        else:
            merged = merge_utils.task_arithmetic(taus, ones)
        torch.testing.assert_close(out[name], base + merged, rtol=1e-6, atol=1e-6, msg=name)


def test_dare_output_is_byte_identical_for_the_same_seed_and_differs_for_another(tmp_path: Path, inputs) -> None:
    def merged_bytes(folder: str, seed: int) -> bytes:
        run_merge(inputs, tmp_path / folder, "dare_ties", density=0.5, seed=seed)
        return (tmp_path / folder / "model.safetensors").read_bytes()

    first = merged_bytes("a", 11)
    assert merged_bytes("b", 11) == first
    assert merged_bytes("c", 12) != first


def test_output_header_names_the_method(tmp_path: Path, inputs) -> None:
    run_merge(inputs, tmp_path / "out", "ties", density=0.2)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt" and metadata["fedfuse_method"] == "ties"


def test_sharded_output_matches_the_single_file_output(tmp_path: Path, inputs) -> None:
    single = run_merge(inputs, tmp_path / "single", "ties", density=0.3)
    result = merge_models(
        inputs["base_path"],
        inputs["model_paths"],
        method="ties",
        density=0.3,
        out=tmp_path / "sharded",
        max_shard_size="300",
    )
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in result.files) == sorted([*shards, INDEX_FILE])
    with open_checkpoint(tmp_path / "sharded") as ckpt:
        assert_same_model({name: ckpt.get(name) for name in ckpt.names}, single)


def save_sharded(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Save ``tensors`` as an HF sharded folder of two shards plus the index."""
    folder.mkdir()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for shard, members in halves.items():
        save_file({n: tensors[n] for n in members}, folder / shard)
    weight_map = {n: shard for shard, members in halves.items() for n in members}
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_sharded_input_folders_and_config_files(tmp_path: Path, inputs) -> None:
    base_dir = save_sharded(tmp_path / "base", inputs["base"])
    model_dirs = [save_sharded(tmp_path / f"m{k}", m) for k, m in enumerate(inputs["models"])]
    (base_dir / "config.json").write_text('{"model_type": "toy"}')
    (base_dir / "tokenizer.json").write_text("{}")
    (base_dir / "training_args.bin").write_bytes(b"pickle")
    merge_models(base_dir, model_dirs, method="ties", density=0.3, out=tmp_path / "out")
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (tmp_path / "out" / "config.json").read_text() == '{"model_type": "toy"}'
    assert_same_model(load_file(tmp_path / "out" / "model.safetensors"), reference_merge(inputs, "ties", density=0.3))


def test_float64_accumulation_agrees_with_float32(tmp_path: Path, inputs) -> None:
    a = run_merge(inputs, tmp_path / "a", "ties", density=0.5)
    b = run_merge(inputs, tmp_path / "b", "ties", density=0.5, dtype="float64")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-2, atol=1e-5)


def test_force_replaces_a_non_empty_output(tmp_path: Path, inputs) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(MergeInputError, match=r"is not empty.*--force"):
        run_merge(inputs, out, "fedavg")
    assert (out / "stale.txt").exists()
    run_merge(inputs, out, "fedavg", force=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


def test_a_crash_mid_merge_leaves_no_output(tmp_path: Path, inputs, monkeypatch) -> None:
    calls = []

    def failing_apply(base, tau, lam=1.0, **options):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return apply_task_vector(base, tau, lam, **options)

    monkeypatch.setattr(sinks, "apply_task_vector", failing_apply)
    out_root = tmp_path / "outputs"
    out_root.mkdir()
    with pytest.raises(RuntimeError, match=r"disk on fire"):
        run_merge(inputs, out_root / "out", "fedavg")
    assert list(out_root.iterdir()) == []


# ---------------------------------------------------------------- bad input, checked before writing


def save_variant(inputs: dict, path: Path, change) -> Path:
    tensors = {n: t.clone() for n, t in inputs["models"][1].items()}
    change(tensors)
    save_file(tensors, path)
    return path


def models_with(inputs: dict, bad: Path) -> list[Path]:
    return [inputs["model_paths"][0], bad, inputs["model_paths"][2]]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop("layer.0.bias"), r"model 2 .*bad.safetensors lacks tensor 'layer.0.bias' that the base"),
        (
            lambda t: t.update(extra=torch.zeros(2)),
            r"model 2 .*bad.safetensors has tensor 'extra' that the base .* lacks",
        ),
        (
            lambda t: t.update({"layer.0.weight": torch.zeros(8, 9)}),
            r"tensor 'layer.0.weight': shape \[8, 9\] in model 2 .*bad.safetensors but \[8, 8\] in the base",
        ),
        (
            lambda t: t.update({"layer.1.weight": t["layer.1.weight"].float()}),
            r"tensor 'layer.1.weight': dtype torch.float32 in model 2 .*bad.safetensors but torch.bfloat16 in the base",
        ),
        (
            lambda t: t.update({"position_ids": t["position_ids"].int()}),
            r"tensor 'position_ids': dtype torch.int32 in model 2 .* but torch.int64 in the base",
        ),
    ],
    ids=["missing", "extra", "shape", "dtype", "int-dtype"],
)
def test_mismatched_models_are_named_and_nothing_is_written(tmp_path: Path, inputs, change, message) -> None:
    bad = save_variant(inputs, tmp_path / "bad.safetensors", change)
    with pytest.raises(MergeInputError, match=message):
        merge_models(inputs["base_path"], models_with(inputs, bad), method="ties", density=0.2, out=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_missing_inputs_are_named(tmp_path: Path, inputs) -> None:
    with pytest.raises(MergeInputError, match=r"base: checkpoint not found: .*no-base"):
        merge_models(tmp_path / "no-base", inputs["model_paths"], method="fedavg", out=tmp_path / "out")
    with pytest.raises(MergeInputError, match=r"model 2: checkpoint not found: .*no-model"):
        merge_models(
            inputs["base_path"], models_with(inputs, tmp_path / "no-model"), method="fedavg", out=tmp_path / "out"
        )
    assert list(tmp_path.iterdir()) == []


def test_a_pickle_only_folder_is_refused(tmp_path: Path, inputs) -> None:
    folder = tmp_path / "old-model"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(MergeInputError, match=r"model 2: .*pytorch_model.bin.*never unpickles"):
        merge_models(inputs["base_path"], models_with(inputs, folder), method="fedavg", out=tmp_path / "out")


def test_fisher_files_are_required_and_checked(tmp_path: Path, inputs) -> None:
    base, models, out = inputs["base_path"], inputs["model_paths"], tmp_path / "out"
    with pytest.raises(MergeInputError, match=r"'fisher' needs a Fisher diagonal file per model"):
        merge_models(base, models, method="fisher", out=out)
    with pytest.raises(MergeInputError, match=r"got 2 Fisher file"):
        merge_models(base, models, method="fisher", fishers=inputs["fisher_paths"][:2], out=out)
    with pytest.raises(MergeInputError, match=r"does not use Fisher"):
        merge_models(base, models, method="fedavg", fishers=inputs["fisher_paths"], out=out)
    partial = {n: t for n, t in inputs["fishers"][0].items() if n != "emb.weight"}
    save_file(partial, tmp_path / "f.safetensors")
    with pytest.raises(MergeInputError, match=r"Fisher file 1 .*f.safetensors lacks tensor 'emb.weight'"):
        fishers = [tmp_path / "f.safetensors", *inputs["fisher_paths"][1:]]
        merge_models(base, models, method="fisher", fishers=fishers, out=out)
    assert not out.exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "ties"}, r"'ties' sparsifies with 'trim': give density"),
        ({"method": "dare_linear"}, r"'dare_linear' sparsifies with 'dare': give density"),
        ({"method": "fedavg", "density": 0.3}, r"density 0.3 was given but method 'fedavg' uses no sparsifier"),
        ({"method": "fedavg", "sparsifier": "magic", "density": 0.3}, "unknown sparsifier 'magic'"),
        ({"method": "dare_ties", "density": 0.0}, "DARE needs density > 0"),
        ({"method": "ties", "density": 1.5}, r"density must be in \[0, 1\]"),
        ({"method": "merge-by-magic"}, "unknown merge strategy 'merge-by-magic'; available: .*ties"),
        ({"method": ""}, "choose a merge method; available: .*fedavg"),
        ({"method": "fedavg", "vote": "count"}, "strategy 'fedavg'.*vote"),
        ({"method": "ties", "density": 0.2, "vote": "loudest"}, "'vote' must be one of mass, count; got 'loudest'"),
        ({"method": "fedavg", "weights": [1.0, 2.0]}, r"got 2 weight\(s\) for 3 model\(s\)"),
        ({"method": "fedavg", "weights": [1.0, -2.0, 1.0]}, "weight 2 must be finite and >= 0"),
        ({"method": "fedavg", "weights": [0.0, 0.0, 0.0]}, "all weights are 0"),
        ({"method": "fedavg", "dtype": "float16"}, "dtype must be one of"),
        ({"method": "fedavg", "max_shard_size": "lots"}, "cannot read size 'lots'"),
        ({"method": "fedavg", "device": "cuda:0" if not torch.cuda.is_available() else "tpu"}, "device"),
    ],
)
def test_bad_options_are_explained(tmp_path: Path, inputs, kwargs, message) -> None:
    with pytest.raises(MergeInputError, match=message):
        merge_models(inputs["base_path"], inputs["model_paths"], out=tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_outputs_must_be_one_and_not_an_input(tmp_path: Path, inputs) -> None:
    base, models = inputs["base_path"], inputs["model_paths"]
    with pytest.raises(MergeInputError, match=r"either an output folder"):
        merge_models(base, models, method="fedavg", out=tmp_path / "o", partial_out=tmp_path / "p.safetensors")
    with pytest.raises(MergeInputError, match=r"give an output folder"):
        merge_models(base, models, method="fedavg")
    with pytest.raises(MergeInputError, match=r"at least one model"):
        merge_models(base, [], method="fedavg", out=tmp_path / "o")
    with pytest.raises(MergeInputError, match=r"would overwrite the input"):
        merge_models(base, models, method="fedavg", out=inputs["root"], force=True)
    with pytest.raises(MergeInputError, match=r"would overwrite the input"):
        merge_models(base, models, method="fedavg", partial_out=models[0], force=True)


# ---------------------------------------------------------------- tiers: partial statistics


def test_partials_of_groups_combine_to_the_flat_merge(tmp_path: Path, inputs) -> None:
    base, (m1, m2, m3) = inputs["base_path"], inputs["model_paths"]
    common = {"method": "ties", "density": 0.3, "lam": 1.2}
    flat = run_merge(inputs, tmp_path / "flat", **common, weights=[1.0, 2.0, 0.5])
    merge_models(base, [m1, m2], weights=[1.0, 2.0], partial_out=tmp_path / "p12.safetensors", **common)
    merge_models(base, [m3], weights=[0.5], partial_out=tmp_path / "p3.safetensors", **common)
    partials = [tmp_path / "p12.safetensors", tmp_path / "p3.safetensors"]
    result = combine_partials(partials, base=base, out=tmp_path / "tiered")
    assert result.num_updates == 3
    tiered = load_file(tmp_path / "tiered" / "model.safetensors")
    assert set(tiered) == set(flat)
    for name in flat:
        a, b = tiered[name].double(), flat[name].double()
        assert (a - b).norm() <= 1e-6 * max(b.norm(), 1e-12), name


def test_partial_file_holds_every_statistic_and_the_scalars_in_its_header(tmp_path: Path, inputs) -> None:
    merge_models(
        inputs["base_path"],
        inputs["model_paths"][:2],
        method="ties",
        density=0.5,
        weights=[1.0, 3.0],
        dtype="float64",
        partial_out=tmp_path / "p.safetensors",
    )
    floating = [n for n, t in inputs["base"].items() if t.is_floating_point()]
    with open_partial(tmp_path / "p.safetensors") as f:
        metadata, identity = f.metadata, f.identity
        keys = set(f.parsed.entries)
        assert keys == {f"{n}::{s}" for n in floating for s in ("P", "Wp", "N", "Wn")}
        assert f.parsed.value_dtype == "float64"
    assert metadata["total_weight"] == "4.0" and metadata["num_updates"] == "2"
    assert identity["strategy"] == "ties"
    assert {k: v for k, v in identity.items() if k != "strategy"} == {"lam": 1.0, "dtype": "float64", "vote": "mass"}


def test_dare_groups_with_a_model_index_offset_combine_exactly(tmp_path: Path, inputs) -> None:
    base, (m1, m2, m3) = inputs["base_path"], inputs["model_paths"]
    common = {"method": "dare_ties", "density": 0.5, "seed": 5}
    flat = run_merge(inputs, tmp_path / "flat", **common)
    merge_models(base, [m1], partial_out=tmp_path / "p1.safetensors", **common)
    merge_models(base, [m2, m3], partial_out=tmp_path / "p23.safetensors", first_model_index=1, **common)
    combine_partials(
        [tmp_path / "p23.safetensors", tmp_path / "p1.safetensors"],
        base=base,
        partial_out=tmp_path / "region.safetensors",
    )
    combine_partials([tmp_path / "region.safetensors"], base=base, out=tmp_path / "tiered")
    tiered = load_file(tmp_path / "tiered" / "model.safetensors")
    for name in flat:
        torch.testing.assert_close(tiered[name], flat[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "second, message",
    [
        ({"method": "ties", "density": 0.3, "lam": 0.5}, r"different strategy parameters: .*lam: 1.0 vs 0.5"),
        (
            {"method": "ties", "density": 0.3, "vote": "count"},
            r"different strategy parameters: .*vote: 'mass' vs 'count'",
        ),
        ({"method": "fedavg"}, r"different strategy parameters: .*strategy: 'ties' vs 'fedavg'"),
        ({"method": "ties", "density": 0.3, "dtype": "float64"}, r"dtype: 'float32' vs 'float64'"),
    ],
)
def test_partials_with_different_parameters_are_refused(tmp_path: Path, inputs, second, message) -> None:
    base, models = inputs["base_path"], inputs["model_paths"]
    merge_models(base, models[:1], method="ties", density=0.3, partial_out=tmp_path / "a.safetensors")
    merge_models(base, models[1:], partial_out=tmp_path / "b.safetensors", **second)
    with pytest.raises(MergeInputError, match=message):
        combine_partials([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], base=base, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_partials_from_another_base_or_not_partials_at_all_are_refused(tmp_path: Path, inputs) -> None:
    base, models = inputs["base_path"], inputs["model_paths"]
    merge_models(base, models, method="fedavg", partial_out=tmp_path / "p.safetensors")
    other = {n: t for n, t in inputs["base"].items() if n != "norm.scale"}
    save_file(other, tmp_path / "other-base.safetensors")
    with pytest.raises(MergeInputError, match=r"p.safetensors was made from a base with other tensors"):
        combine_partials([tmp_path / "p.safetensors"], base=tmp_path / "other-base.safetensors", out=tmp_path / "out")
    with pytest.raises(MergeInputError, match=r"m0.safetensors is not a fedfuse partial-statistics file"):
        combine_partials([models[0]], base=base, out=tmp_path / "out")
    with pytest.raises(MergeInputError, match=r"at least one partial"):
        combine_partials([], base=base, out=tmp_path / "out")


def without(path: Path, out: Path, key: str) -> Path:
    """A copy of partial file ``path`` without statistic ``key`` (re-checksummed: a well-formed file)."""
    document, blobs = unpack(path.read_bytes(), None)
    document["tensors"].pop(key)
    blobs = {k: v for k, v in blobs.items() if k.partition(":")[2] != key}
    out.write_bytes(pack(document, blobs))
    return out


def test_a_partial_missing_a_statistic_is_named(tmp_path: Path, inputs) -> None:
    base = inputs["base_path"]
    merge_models(base, inputs["model_paths"], method="fedavg", partial_out=tmp_path / "p.safetensors")
    broken = without(tmp_path / "p.safetensors", tmp_path / "broken.safetensors", "layer.0.bias::S")
    with pytest.raises(MergeInputError, match=r"partial 1 .*broken.safetensors lacks tensor 'layer.0.bias::S'"):
        combine_partials([broken, tmp_path / "p.safetensors"], base=base, out=tmp_path / "out")
    merge_models(base, inputs["model_paths"], method="ties", density=0.5, partial_out=tmp_path / "t.safetensors")
    half = without(tmp_path / "t.safetensors", tmp_path / "half.safetensors", "layer.0.bias::Wn")
    with pytest.raises(MergeInputError, match=r"half.safetensors: parameter 'layer.0.bias' lacks statistics \['Wn'\]"):
        combine_partials([half], base=base, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
