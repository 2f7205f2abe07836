"""Run settings shared by the ClientApp, the ServerApp and ``fedfuse simulate``.

Flower hands both apps ``context.run_config``: the ``[tool.flwr.app.config]`` table of
``pyproject.toml`` with any ``--run-config`` overrides. ``RunSettings.from_run_config`` reads it on
top of the defaults below (so the apps also work with an empty run config, as Flower's Python
simulation API gives them), checks every value and names the key that is wrong.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedfuse.algebra import Sparsifier
from fedfuse.strategies import available_strategies

Scalar = int | float | str | bool

MODES = ("lora", "full")
LORA_AGGREGATIONS = ("exact", "factors")
PARTITIONS = ("dirichlet", "domain", "iid", "shards", "natural")
TASKS = ("topics", "classify", "lm", "sft")
CLIENT_DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
QUANTIZATIONS = ("none", "4bit")
WIRE_DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
AUTO_LEARNING_RATE = {"lora": 3e-3, "full": 1e-4}
AUTO_MAX_LENGTH = {"sft": 128}
AUTO_TARGET_MODULES = ("query", "value", "q_proj", "k_proj", "v_proj", "o_proj")


class SettingsError(ValueError):
    """A run-config value is missing, of the wrong type or out of range; the message names the key."""


@dataclass(frozen=True)
class RunSettings:
    """Every knob of a federated run; field ``num_server_rounds`` is run-config key ``num-server-rounds``.

    Model and data: ``model`` ("default" = embedded all-MiniLM-L6-v2, "smollm2", a folder or a hub id),
    ``task`` ("topics": the built-in standard-library docstring topics; "classify", "lm", "sft": on
    ``data`` — one file partitioned over simulated clients, or a node's own file in its node config —
    or ``data_dir`` (one file per client), with the ``*_column`` names, ``labels`` and
    ``validation_fraction``; ``eval_data`` is a held-out file the server evaluates on),
    ``partition`` ("dirichlet" with ``alpha`` over ``partition_column``, "domain", "iid", "shards",
    "natural" by ``partition_column``), ``max_length`` tokens, ``seed`` (data split, partitions, head
    init, DARE masks, training order).

    Local training: ``mode`` ("lora" or "full"), ``lora_rank``, ``lora_alpha``,
    ``lora_target_modules`` ("auto" or a comma list), ``learning_rate`` ("auto": 3e-3 LoRA, 1e-4
    full), ``local_steps`` (or ``local_epochs`` > 0), ``batch_size``, ``fisher_batches`` (diagonal
    Fisher on that many batches; "auto" = 4 when the strategy is fisher, else 0),
    ``client_threads`` (torch threads per client), ``client_eval_examples``.

    Update: ``sparsifier`` ("none", "trim", "dare"), ``density``, ``sparsify_scope``,
    ``seed_scope``, ``error_feedback`` ("auto": on for trim, off for DARE, whose rescaled drop is
    unbiased on its own; measured: DARE p=0.9 with feedback must send unrescaled and learns far slower),
    ``wire_dtype``.

    Server: ``strategy`` (any registered name, plug-ins too), ``lam``, ``vote``, ``lora_aggregation``
    ("exact" merges ΔW = s·BA, "factors" averages A and B: the baseline), ``weighting``,
    ``fraction_train``, ``min_train_nodes``, ``fraction_evaluate``, ``device``, ``eval_examples``
    (0 = whole test split), ``output_dir``, ``keep_checkpoints`` (rounds of weights kept; 0 = all), ``resume`` (a run folder or checkpoint), ``timeout``,
    ``signer_registry`` (a registry of institutions' Ed25519 keys: when set, only updates signed by a
    registered institution for this run and round are merged).
    """

    num_server_rounds: int = 4
    model: str = "default"
    task: str = "topics"
    data: str = ""
    data_dir: str = ""
    eval_data: str = ""
    text_column: str = "text"
    label_column: str = "label"
    messages_column: str = "messages"
    prompt_column: str = "prompt"
    response_column: str = "response"
    labels: str = ""
    validation_fraction: float = 0.1
    partition: str = "dirichlet"
    partition_column: str = ""
    alpha: float = 0.5
    shards_per_client: int = 2
    max_length: int | str = "auto"
    seed: int = 0
    mode: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_target_modules: str = "auto"
    learning_rate: float | str = "auto"
    local_steps: int = 20
    local_epochs: int = 0
    batch_size: int = 32
    fisher_batches: int | str = "auto"
    client_threads: int = 1
    client_eval_examples: int = 64
    trainer: str = "auto"
    client_device: str = "auto"
    precision: str = "auto"
    gradient_checkpointing: bool = False
    quantization: str = "none"
    sparsifier: str = "none"
    density: float = 0.1
    sparsify_scope: str = "tensor"
    seed_scope: str = "node"
    error_feedback: bool | str = "auto"
    wire_dtype: str = "float32"
    strategy: str = "fedavg"
    lam: float = 1.0
    vote: str = "mass"
    lora_aggregation: str = "exact"
    weighting: str = "num_examples"
    fraction_train: float = 1.0
    min_train_nodes: int = 1
    fraction_evaluate: float = 1.0
    device: str = "auto"
    eval_examples: int = 0
    output_dir: str = "runs/fedfuse"
    keep_checkpoints: int = 1
    resume: str = ""
    timeout: float = 3600.0
    signer_registry: str = ""

    def __post_init__(self) -> None:
        self._check()

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any] | None = None, **overrides: Any) -> RunSettings:
        """Defaults, then ``run_config`` (dashed keys), then ``overrides`` (dashed or underscored keys)."""
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for source in (run_config or {}, overrides):
            for key, value in source.items():
                name = key.replace("-", "_")
                if name not in known:
                    close = sorted(k.replace("_", "-") for k in known if k[:3] == name[:3])
                    hint = f" (did you mean {', '.join(close)}?)" if close else ""
                    raise SettingsError(f"unknown run-config key {key!r}{hint}")
                if value is not None:
                    values[name] = value
        return cls(**{name: _coerce(name, value) for name, value in values.items()})

    def to_run_config(self) -> dict[str, Scalar]:
        """The settings as Flower run-config entries (dashed keys, scalar values)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> RunSettings:
        """A copy with some fields changed (underscored names)."""
        return dataclasses.replace(self, **changes)

    @property
    def lr(self) -> float:
        """The learning rate, with "auto" resolved for the mode."""
        return AUTO_LEARNING_RATE[self.mode] if self.learning_rate == "auto" else float(self.learning_rate)

    @property
    def sequence_length(self) -> int:
        """Tokens per example, with "auto" resolved: 128 for chat SFT (template + answer), else 32."""
        if self.max_length == "auto":
            return AUTO_MAX_LENGTH.get(self.task, 32)
        return int(self.max_length)

    @property
    def fisher_batch_count(self) -> int:
        """Batches for the Fisher diagonal ("auto": 4 for the fisher strategy, else none)."""
        if self.fisher_batches == "auto":
            return 4 if self.strategy == "fisher" else 0
        return int(self.fisher_batches)

    @property
    def uses_error_feedback(self) -> bool:
        """Whether clients carry dropped mass to the next round ("auto": for trim only; never in LoRA mode)."""
        if self.sparsifier == "none" or self.mode == "lora":
            return False
        if self.error_feedback == "auto":
            return self.sparsifier == "trim"
        return bool(self.error_feedback)

    @property
    def target_modules(self) -> list[str] | None:
        """LoRA target module names, or None for "auto" (attention query/value or q/k/v/o projections)."""
        if self.lora_target_modules == "auto":
            return None
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]

    @property
    def sparsifier_spec(self) -> Sparsifier:
        """The client sparsifier these settings describe."""
        density = 1.0 if self.sparsifier == "none" else self.density
        return Sparsifier(self.sparsifier, density, self.sparsify_scope, self.seed_scope)

    def _check(self) -> None:
        choices = {
            "mode": MODES, "lora_aggregation": LORA_AGGREGATIONS, "partition": PARTITIONS, "task": TASKS,
            "client_device": CLIENT_DEVICES, "precision": PRECISIONS, "quantization": QUANTIZATIONS,
            "wire_dtype": WIRE_DTYPES, "device": DEVICES, "vote": ("mass", "count"),
            "weighting": ("num_examples", "uniform"), "sparsifier": ("none", "trim", "dare"),
            "sparsify_scope": ("tensor", "global"), "seed_scope": ("node", "round"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SettingsError(f"{_key(name)} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.strategy not in available_strategies():
            raise SettingsError(
                f"strategy must be one of {', '.join(available_strategies())}; got {self.strategy!r}"
            )
        if self.max_length != "auto" and int(self.max_length) < 1:
            raise SettingsError(f"max-length must be >= 1 or 'auto'; got {self.max_length!r}")
        positive = (
            "num_server_rounds", "lora_rank", "batch_size", "client_threads", "min_train_nodes",
            "shards_per_client",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise SettingsError(f"{_key(name)} must be >= 1; got {getattr(self, name)}")
        non_negative = ("local_steps", "local_epochs", "client_eval_examples", "eval_examples", "seed", "keep_checkpoints")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise SettingsError(f"{_key(name)} must be >= 0; got {getattr(self, name)}")
        if self.local_steps == 0 and self.local_epochs == 0:
            raise SettingsError("local-steps and local-epochs are both 0: a client would not train")
        if not 0.0 < self.density <= 1.0:
            raise SettingsError(f"density must be in (0, 1]; got {self.density}")
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SettingsError(f"{_key(name)} must be in [0, 1]; got {getattr(self, name)}")
        if self.fraction_train == 0.0:
            raise SettingsError("fraction-train must be > 0")
        if self.alpha <= 0 or self.lora_alpha <= 0 or self.timeout <= 0:
            raise SettingsError("alpha, lora-alpha and timeout must be > 0")
        if self.learning_rate != "auto" and not float(self.learning_rate) > 0:
            raise SettingsError(f"learning-rate must be > 0 or 'auto'; got {self.learning_rate!r}")
        if self.fisher_batches != "auto" and int(self.fisher_batches) < 0:
            raise SettingsError(f"fisher-batches must be >= 0 or 'auto'; got {self.fisher_batches!r}")
        if self.strategy == "fisher" and self.fisher_batch_count == 0:
            raise SettingsError("strategy 'fisher' needs fisher-batches >= 1 (or 'auto')")
        if self.strategy == "fisher" and self.mode == "lora":
            raise SettingsError(
                "strategy 'fisher' needs mode 'full': a LoRA client has no Fisher diagonal for the ΔW the server merges"
            )
        if self.error_feedback not in (True, False, "auto"):
            raise SettingsError(f"error-feedback must be true, false or 'auto'; got {self.error_feedback!r}")
        self._check_data()
        if self.uses_error_feedback and self.sparsifier == "dare" and self.seed_scope == "round":
            raise SettingsError("error-feedback with round-scoped DARE seeds would drop the same entries every round")


    def _check_data(self) -> None:
        """Own-data keys: which tasks need a file, exclusive sources, the validation fraction, quantization."""
        if self.data and self.data_dir:
            raise SettingsError("data and data-dir are exclusive: one file partitioned over clients, or one file per client")
        if self.task == "topics" and (self.data or self.data_dir):
            raise SettingsError("task 'topics' is the built-in docstring task: use task 'classify', 'lm' or 'sft' with data")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise SettingsError(f"validation-fraction must be in [0, 1); got {self.validation_fraction}")
        if self.partition == "natural" and not self.partition_column:
            raise SettingsError("partition 'natural' needs partition-column (e.g. partition-column=institution)")
        if self.quantization == "4bit" and self.mode != "lora":
            raise SettingsError("quantization '4bit' (QLoRA) needs mode 'lora': a 4-bit base cannot be fine-tuned in full")

    @property
    def label_names(self) -> tuple[str, ...]:
        """The ``labels`` run-config list, or () when the label set is read from the data."""
        return tuple(name.strip() for name in self.labels.split(",") if name.strip())

    @property
    def uses_builtin_data(self) -> bool:
        """Whether the run trains on the built-in standard-library docstring texts (no data file)."""
        return not (self.data or self.data_dir)


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(name: str, value: Any) -> Any:
    """Turn a run-config value (TOML or CLI string) into the field's type, or say which key is wrong."""
    default = RunSettings.__dataclass_fields__[name].default
    try:
        if name in ("learning_rate", "fisher_batches", "error_feedback", "max_length"):
            if value == "auto":
                return value
            if name == "error_feedback":
                return _as_bool(value)
            return float(value) if name == "learning_rate" else _as_int(value)
        if isinstance(default, bool):
            return _as_bool(value)
        if isinstance(default, int):
            return _as_int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{_key(name)}: cannot read {value!r} as {type(default).__name__}") from None


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(value)
    if isinstance(value, (bool, int)):
        return bool(value)
    raise ValueError(value)


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    return int(value)
