"""``fedfuse bench llm-round``: federated LoRA at LLM scale, per round, dense against factor and SVD broadcasts.

Issue 29. For each model (``--models``: ``smollm2``, the embedded SmolLM2-135M-Instruct; ``llama350m``, a
~340M-parameter Llama with random weights and SmolLM2's tokenizer built once into ``<out>/llama350m``;
``llama-tiny``, a few-M-parameter one for the quick preset) it runs every variant in a fresh process
(:func:`fedfuse.bench.measure.run_isolated`), all with the same federated SFT (``task = "sft"`` on
``examples/data/instructions.jsonl`` split iid, LoRA r = 8 on q, k, v, o, FedAvg with
``lora-aggregation = "exact"``, no evaluation):

- ``dense``: the round's merged weights broadcast dense (``broadcast = "dense"``; today's path);
- ``factors``: the factor broadcast (``broadcast = "factors"``);
- ``svd-R``: a rank-R SVD broadcast with server error feedback (``broadcast = "svd"``, ``broadcast-rank = R``)
  for each R in ``--svd-ranks`` (default 8 and 32);
- ``flowertune``: a FlowerTune-style app, Flower's own FedAvg over the adapter's A and B
  (:mod:`fedfuse.bench.llm_round_flowertune`).

Per round: bytes down and up per node (fedfuse: report.json's ``broadcast.bytes_per_node``, else
``downlink_bytes`` / clients, and ``uplink_bytes`` / accepted; the baseline: its ArrayRecords' sizes), the
server process's peak RSS so far above its RSS just before the run (``VmHWM`` reset then, sampled every 50 ms;
the ServerApp, the SuperLink state and the simulation engine share that process, clients run in Ray workers),
server seconds per accepted update (the ``decode_fold`` phase / accepted; the baseline: ``aggregate_train``
/ replies), the federated train loss, and the largest relative difference of the adapted matrices
(``….q_proj.weight`` …, as absolute weights) from the dense path's after the same round: max over tensors of
max |x − y| / max |y|, y the dense path's. Where report.json records ``server_memory`` (the ServerApp's own
start and peak RSS) the memory check uses ``rss_peak_bytes − rss_start_bytes`` instead of the sampled figure.

Targets, printed as PASS/FAIL (a target whose variants did not run is left out):

- factors: max relative difference from dense after the last round ≤ 1e-5;
- factors: downlink per node ≤ K × uplink per node, and on SmolLM2 ≤ 1/5 of dense's (last round);
- memory, the factor and SVD broadcasts: peak RSS above start ≤ merge state + accumulated ΔW + 2 × one
  round's broadcast + 400 MB, where accumulated ΔW = 4 bytes × the entries of the adapted matrices (no head
  on a causal LM), merge state = for factors the K updates' factors folded as one rank-K·r pair, 4 bytes ×
  K × Σ r·(in + out), for svd the dense change it truncates plus the residual it keeps (2 × the dense ΔW
  bytes); one round's broadcast = the largest per-node downlink of the run. The dense broadcast (today's) is
  shown against the same bound (merge state = the dense ΔW) but is not a target: Flower's in-memory
  SuperLink holds each node's message, so K dense broadcasts sit in the server process at once;
- llama350m: FedAvg fold time per update ≥ 10× shorter with factors than forming ΔW
  (:mod:`fedfuse.bench.llm_round_fold`: K seeded updates of the model's LoRA layout through two round
  engines, decode timed apart; the simulation's ``decode_fold`` per update is in the table too);
- SVD with error feedback: final train loss ≤ 1.02 × dense's at a downlink per node ≤ the uplink per node,
  for at least one rank.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fedfuse.bench.llm_round_fold import fold_timing
from fedfuse.bench.measure import markdown_table, print_table, run_isolated

SMOLLM2 = "smollm2"
LLAMA_350M = "llama350m"
LLAMA_TINY = "llama-tiny"
VARIANT_KINDS = ("dense", "factors", "svd", "flowertune")
"""What ``--variants`` may name; ``svd`` runs once per rank of ``--svd-ranks``."""
TARGET_MODULES = "q_proj,k_proj,v_proj,o_proj"
LORA_RANK = 8
EXACT_TARGET = 1e-5
DOWNLINK_SHARE_TARGET = 1 / 5
MEMORY_SLACK_BYTES = 400 * 10**6
FOLD_SPEEDUP_TARGET = 10.0
SVD_LOSS_TARGET = 1.02
MB = 1e6
COLUMNS = (
    "model",
    "variant",
    "round",
    "down/node",
    "up/node",
    "down/up",
    "RSS↑ MB",
    "fold ms/upd",
    "train loss",
    "max rel diff",
)
LEGEND = (
    "bytes each way per node; the server process's peak RSS so far above its RSS before the run (sampled; the "
    "memory check uses report.json's server_memory where there is one); server decode+fold milliseconds per "
    "accepted update; the federated train loss; the adapted matrices' largest relative difference from the "
    "dense path after the same round."
)


@dataclass(frozen=True)
class LlamaShape:
    """The size of a randomly initialised Llama (tied embeddings, SmolLM2's tokenizer)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


LLAMAS = {
    LLAMA_350M: LlamaShape(hidden=1024, layers=24, heads=16, kv_heads=4, intermediate=3072),
    LLAMA_TINY: LlamaShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128),
}
"""``llama350m``: 339.8M parameters with SmolLM2's 49,152-token vocabulary; ``llama-tiny``: 3.2M."""


