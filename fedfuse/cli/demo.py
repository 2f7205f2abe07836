"""``fedfuse demo``: merge a generated three-institution example with several methods and compare them.

The offline counterpart of ``fedfuse simulate``: nothing trains and nothing is sent. It builds a tiny BERT base
model from a config (no download), derives three "institution" checkpoints whose task vectors share a
common change, each add a sparse specialty of their own and some noise with conflicting signs, merges
them through the same engine as ``fedfuse merge``, and prints how much of the shared change and of each
specialty every method keeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

from fedfuse.offline import merge_models

NUM_INSTITUTIONS = 3
DEMO_METHODS: tuple[tuple[str, float | None], ...] = (
    ("fedavg", None),
    ("task_arithmetic", None),
    ("ties", 0.2),
    ("dare_ties", 0.5),
)


def _write_base(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    from transformers import BertConfig, BertModel, BertTokenizerFast  # type: ignore[attr-defined]  # lazy alias
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    model = BertModel(config)
    model.save_pretrained(folder)
    vocab = folder / "vocab.txt"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"tok{i}" for i in range(config.vocab_size - 5)]
    vocab.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    return load_file(folder / "model.safetensors")


def _institution_parts(base: dict[str, torch.Tensor], seed: int):
    """Shared change s, each institution's sparse specialty u_k (disjoint supports) and noise n_k."""
    generator = torch.Generator().manual_seed(seed)
    shared: dict[str, torch.Tensor] = {}
    own: list[dict[str, torch.Tensor]] = [{} for _ in range(NUM_INSTITUTIONS)]
    noise: list[dict[str, torch.Tensor]] = [{} for _ in range(NUM_INSTITUTIONS)]
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            continue
        shared[name] = 0.01 * torch.randn(tensor.shape, generator=generator)
        owner = torch.randint(0, 20, tensor.shape, generator=generator)
        for k in range(NUM_INSTITUTIONS):
            own[k][name] = torch.where(owner == k, 0.05 * torch.randn(tensor.shape, generator=generator), 0.0)
            noise[k][name] = 0.004 * torch.randn(tensor.shape, generator=generator)
    return shared, own, noise


def _dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[name].double() * b[name].double()).sum() for name in a))


def _kept(merged: dict[str, torch.Tensor], part: dict[str, torch.Tensor]) -> float:
    """Projection of the merged task vector on ``part``, as a fraction of ``part`` (1.0 = all of it)."""
    return _dot(merged, part) / _dot(part, part)


def _loads_with_transformers(folder: Path) -> bool:
    from transformers import AutoModel, AutoTokenizer

    AutoTokenizer.from_pretrained(folder)
    return AutoModel.from_pretrained(folder) is not None


def demo(
    out: Annotated[Path, typer.Option(help="Folder for the generated models and the merges.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Seed of the generated example and of DARE.")] = 0,
) -> None:
    """Merge a generated three-institution example with fedavg, task arithmetic, TIES and DARE-TIES."""
    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    base_dir = out / "base"
    base = _write_base(base_dir, seed)
    shared, own, noise = _institution_parts(base, seed)
    model_dirs = []
    for k in range(NUM_INSTITUTIONS):
        tuned = {
            name: (tensor + shared[name] + own[k][name] + noise[k][name]) if name in shared else tensor
            for name, tensor in base.items()
        }
        folder = out / f"institution-{k}"
        folder.mkdir(exist_ok=True)
        save_file(tuned, str(folder / "model.safetensors"), metadata={"format": "pt"})
        model_dirs.append(folder)
    console.print(f"Generated a tiny BERT base and {NUM_INSTITUTIONS} institution checkpoints in [bold]{out}[/]")

    target = {name: shared[name] + sum(own[k][name] for k in range(NUM_INSTITUTIONS)) for name in shared}
    table = Table(title="What each merge keeps (1.00 = all of it)")
    for column in ("method", "density", "shared", "own (mean)", "error vs ideal", "loads"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for method, density in DEMO_METHODS:
        merged_dir = out / f"merged-{method}"
        merge_models(
            base_dir,
            model_dirs,
            method=method,
            density=density,
            seed=seed,
            out=merged_dir,
            force=True,
        )
        merged = load_file(merged_dir / "model.safetensors")
        tau = {name: merged[name].float() - base[name].float() for name in shared}
        error = _dot({n: tau[n] - target[n] for n in tau}, {n: tau[n] - target[n] for n in tau}) ** 0.5
        table.add_row(
            method,
            "-" if density is None else f"{density:g}",
            f"{_kept(tau, shared):.2f}",
            f"{sum(_kept(tau, own[k]) for k in range(NUM_INSTITUTIONS)) / NUM_INSTITUTIONS:.2f}",
            f"{error / _dot(target, target) ** 0.5:.2f}",
            "yes" if _loads_with_transformers(merged_dir) else "NO",
        )
    console.print(table)
    console.print(f"Merged models: {out}/merged-<method>/ (config, tokenizer and model.safetensors).")
    console.print(
        "The ideal multi-task merge keeps the shared change once and every specialty whole. FedAvg dilutes "
        "specialties by 1/K, task arithmetic counts the shared change K times, TIES keeps both by voting signs "
        "and averaging only agreeing entries; DARE-TIES does the same from a random half of each update."
    )
