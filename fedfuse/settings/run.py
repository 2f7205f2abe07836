"""Run control settings (``settings.run``): rounds, sampling, evaluation, outputs, time-outs, trust."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from fedfuse.settings.fields import (
    SettingsError,
    check_at_least,
    check_choice,
    check_fraction,
    check_positive,
    setting,
)

TRACKERS = ("none", "tensorboard", "mlflow")
"""Experiment tracking backends (``tracking``): none, TensorBoard event files, an MLflow tracking store."""
TRACKING_NEEDS: dict[str, tuple[str, ...]] = {"tensorboard": ("tensorboard",), "mlflow": ("mlflow",)}
"""The modules a backend imports (installed by ``pip install 'fedfuse[tracking]'``)."""
SQLITE_NEEDS = ("sqlalchemy", "alembic")
"""What MLflow's sqlite store (the default ``tracking-uri``) needs besides mlflow-skinny."""


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
    tracking, tracking_uri : str, str
        One of :data:`TRACKERS`, and where it writes (:attr:`tracking_target`; ``fedfuse.server.tracking`` logs).
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
    tracking: str = setting("none", "experiment tracking: `none`, `tensorboard` or `mlflow` (see the tracking guide)")
    tracking_uri: str = setting(
        "",
        "where tracking writes (empty: `<output-dir>/tensorboard`, or MLflow's `sqlite:///<output-dir>/mlflow.db`)",
    )

    def __post_init__(self) -> None:
        check_at_least(self, 1, "num_server_rounds", "min_train_nodes")
        check_at_least(self, 0, "eval_examples", "seed", "keep_checkpoints", "max_update_bytes")
        check_fraction(self, "fraction_train")
        check_fraction(self, "fraction_evaluate")
        if self.fraction_train == 0.0:
            raise SettingsError("fraction-train must be > 0")
        check_positive(self, "timeout")
        check_choice(self, "tracking", TRACKERS)

    @property
    def tracking_target(self) -> str:
        """Where tracking writes: ``tracking-uri``, or a local store beside the run's output (absolute)."""
        if self.tracking_uri:
            return self.tracking_uri
        folder = Path(self.output_dir).resolve()
        if self.tracking == "mlflow":
            return f"sqlite:///{folder / 'mlflow.db'}"
        return str(folder / "tensorboard")

    def check_tracking_installed(self) -> None:
        """Refuse a tracking backend whose library is missing (the ServerApp and ``fedfuse simulate`` ask first)."""
        needs = TRACKING_NEEDS.get(self.tracking, ())
        if self.tracking == "mlflow" and self.tracking_target.startswith("sqlite:"):
            needs += SQLITE_NEEDS
        missing = [name for name in needs if importlib.util.find_spec(name) is None]
        if missing:
            raise SettingsError(
                f"tracking {self.tracking!r} needs {', '.join(missing)}, not installed: pip install 'fedfuse[tracking]'"
            )