@dataclass(frozen=True)
class Preset:
    """Defaults of one ``--preset``."""

    models: tuple[str, ...]
    rounds: int
    clients: int
    local_steps: int


PRESETS = {
    "quick": Preset((LLAMA_TINY,), rounds=2, clients=2, local_steps=1),
    "full": Preset((SMOLLM2, LLAMA_350M), rounds=3, clients=4, local_steps=2),
}


def build_llama(folder: Path, shape: LlamaShape) -> Path:
    """A seeded random Llama of ``shape`` with SmolLM2's tokenizer and chat template, saved once to ``folder``."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedfuse.models import load_tokenizer

    tokenizer = load_tokenizer(SMOLLM2)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def parameter_count(model: str) -> int:
    """Parameters stored in a model's safetensors files (tied weights once)."""
    from safetensors import safe_open

    from fedfuse.models import resolve_model_source

    total = 0
    for path in sorted(Path(resolve_model_source(model)).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118  # safe_open is no mapping
                count = 1
                for size in handle.get_slice(name).get_shape():
                    count *= size
                total += count
    return total


def prepare_model(name: str, out: Path) -> str:
    """The run-config ``model`` of a bench model name (building a Llama into ``<out>/<name>`` once)."""
    if name == SMOLLM2:
        return SMOLLM2
    if name in LLAMAS:
        return str(build_llama(out / name, LLAMAS[name]))
    raise typer.BadParameter(f"--models: {name!r} is none of {SMOLLM2}, {', '.join(LLAMAS)}")


def broadcast_known() -> bool:
    """Whether this fedfuse has the ``broadcast`` run-config key (the factor and SVD broadcasts)."""
    from fedfuse.settings import RunSettings, SettingsError

    try:
        RunSettings.from_run_config({}, broadcast="factors")
    except SettingsError:
        return False
    return True


def default_data() -> Path:
    """The shipped chat examples (``examples/data/instructions.jsonl`` of the source tree)."""
    return Path(__file__).resolve().parents[2] / "examples" / "data" / "instructions.jsonl"


def common_config(
    model: str, data: Path, *, rounds: int, clients: int, local_steps: int, batch_size: int, max_length: int
) -> dict[str, Any]:
    """The run config every variant shares (output-dir aside)."""
    return {
        "model": model,
        "task": "sft",
        "data": str(data),
        "partition": "iid",
        "mode": "lora",
        "lora-rank": LORA_RANK,
        "lora-target-modules": TARGET_MODULES,
        "strategy": "fedavg",
        "lora-aggregation": "exact",
        "num-server-rounds": rounds,
        "fraction-train": 1.0,
        "min-train-nodes": clients,
        "fraction-evaluate": 0.0,
        "client-eval-examples": 0,
        "local-steps": local_steps,
        "batch-size": batch_size,
        "max-length": max_length,
        "keep-checkpoints": 0,
        "seed": 0,
    }


def variant_names(kinds: Sequence[str], svd_ranks: Sequence[int]) -> list[str]:
    """Variants in run order (dense first: the others compare with it), ``svd`` expanded per rank."""
    unknown = sorted(set(kinds) - set(VARIANT_KINDS))
    if unknown:
        raise typer.BadParameter(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANT_KINDS)})")
    names: list[str] = []
    for kind in VARIANT_KINDS:
        if kind in kinds:
            names += [f"svd-{r}" for r in svd_ranks] if kind == "svd" else [kind]
    return names


