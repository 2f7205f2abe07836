"""Run control settings (``settings.run``): rounds, sampling, evaluation, outputs, time-outs, trust."""

from __future__ import annotations

from dataclasses import dataclass

from fedfuse.settings.fields import (
    SettingsError,
    check_at_least,
    check_fraction,
    check_positive,
    setting,
)


@dataclass(frozen=True)
class RunControl:
    """The federated run around the rounds.

    Parameters
    ----------
    num_server_rounds : int
        Rounds (a resumed run continues up to this number).
    seed : int
        Seed of the data split, partitions, head and LoRA init, batch order, DARE masks and sampling.
    signer_registry : str
        A JSON registry of institutions' Ed25519 keys: when set, only updates signed by a registered
        institution for this run and round are merged.
    """

    num_server_rounds: int = setting(4, "rounds (a resumed run continues up to this number)")
    seed: int = setting(0, "seed of split, partitions, head init, LoRA init, batch order, DARE masks, sampling")
    fraction_train: float = setting(1.0, "fraction of nodes sampled to train each round (seeded by run seed and round)")
    min_train_nodes: int = setting(1, "fewest nodes a training round needs")
    fraction_evaluate: float = setting(1.0, "fraction of nodes sampled for federated evaluation")
    eval_examples: int = setting(0, "server evaluation on that many test examples (0 = the whole held-out split)")
    output_dir: str = setting("runs/fedfuse", "report and checkpoint folder")
    keep_checkpoints: int = setting(
        1, "rounds of global weights kept in the checkpoint (0 = all; `fedfuse export --round N` needs round N kept)"
    )
    resume: str = setting("", "a run folder or checkpoint to resume from")
    timeout: float = setting(3600.0, "seconds to wait for replies")
    signer_registry: str = setting(
        "",
        "JSON registry of institutions' Ed25519 keys; when set, only updates signed for this run and round are merged",
    )

    max_update_bytes: int = setting(
        0, "refuse larger update payloads before parsing them (0 = the largest the expected tensors can need)"
    )

    def __post_init__(self) -> None:
        check_at_least(self, 1, "num_server_rounds", "min_train_nodes")
        check_at_least(self, 0, "eval_examples", "seed", "keep_checkpoints", "max_update_bytes")
        check_fraction(self, "fraction_train")
        check_fraction(self, "fraction_evaluate")
        if self.fraction_train == 0.0:
            raise SettingsError("fraction-train must be > 0")
        check_positive(self, "timeout")
