"""Experts and merges for ``fedfuse bench merge-quality``: one cached LoRA expert per skill, merged in ΔW space.

An expert is one fedfuse local round (:func:`fedfuse.client.local_round.run_local_round`: the run's
SFT trainer, LoRA through PEFT, the payload a client would send) on one skill's training file, from
the base model. Its LoRA factors are cached under ``<out>/experts/`` by skill, seed, steps and a hash
of everything else that shapes training, so a re-run merges without retraining.

Merging follows the server's LoRA-exact path: each expert's factors become ΔWₖ = s·BₖAₖ
(:func:`fedfuse.algebra.lora.factors_to_deltas`), are shrunk by the method's default sparsifier
(TIES trim, DARE, breadcrumbs, DELLA) and folded into the method's monoid state with weight 1;
``finalize`` gives τ at λ = 1 and the λ grid scales it (every registered method applies λ last).
The naive factor average (FedIT) is the baseline that averages A and B separately.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedfuse.algebra import Sparsifier, dare_seed_fn, factor_names, sparsify_update, to_dense
from fedfuse.algebra.lora import factors_to_deltas, lora_modules, naive_factor_average
from fedfuse.client.local_round import Shard, run_local_round
from fedfuse.data import skills as skill_data
from fedfuse.settings import RunSettings
from fedfuse.strategies import available_strategies, build_strategy, method_spec
from fedfuse.training.client_datasets import NodeData, load_client_datasets
from fedfuse.training.gram import gram_matrices, gram_targets
from fedfuse.training.run_model import lora_scale, update_shapes
from fedfuse.wire import Expectation, decode_update

CANDIDATE_METHODS: tuple[str, ...] = (
    "fedavg",
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "model_stock",
    "regmean",
    "median",
    "trimmed_mean",
)
"""Merge methods the benchmark runs by default when registered: the monoids (RegMean with each expert's
Gram matrices over its own training prompts), then the coordinate-wise robust two (cheap at K experts).
Fisher is left out: LoRA experts carry no Fisher diagonal."""
NAIVE = "naive_factor_average"
"""The row of the FedIT baseline: A and B averaged separately (cross terms included)."""
DENSITIES: dict[str, float] = {"trim": 0.2, "dare": 0.5, "breadcrumbs": 0.8, "della": 0.5}
"""Kept fraction per sparsifier kind (TIES trim 20 %, DARE p = 0.5, breadcrumbs 80 %, DELLA 50 %)."""
SUM_GRID: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25)
"""λ grid of methods whose τ is a sum of task vectors (task arithmetic and its sparsified variants)."""
DISJOINT_GRID: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25)
"""λ grid of TIES-style disjoint means (each entry the mean of the agreeing experts)."""
SUMMING: frozenset[str] = frozenset({"task_arithmetic", "dare_linear", "breadcrumbs", "della_linear"})
DISJOINT: frozenset[str] = frozenset({"ties", "dare_ties", "breadcrumbs_ties", "della"})


def default_methods() -> list[str]:
    """The candidate methods that are registered in this environment, in table order."""
    registered = set(available_strategies())
    return [name for name in CANDIDATE_METHODS if name in registered]


def check_methods(names: Sequence[str]) -> list[str]:
    """``names`` checked against the registry (and the naive baseline); a one-line ``ValueError`` otherwise."""
    registered = set(available_strategies())
    unknown = [n for n in names if n not in registered and n != NAIVE]
    if unknown:
        raise ValueError(f"unknown merge methods {unknown}; registered: {', '.join(sorted(registered))}")
    fisher = [n for n in names if n != NAIVE and method_spec(n).capabilities.needs_fisher]
    if fisher:
        raise ValueError(f"{fisher} need a Fisher diagonal per update, which LoRA experts do not send")
    return list(names)


def lambda_grid(method: str, experts: int) -> tuple[float, ...]:
    """The λ candidates of ``method``: the sum grid, the disjoint-mean grid, or 1…K for averages of K experts."""
    if method in SUMMING:
        return SUM_GRID
    if method in DISJOINT:
        return DISJOINT_GRID
    return tuple(sorted({1.0, experts / 2, 3 * experts / 4, float(experts)}))


@dataclass(frozen=True)
class ExpertConfig:
    """Everything that shapes an expert's training (its hash names the cache file)."""

    model: str
    steps: int
    batch_size: int
    learning_rate: float
    lora_rank: int
    lora_alpha: float
    max_length: int
    train_rows: int
    threads: int = 1

    def run_config(self, seed: int) -> dict[str, Any]:
        """The fedfuse run config of one expert round (task sft, LoRA, no local validation split)."""
        return {
            "model": self.model,
            "task": "sft",
            "mode": "lora",
            "seed": seed,
            "local-steps": self.steps,
            "batch-size": self.batch_size,
            "learning-rate": self.learning_rate,
            "lora-rank": self.lora_rank,
            "lora-alpha": self.lora_alpha,
            "max-length": self.max_length,
            "client-threads": self.threads,
            "partition": "iid",
        }

    def settings(self, seed: int) -> RunSettings:
        """:meth:`run_config` as checked settings."""
        return RunSettings.from_run_config({}, **self.run_config(seed))

    def key(self, skill: str, seed: int) -> str:
        """Cache file stem: skill, seed, steps and a short hash of the rest of the config."""
        fields = {k: v for k, v in asdict(self).items() if k != "threads"}
        digest = hashlib.sha256(json.dumps({**fields, "skill": skill}, sort_keys=True).encode()).hexdigest()[:12]
        return f"{skill}-seed{seed}-steps{self.steps}-{digest}"