def variant_overrides(variant: str, known: bool) -> dict[str, Any]:
    """The run-config keys that make ``variant`` (nothing for dense where ``broadcast`` is not known yet)."""
    if variant == "flowertune" or (variant == "dense" and not known):
        return {}
    if variant.startswith("svd-"):
        return {"broadcast": "svd", "broadcast-rank": int(variant.removeprefix("svd-"))}
    return {"broadcast": variant}


def measured_function(variant: str) -> Callable[..., Any]:
    """The child-side function of a variant: fedfuse's simulation or the FlowerTune baseline."""
    if variant == "flowertune":
        from fedfuse.bench.llm_round_flowertune import measure_flowertune

        return measure_flowertune
    from fedfuse.bench.llm_round_measure import measure_fedfuse

    return measure_fedfuse


def run_variant(
    model: str,
    variant: str,
    overrides: Mapping[str, Any],
    *,
    clients: int,
    reference: Path,
    timeout: float,
) -> dict[str, Any]:
    """One variant in a fresh process (``overrides``: its whole run config); its figures and its rounds' rows."""
    config = {"overrides": dict(overrides), "clients": clients, "reference_dir": str(reference)}
    result = run_isolated(measured_function(variant), config, label=f"{model} {variant}", timeout_s=timeout)
    run = dict(result.extra)
    for row in run["rounds"]:
        row.update(model=model, variant=variant)
        row["fold_per_update"] = row["fold_seconds"] / row["accepted"] if row.get("accepted") else float("nan")
    last_sampled = run["rounds"][-1]["rss_above_start"] if run["rounds"] else 0
    run.update(model=model, variant=variant, clients=clients, peak_method=result.peak_method)
    run["rss_source"] = "report server_memory" if run.get("server_rss_above_start") is not None else "sampled"
    if run.get("server_rss_above_start") is None:
        run["server_rss_above_start"] = last_sampled
    return run


def _size(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value / MB:,.2f} MB" if value >= MB else f"{value / 1e3:,.1f} kB"


def _number(value: float | None, form: str) -> str:
    return "—" if value is None or value != value else format(value, form)


def cells(row: Mapping[str, Any]) -> list[str]:
    """One table row: a variant's round."""
    up = row.get("up_per_node") or 0
    return [
        row["model"],
        row["variant"],
        str(row["round"]),
        _size(row.get("down_per_node")),
        _size(row.get("up_per_node")),
        _number(row["down_per_node"] / up if up else None, ".2f"),
        _number(row["rss_above_start"] / MB, ",.0f"),
        _number(1000 * row["fold_per_update"], ".2f"),
        _number(row.get("train_loss"), ".4f"),
        _number(row.get("max_rel_diff"), ".2e"),
    ]


