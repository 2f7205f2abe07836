"""Local training settings (``settings.training``): how each client fine-tunes in a round."""

from __future__ import annotations

from dataclasses import dataclass

from fedfuse.settings.fields import (
    SettingsError,
    check_at_least,
    check_choice,
    check_positive,
    setting,
)

MODES = ("lora", "full")
CLIENT_DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
QUANTIZATIONS = ("none", "4bit")
AUTO_LEARNING_RATE = {"lora": 3e-3, "full": 1e-4}
AUTO_TARGET_MODULES = ("query", "value", "q_proj", "k_proj", "v_proj", "o_proj")
"""What ``lora-target-modules = "auto"`` adapts: attention query/value (BERT-like) or q/k/v/o (Llama-like)."""


@dataclass(frozen=True)
class TrainingSettings:
    """A client's local round.

    Parameters
    ----------
    mode : str
        "lora" (PEFT adapters; the head trains fully) or "full".
    learning_rate : float or "auto"
        AdamW's; "auto" is 3e-3 for LoRA and 1e-4 for full fine-tuning (:attr:`lr`).
    local_steps, local_epochs : int
        Steps per round, or whole passes over the client's data when ``local_epochs`` > 0.
    fisher_batches : int or "auto"
        Batches for the diagonal Fisher ("auto": resolved by the merge strategy, see
        ``RunSettings.fisher_batch_count``).
    gram_batches : int or "auto"
        Batches for the Gram matrices of linear-layer inputs (RegMean; "auto": see
        ``RunSettings.gram_batch_count``).
    """

    mode: str = setting("lora", "`lora` (PEFT; the head trains fully) or `full`")
    lora_rank: int = setting(8, "LoRA rank r")
    lora_node_ranks: str = setting(
        "", "LoRA rank per partition id, e.g. `2,4,8` (cycled; each ≤ `lora-rank`); a node config `lora-rank` wins"
    )
    lora_alpha: float = setting(16.0, "LoRA α (scale s = α / r)")
    lora_target_modules: str = setting(
        "auto", "`auto`: `query,value` (BERT-like) or `q_proj,k_proj,v_proj,o_proj` (Llama-like); else a comma list"
    )
    learning_rate: float | str = setting("auto", "AdamW; `auto` = 3e-3 for LoRA, 1e-4 for full", auto=float)
    local_steps: int = setting(20, "optimizer steps per round")
    local_epochs: int = setting(0, "whole passes over the client's data per round instead, when > 0")
    batch_size: int = setting(32, "examples per step")
    fisher_batches: int | str = setting(
        "auto", "batches for the diagonal Fisher; `auto` = 4 when the strategy needs Fisher, else 0", auto=int
    )
    gram_batches: int | str = setting(
        "auto",
        "batches for the Gram matrices XᵀX of linear-layer inputs; `auto` = 4 when the strategy needs them"
        " (`regmean`), else 0",
        auto=int,
    )
    client_threads: int = setting(1, "torch threads per client")
    client_eval_examples: int = setting(64, "local held-out examples for the evaluate handler")
    trainer: str = setting(
        "auto",
        "the local trainer: `auto` (built-in for the task), an entry point of group `fedfuse.trainers`, or"
        " `module:function` — see the guide docs/guides/data.md",
    )
    client_device: str = setting("auto", "where clients train: `auto` (CUDA when present), `cpu`, `cuda`")
    precision: str = setting("auto", "mixed precision: `auto` (bf16 on CUDA, fp32 on CPU), `fp32`, `bf16`, `fp16`")
    gradient_checkpointing: bool = setting(False, "recompute activations to save memory")
    quantization: str = setting(
        "none", "`4bit`: QLoRA through bitsandbytes (CUDA, `pip install 'fedfuse[qlora]'`), or `none`"
    )

    def __post_init__(self) -> None:
        check_choice(self, "mode", MODES)
        check_choice(self, "client_device", CLIENT_DEVICES)
        check_choice(self, "precision", PRECISIONS)
        check_choice(self, "quantization", QUANTIZATIONS)
        check_at_least(self, 1, "lora_rank", "batch_size", "client_threads")
        check_at_least(self, 0, "local_steps", "local_epochs", "client_eval_examples")
        check_positive(self, "lora_alpha")
        if self.local_steps == 0 and self.local_epochs == 0:
            raise SettingsError("local-steps and local-epochs are both 0: a client would not train")
        if self.learning_rate != "auto" and not float(self.learning_rate) > 0:
            raise SettingsError(f"learning-rate must be > 0 or 'auto'; got {self.learning_rate!r}")
        for key in ("fisher_batches", "gram_batches"):
            value = getattr(self, key)
            if value != "auto" and int(value) < 0:
                raise SettingsError(f"{key.replace('_', '-')} must be >= 0 or 'auto'; got {value!r}")
        ranks = self.node_ranks  # parsed now: a bad list is refused before anything starts
        if any(rank < 1 or rank > self.lora_rank for rank in ranks):
            raise SettingsError(f"lora-node-ranks must be ranks in [1, lora-rank = {self.lora_rank}]; got {ranks}")
        if self.quantization == "4bit" and self.mode != "lora":
            raise SettingsError(
                "quantization '4bit' (QLoRA) needs mode 'lora': a 4-bit base cannot be fine-tuned in full"
            )

    @property
    def node_ranks(self) -> tuple[int, ...]:
        """``lora-node-ranks`` as integers (empty: every node trains at ``lora-rank``)."""
        try:
            return tuple(int(part) for part in self.lora_node_ranks.split(",") if part.strip())
        except ValueError:
            raise SettingsError(
                f"lora-node-ranks must be comma-separated integers; got {self.lora_node_ranks!r}"
            ) from None

    def node_rank(self, partition_id: int) -> int:
        """The LoRA rank of the node with ``partition_id`` under ``lora-node-ranks`` (0: the run's)."""
        ranks = self.node_ranks
        return ranks[partition_id % len(ranks)] if ranks else 0

    @property
    def lr(self) -> float:
        """The learning rate, with "auto" resolved for the mode."""
        return AUTO_LEARNING_RATE[self.mode] if self.learning_rate == "auto" else float(self.learning_rate)

    @property
    def target_modules(self) -> list[str] | None:
        """LoRA target module names, or None for "auto" (attention query/value or q/k/v/o projections)."""
        if self.lora_target_modules == "auto":
            return None
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]