def train_expert(
    config: ExpertConfig, skill: str, seed: int, files: dict[str, Path], cache: Path
) -> tuple[dict[str, torch.Tensor], bool]:
    """The LoRA factors of ``skill``'s expert for ``seed``, and whether they came from the cache.

    Training is one fedfuse local round on ``files["train"]`` (``files["validation"]`` as its local
    held-out data), decoded from the payload exactly as the server would receive it.
    """
    path = cache / f"{config.key(skill, seed)}.safetensors"
    if path.is_file():
        return load_file(path), True
    settings = config.settings(seed)
    shard = Shard(
        0, 1, f"expert-{skill}", node_data=NodeData(data=str(files["train"]), eval_data=str(files["validation"]))
    )
    local = run_local_round(settings, {}, round_number=1, run_id=f"merge-quality-{seed}", shard=shard)
    update = decode_update(local.payload, expect=Expectation(shapes=update_shapes(settings)))
    factors = {name: to_dense(t).contiguous() for name, t in update.tensors.items()}
    cache.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    save_file(factors, temp, metadata={"skill": skill, "seed": str(seed), "train-loss": f"{local.train_loss:.6f}"})
    temp.replace(path)
    return factors, False


GRAM_BATCHES = 8
"""Batches of an expert's training prompts its RegMean Gram matrices are summed over."""


def expert_grams(
    config: ExpertConfig, seed: int, model: torch.nn.Module, tokenizer: Any, names: Sequence[str], train: Path
) -> dict[str, torch.Tensor]:
    """Gram matrices of ``model``'s (base + one expert's ΔW) LoRA-module inputs over that expert's training file."""
    settings = config.settings(seed)
    data = load_client_datasets(settings, tokenizer, partition_id=0, num_partitions=1, node=NodeData(data=str(train)))
    return gram_matrices(
        model,
        data.train,
        gram_targets(model, names),
        num_batches=GRAM_BATCHES,
        batch_size=config.batch_size,
        seed=seed,
    )


def expert_deltas(factors: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """An expert's task vector in weight space: ΔW = s·B·A under each module's ``.weight``."""
    return factors_to_deltas(factors, scale)


def sparsifier_for(method: str) -> Sparsifier:
    """The method's default sparsifier at the benchmark's density for that kind."""
    kind = method_spec(method).default_sparsifier
    return Sparsifier() if kind == "none" else Sparsifier(kind, DENSITIES[kind])


def merge(
    method: str,
    deltas: Sequence[dict[str, torch.Tensor]],
    seed: int,
    grams: Sequence[dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """τ of ``method`` over the experts' ΔW at λ = 1 (each shrunk by the method's sparsifier, weight 1).

    ``grams`` (RegMean): each expert's Gram matrices of its LoRA modules' inputs, keyed like ``deltas``.
    """
    strategy = build_strategy(method)
    sparsifier = sparsifier_for(method)
    state = strategy.new_state()
    for k, delta in enumerate(deltas):
        seed_for = dare_seed_fn(seed, 1, f"expert-{k}") if sparsifier.seeded else None
        state.add(sparsify_update(delta, sparsifier, seed_for), 1.0, gram=None if grams is None else grams[k])
    return {name: t.float().cpu() for name, t in state.finalize(release=True).items()}


def naive_merge(factors: Sequence[dict[str, torch.Tensor]], scale: float) -> dict[str, torch.Tensor]:
    """The FedIT baseline in weight space: s·(mean B)(mean A) per module (equal weights)."""
    out: dict[str, torch.Tensor] = {}
    for module in lora_modules(list(factors[0])):
        a_name, b_name = factor_names(module)
        pairs = [(f[a_name], f[b_name]) for f in factors]
        out[module + ".weight"] = naive_factor_average(pairs, [1.0] * len(pairs), scale)
    return out


def expert_scale(config: ExpertConfig) -> float:
    """s = α / r of the experts' LoRA."""
    return lora_scale(config.settings(0))


def skill_prompts(names: Sequence[str], validation: int, test: int) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """skill → split → (prompt, answer) pairs of the held-out splits the benchmark scores."""
    return {
        name: {
            "validation": skill_data.examples(name, "validation", validation),
            "test": skill_data.examples(name, "test", test),
        }
        for name in names
    }