def merge_state_bytes(run: Mapping[str, Any]) -> int:
    """The fedavg merge state the memory bound allows (see the module docstring)."""
    if run["variant"] == "factors":
        return 4 * run["clients"] * run["factor_entries"]
    if run["variant"].startswith("svd-"):
        return 2 * 4 * run["adapted_entries"]  # the dense change it truncates and the residual it keeps
    return 4 * run["adapted_entries"]


def memory_bound(run: Mapping[str, Any]) -> int:
    """merge state + accumulated ΔW + 2 × one round's broadcast + 400 MB."""
    broadcast = max(r["down_per_node"] for r in run["rounds"])
    return merge_state_bytes(run) + 4 * run["adapted_entries"] + 2 * broadcast + MEMORY_SLACK_BYTES


def _last(run: Mapping[str, Any], key: str) -> Any:
    return run["rounds"][-1].get(key)


def _fold_per_update(run: Mapping[str, Any]) -> float:
    """Fold seconds per accepted update over rounds 2.. (round 1 warms up), or round 1 alone."""
    rounds = run["rounds"][1:] or run["rounds"]
    return sum(r["fold_seconds"] for r in rounds) / max(1, sum(r["accepted"] for r in rounds))


def factor_checks(model: str, runs: Mapping[str, Mapping[str, Any]]) -> list[tuple[bool, str]]:
    """Exactness and downlink of the factor broadcast against dense."""
    if "factors" not in runs:
        return []
    factors, checks = runs["factors"], []
    down, up, k = _last(factors, "down_per_node"), _last(factors, "up_per_node"), factors["clients"]
    checks.append((down <= k * up, f"{model} factors: downlink/node {_size(down)} ≤ K × uplink/node {_size(k * up)}"))
    if "dense" not in runs:
        return checks
    diff = _last(factors, "max_rel_diff")
    ok = diff is not None and diff <= EXACT_TARGET
    checks.append((ok, f"{model} factors: max relative difference from dense {_number(diff, '.2e')} ≤ {EXACT_TARGET}"))
    if model == SMOLLM2:
        dense_down = _last(runs["dense"], "down_per_node")
        checks.append(
            (
                down <= DOWNLINK_SHARE_TARGET * dense_down,
                f"{model} factors: downlink/node {_size(down)} ≤ 1/5 of dense's {_size(dense_down)}",
            )
        )
    return checks


def memory_checks(model: str, runs: Mapping[str, Mapping[str, Any]]) -> list[tuple[bool | None, str]]:
    """Every fedfuse variant's server peak RSS above start against its bound."""
    checks = []
    for variant, run in runs.items():
        if variant == "flowertune":
            continue
        peak, bound = run["server_rss_above_start"], memory_bound(run)
        informational = " (today's dense broadcast: shown, not a target)" if variant == "dense" else ""
        checks.append(
            (
                None if variant == "dense" else peak <= bound,
                f"{model} {variant}{informational}: server peak RSS above start {peak / MB:,.0f} MB "
                f"{'vs' if variant == 'dense' else '≤'} {bound / MB:,.0f} MB "
                f"(merge state {merge_state_bytes(run) / MB:,.1f} + ΔW {4 * run['adapted_entries'] / MB:,.1f} "
                f"+ 2 × broadcast + 400; {run['rss_source']})",
            )
        )
    return checks


def fold_checks(model: str, folds: Mapping[str, Mapping[str, float]]) -> list[tuple[bool, str]]:
    """On the 350M Llama: factors fold an update ≥ 10× faster than forming its ΔW."""
    if model != LLAMA_350M or model not in folds:
        return []
    fold = folds[model]
    text = (
        f"{model}: fold per update {1000 * fold['fold_factors_s']:.1f} ms (factors) vs "
        f"{1000 * fold['fold_dense_s']:.1f} ms (ΔW formed): {fold['fold_speedup']:.1f}× (target ≥ "
        f"{FOLD_SPEEDUP_TARGET:.0f}×); with decoding, {1000 * fold['server_factors_s']:.1f} vs "
        f"{1000 * fold['server_dense_s']:.1f} ms per update"
    )
    return [(fold["fold_speedup"] >= FOLD_SPEEDUP_TARGET, text)]


