"""Checkpoint I/O: the streaming safetensors writer, sharding, the tensor-by-tensor reader, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedfuse.checkpoints import (
    INDEX_FILE,
    CheckpointReadError,
    CheckpointWriteError,
    SafetensorsStreamWriter,
    ShardedWriter,
    TensorSpec,
    atomic_output,
    build_header,
    is_weight_file,
    open_checkpoint,
    parse_size,
    plan_shards,
)

pytestmark = pytest.mark.unit

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def make_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (works for fp8/bool/0-d/empty, where torch.equal may not)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))
    )


def write_stream(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with SafetensorsStreamWriter(path, specs, metadata) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)


# ---------------------------------------------------------------- the streaming writer


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (), (0,), (2, 0, 4), (7,)], ids=str)
def test_writer_output_loads_with_safetensors_bit_exact(tmp_path: Path, dtype: torch.dtype, shape: tuple) -> None:
    tensors = {"t": make_tensor(shape, dtype), "after": make_tensor((4,), torch.float32, seed=1)}
    path = tmp_path / "x.safetensors"
    write_stream(path, tensors, {"format": "pt"})
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert same(loaded[name], tensor), name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert list(f.get_slice("t").get_shape()) == list(shape)
        assert same(f.get_tensor("t"), tensors["t"])


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3).map(tuple)),
        min_size=1,
        max_size=6,
    ),
    st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=12), max_size=3),
)
def test_writer_round_trips_any_mix_of_dtypes_shapes_and_metadata(tmp_path_factory, items, metadata) -> None:
    tensors = {f"layer{i}.weight": make_tensor(shape, dtype, seed=i) for i, (dtype, shape) in enumerate(items)}
    path = tmp_path_factory.mktemp("prop") / "x.safetensors"
    write_stream(path, tensors, metadata)
    loaded = load_file(path)
    assert all(same(loaded[name], tensor) for name, tensor in tensors.items())
    with safe_open(str(path), framework="pt") as f:
        assert (f.metadata() or {}) == metadata


def test_header_is_length_prefixed_json_padded_with_spaces_to_8_bytes() -> None:
    header = build_header([TensorSpec("a", (3,), torch.float32), TensorSpec("b", (2, 2), torch.bfloat16)], {"k": "v"})
    length = int.from_bytes(header[:8], "little")
    assert length == len(header) - 8 and length % 8 == 0
    text = header[8:].decode("utf-8")
    json_part = text.rstrip(" ")
    assert json_part.endswith("}") and len(text) - len(json_part) < 8
    parsed = json.loads(text)
    assert parsed["__metadata__"] == {"k": "v"}
    assert parsed["a"] == {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}
    assert parsed["b"] == {"dtype": "BF16", "shape": [2, 2], "data_offsets": [12, 20]}


def test_writer_rejects_out_of_order_wrong_shape_wrong_dtype_and_unwritten_tensors(tmp_path: Path) -> None:
    specs = [TensorSpec("a", (2,), torch.float32), TensorSpec("b", (3,), torch.float16)]
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", specs)
    with pytest.raises(CheckpointWriteError, match=r"expected tensor 'a' next, got 'b'"):
        writer.write("b", torch.zeros(3, dtype=torch.float16))
    with pytest.raises(CheckpointWriteError, match=r"tensor 'a': planned shape \(2,\), got \(3,\)"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(CheckpointWriteError, match=r"tensor 'a': planned dtype torch.float32, got torch.float64"):
        writer.write("a", torch.zeros(2, dtype=torch.float64))
    writer.write("a", torch.zeros(2))
    with pytest.raises(CheckpointWriteError, match=r"never written, first 'b'"):
        writer.close()


def test_metadata_must_be_strings() -> None:
    with pytest.raises(CheckpointWriteError, match=r"strings to strings"):
        build_header([], {"n": 3})  # type: ignore[dict-item]


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(CheckpointWriteError, match=r"'a' is listed twice"):
        build_header([TensorSpec("a", (1,), torch.float32), TensorSpec("a", (1,), torch.float32)])


# ---------------------------------------------------------------- sizes and shards


@pytest.mark.parametrize(
    "text, size",
    [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1.5kb", 1500), ("1234", 1234), (77, 77)],
)
def test_parse_size_reads_transformers_style_sizes(text, size) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["5XB", "-1", "0", "GB", "", "1e9"])
def test_parse_size_rejects_nonsense(text) -> None:
    with pytest.raises(CheckpointWriteError, match=r"size"):
        parse_size(text)


def test_plan_shards_fills_up_to_the_limit_and_isolates_oversized_tensors() -> None:
    specs = [TensorSpec(f"t{i}", (n,), torch.float32) for i, n in enumerate([10, 10, 30, 5, 5, 5])]
    shards = plan_shards(specs, 80)  # bytes: 40, 40, 120, 20, 20, 20
    assert [[s.name for s in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    assert [s for shard in shards for s in shard] == specs


def test_sharded_writer_writes_hf_shards_and_index(tmp_path: Path) -> None:
    tensors = {f"layer{i}.weight": make_tensor((16, 8), torch.float32, seed=i) for i in range(5)}
    tensors["mask"] = make_tensor((3,), torch.bool)
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    writer = ShardedWriter(tmp_path, specs, metadata={"format": "pt"}, max_shard_size=1100)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    files = writer.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + [INDEX_FILE]
    assert sorted(p.name for p in files) == names
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    for name, shard in index["weight_map"].items():
        assert same(load_file(tmp_path / shard)[name], tensors[name])
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.names == sorted(tensors)
        assert all(same(ckpt.get(name), t) for name, t in tensors.items())
        assert ckpt.metadata() == {"format": "pt"}


def test_sharded_writer_below_the_limit_writes_one_model_safetensors(tmp_path: Path) -> None:
    tensors = {"a": make_tensor((4,), torch.float32)}
    writer = ShardedWriter(tmp_path, [TensorSpec("a", (4,), torch.float32)])
    writer.write("a", tensors["a"])
    assert [p.name for p in writer.close()] == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_sharded_writer_refuses_an_unplanned_tensor(tmp_path: Path) -> None:
    writer = ShardedWriter(tmp_path, [TensorSpec("a", (4,), torch.float32)])
    with pytest.raises(CheckpointWriteError, match=r"'zzz' was not planned"):
        writer.write("zzz", torch.zeros(4))


# ---------------------------------------------------------------- the reader


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    return {
        "emb.weight": make_tensor((10, 4), torch.bfloat16),
        "fc.weight": make_tensor((4, 4), torch.float32, seed=1),
        "fc.bias": make_tensor((4,), torch.float16, seed=2),
        "position_ids": torch.arange(6),
        "scale": torch.tensor(0.5),
    }


def check_reads(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with open_checkpoint(path) as ckpt:
        assert ckpt.names == sorted(tensors)
        assert len(ckpt) == len(tensors) and "fc.bias" in ckpt and "nope" not in ckpt
        for name, tensor in tensors.items():
            info = ckpt.info(name)
            assert info.shape == tuple(tensor.shape) and info.dtype == tensor.dtype
            assert info.nbytes == tensor.numel() * tensor.element_size()
            assert same(ckpt.get(name), tensor)
        assert ckpt.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_reader_opens_a_single_file(tmp_path: Path, tensors) -> None:
    save_file(tensors, tmp_path / "weights.safetensors")
    check_reads(tmp_path / "weights.safetensors", tensors)


def test_reader_opens_an_hf_folder(tmp_path: Path, tensors) -> None:
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text("{}")
    check_reads(tmp_path, tensors)


def test_reader_opens_a_sharded_folder(tmp_path: Path, tensors) -> None:
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, tmp_path / shard)
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (tmp_path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    check_reads(tmp_path, tensors)
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.file_of(names[3]).name == "model-00002-of-00002.safetensors"


def test_reader_reports_a_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointReadError, match=r"not found: .*nothing-here"):
        open_checkpoint(tmp_path / "nothing-here")


def test_reader_refuses_pickled_weights(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointReadError, match=r"pytorch_model.bin.*never unpickles"):
        open_checkpoint(tmp_path)
    with pytest.raises(CheckpointReadError, match=r"not a .safetensors file"):
        open_checkpoint(tmp_path / "pytorch_model.bin")


def test_reader_reports_a_folder_without_weights_and_a_corrupt_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointReadError, match=r"no model.safetensors or model.safetensors.index.json"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointReadError, match=r"model.safetensors is not a readable safetensors file"):
        open_checkpoint(tmp_path)


def test_reader_reports_broken_indexes(tmp_path: Path, tensors) -> None:
    save_file({"a": tensors["fc.bias"]}, tmp_path / "model-00001-of-00002.safetensors")
    index = tmp_path / INDEX_FILE
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    index.write_text(json.dumps({"weight_map": {"a": first, "b": second}}))
    with pytest.raises(CheckpointReadError, match=r"names shard model-00002-of-00002.safetensors, which is missing"):
        open_checkpoint(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": first, "b": first}}))
    with pytest.raises(
        CheckpointReadError, match=r"puts tensor 'b' in model-00001-of-00002.safetensors, which lacks it"
    ):
        open_checkpoint(tmp_path)
    index.write_text("{not json")
    with pytest.raises(CheckpointReadError, match=r"not a valid safetensors index"):
        open_checkpoint(tmp_path)


def test_reader_names_an_unknown_tensor(tmp_path: Path, tensors) -> None:
    save_file(tensors, tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path) as ckpt, pytest.raises(CheckpointReadError, match=r"has no tensor 'missing.weight'"):
        ckpt.info("missing.weight")


def test_weight_files_are_told_apart_from_config_files() -> None:
    for name in ["model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "optimizer.pt"]:
        assert is_weight_file(Path(name)), name
    for name in ["config.json", "tokenizer.json", "vocab.txt", "generation_config.json", "special_tokens_map.json"]:
        assert not is_weight_file(Path(name)), name


# ---------------------------------------------------------------- atomic output


def test_atomic_output_leaves_nothing_when_the_write_fails_midway(tmp_path: Path) -> None:
    out = tmp_path / "out"
    specs = [TensorSpec("a", (4,), torch.float32), TensorSpec("b", (4,), torch.float32)]
    with pytest.raises(RuntimeError, match=r"crash"), atomic_output(out, directory=True) as folder:
        writer = ShardedWriter(folder, specs)
        writer.write("a", torch.zeros(4))
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_moves_the_finished_folder_into_place(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "out"
    with atomic_output(out, directory=True) as folder:
        assert folder.parent == out.parent and folder != out
        (folder / "model.safetensors").write_bytes(b"x")
        assert not out.exists()
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_atomic_output_refuses_a_non_empty_folder_unless_overwriting(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(CheckpointWriteError, match=r"is not empty"), atomic_output(out, directory=True):
        pass
    with pytest.raises(RuntimeError), atomic_output(out, directory=True, overwrite=True) as folder:
        (folder / "new.txt").write_text("new")
        raise RuntimeError("crash")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with atomic_output(out, directory=True, overwrite=True) as folder:
        (folder / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_output_accepts_an_empty_existing_folder(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with atomic_output(tmp_path / "out", directory=True) as folder:
        (folder / "f").write_text("x")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["f"]


def test_atomic_output_for_a_file(tmp_path: Path) -> None:
    target = tmp_path / "partial.safetensors"
    with pytest.raises(RuntimeError), atomic_output(target, directory=False) as path:
        write_stream(path, {"a": torch.ones(2)})
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(target, directory=False) as path:
        write_stream(path, {"a": torch.ones(2)})
    assert same(load_file(target)["a"], torch.ones(2))
    with pytest.raises(CheckpointWriteError, match=r"exists .*--force"), atomic_output(target, directory=False):
        pass
    with pytest.raises(CheckpointWriteError, match=r"is a folder"), atomic_output(tmp_path, directory=False):
        pass