def svd_checks(model: str, runs: Mapping[str, Mapping[str, Any]]) -> list[tuple[bool, str]]:
    """Some SVD rank reaches dense's final train loss within 2 % at a downlink ≤ the uplink."""
    svd = {v: r for v, r in runs.items() if v.startswith("svd-")}
    if not svd or "dense" not in runs or _last(runs["dense"], "train_loss") is None:
        return []
    dense_loss = _last(runs["dense"], "train_loss")
    parts, any_ok = [], False
    for variant, run in svd.items():
        loss = _last(run, "train_loss")
        down = max(r["down_per_node"] for r in run["rounds"])
        up = _last(run, "up_per_node")
        ok = loss is not None and loss <= SVD_LOSS_TARGET * dense_loss and down <= up
        any_ok |= ok
        ratio = _number(loss / dense_loss if loss is not None else None, ".3f")
        parts.append(f"{variant} loss {ratio}× dense, down {_size(down)} vs up {_size(up)} {'ok' if ok else 'no'}")
    return [(any_ok, f"{model} svd: loss ≤ {SVD_LOSS_TARGET}× dense at downlink ≤ uplink: {'; '.join(parts)}")]


def all_checks(
    runs: Sequence[Mapping[str, Any]], folds: Mapping[str, Mapping[str, float]]
) -> list[tuple[bool | None, str]]:
    """Every target that the variants run can check, model by model (None: a figure shown, not a target)."""
    checks: list[tuple[bool | None, str]] = []
    for model in dict.fromkeys([*(r["model"] for r in runs), *folds]):
        by_variant = {r["variant"]: r for r in runs if r["model"] == model}
        for check in (factor_checks, memory_checks, svd_checks):
            checks += check(model, by_variant)
        checks += fold_checks(model, folds)
    return checks


def _grid(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise typer.BadParameter(f"{what}: a comma list of whole numbers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"{what}: whole numbers ≥ 1, got {text!r}")
    return sorted(set(values))


def _names(text: str) -> list[str]:
    return [v for v in text.replace(" ", "").split(",") if v]


def write_outputs(
    out: Path,
    runs: list[dict[str, Any]],
    notes: list[str],
    settings: Mapping[str, Any],
    folds: Mapping[str, Mapping[str, float]] | None = None,
) -> None:
    """``llm_round.md`` (the table, legend and checks) and ``llm_round.json`` (every figure) in ``out``."""
    table = [cells(row) for run in runs for row in run["rounds"]]
    text = [
        "# fedfuse bench llm-round",
        "",
        f"Settings: {', '.join(f'{k}={v}' for k, v in sorted(settings.items()))}.",
        "",
        f"Columns: {LEGEND}",
        "",
        markdown_table(COLUMNS, table),
        "",
        *[f"- {note}" for note in notes],
        "",
    ]
    (out / "llm_round.md").write_text("\n".join(text))
    document = {"settings": dict(settings), "runs": runs, "notes": notes, "fold_per_update": dict(folds or {})}
    (out / "llm_round.json").write_text(json.dumps(document, indent=2, default=str))


def llm_round(
    preset: Annotated[
        str, typer.Option("--preset", help="full (SmolLM2 and a 350M Llama, 3 rounds, K = 4) or quick (tiny Llama).")
    ] = "full",
    models: Annotated[
        str | None, typer.Option("--models", help="Comma list of smollm2, llama350m, llama-tiny (default: preset's).")
    ] = None,
    variants: Annotated[
        str, typer.Option("--variants", help="Comma list of dense, factors, svd (one run per rank), flowertune.")
    ] = ",".join(VARIANT_KINDS),
    svd_ranks: Annotated[str, typer.Option("--svd-ranks", help="Comma list of SVD broadcast ranks.")] = "8,32",
    rounds: Annotated[int | None, typer.Option("--rounds", help="Server rounds (default: preset's).", min=1)] = None,
    clients: Annotated[int | None, typer.Option("--clients", help="Clients K, all trained each round.", min=1)] = None,
    local_steps: Annotated[int | None, typer.Option("--local-steps", help="Local steps per round.", min=1)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per local step.", min=1)] = 2,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per example.", min=8)] = 64,
    data: Annotated[Path | None, typer.Option("--data", help="Chat JSONL (default: examples/data).")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds one variant may take.", min=1)] = 3600.0,
    out: Annotated[Path, typer.Option("--out", help="Folder for llm_round.md/json, models and runs.")] = Path(
        "bench-results/llm-round"
    ),
    check: Annotated[bool, typer.Option("--check", help="Exit with status 1 when a target fails.")] = False,
) -> None:
    """Bytes each way, server peak RSS, fold time per update and exactness of dense, factor and SVD broadcasts."""
    console = Console() if sys.stdout.isatty() else Console(width=150)
    if preset not in PRESETS:
        raise typer.BadParameter(f"--preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    chosen = PRESETS[preset]
    model_names = _names(models) if models is not None else list(chosen.models)
    k = clients or chosen.clients
    data = data or default_data()
    if not data.is_file():
        raise typer.BadParameter(f"--data: no file {data} (give a chat JSONL with a messages column)")
    known = broadcast_known()
    names = variant_names(_names(variants), _grid(svd_ranks, "--svd-ranks"))
    skipped = [v for v in names if not known and v not in ("dense", "flowertune")]
    notes = [f"SKIP {v}: this fedfuse has no run-config key 'broadcast' yet" for v in skipped]
    out.mkdir(parents=True, exist_ok=True)
    shape = dict(rounds=rounds or chosen.rounds, clients=k, local_steps=local_steps or chosen.local_steps)
    started, runs, folds = time.perf_counter(), [], {}
    for name in model_names:
        model = prepare_model(name, out)
        notes.append(f"{name}: {parameter_count(model) / 1e6:,.1f}M parameters")
        console.print(f"{name}: {model} ({notes[-1].split(': ')[1]})")
        common = common_config(model, data, batch_size=batch_size, max_length=max_length, **shape)
        if known:
            folds[name] = fold_timing(common, k)
            console.print(f"  fold per update: {folds[name]}")
        reference = out / "runs" / name / "dense"
        for variant in [v for v in names if v not in skipped]:
            overrides = {
                **common,
                **variant_overrides(variant, known),
                "output-dir": str(out / "runs" / name / variant),
            }
            run = run_variant(name, variant, overrides, clients=k, reference=reference, timeout=timeout)
            runs.append(run)
            console.print(
                f"  {variant}: {run['wall_seconds']:.0f} s, losses {[r['train_loss'] for r in run['rounds']]}"
            )
    checks = all_checks(runs, folds)
    notes += [f"{'INFO' if ok is None else 'PASS' if ok else 'FAIL'} {text}" for ok, text in checks]
    notes.append(f"{len(runs)} runs in {time.perf_counter() - started:.0f} s on {os.cpu_count()} CPUs")
    table = [cells(row) for run in runs for row in run["rounds"]]
    print_table("fedfuse bench llm-round", COLUMNS, table, notes, console)
    settings = {
        **common_config("<model>", data, batch_size=batch_size, max_length=max_length, **shape),
        "preset": preset,
    }
    write_outputs(out, runs, notes, {**settings, "variants": names, "models": model_names}, folds)
    console.print(f"saved {out / 'llm_round.md'}, {out / 'llm_round.json'}")
    if check and any(ok is False for ok, _ in checks):
        raise typer.Exit(code=1)
