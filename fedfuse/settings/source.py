"""Model and data settings (``settings.source``): which model, which task, whose data, how it is split."""

from __future__ import annotations

from dataclasses import dataclass

from fedfuse.settings.fields import (
    SettingsError,
    check_at_least,
    check_choice,
    check_positive,
    setting,
)

TASKS = ("topics", "classify", "lm", "sft")
PARTITIONS = ("auto", "dirichlet", "domain", "iid", "shards", "natural")
AUTO_MAX_LENGTH = {"sft": 128}
"""``max-length = "auto"`` by task (chat SFT needs room for the template and the answer); else 32."""


@dataclass(frozen=True)
class SourceSettings:
    """The model clients fine-tune and the data they train on.

    Parameters
    ----------
    model : str
        "default" (embedded all-MiniLM-L6-v2), "smollm2", a local folder or a hub id.
    task : str
        One of :data:`TASKS`; "topics" is the built-in docstring task, the others read ``data``.
    data, data_dir, eval_data : str
        One file partitioned over simulated clients, a folder with one file per client, a held-out
        file the server evaluates on.
    partition : str
        One of :data:`PARTITIONS` (``alpha`` for dirichlet, ``partition_column`` for natural).
    """

    model: str = setting(
        "default",
        "`default` (embedded MiniLM), `smollm2` (embedded SmolLM2-135M-Instruct), a local folder,"
        " or a hub id `org/name`",
    )
    task: str = setting(
        "topics",
        "`topics`: the built-in docstring topic classification; `classify` (text + label), `lm` (causal LM; without"
        " data: on the docstrings; accuracy = next-token accuracy), `sft` (chat; loss on assistant tokens only) — see"
        ' "Bring your data"',
    )
    data: str = setting("", "your data: one file partitioned over the simulated clients")
    data_dir: str = setting("", "a folder with one data file per client (exclusive with `data`)")
    eval_data: str = setting("", "a held-out file the server evaluates on (without it, evaluation is federated)")
    text_column: str = setting("text", "text column for classify/lm")
    label_column: str = setting("label", "label column for classify")
    messages_column: str = setting("messages", "sft column of role/content messages")
    prompt_column: str = setting("prompt", "sft prompt column (prompt/response pairs)")
    response_column: str = setting("response", "sft response column (prompt/response pairs)")
    labels: str = setting("", "the label set, a comma list (empty: read once from the run's data)")
    validation_fraction: float = setting(
        0.1, "rows of each client's data held out for its local evaluation (unless the node names its own `eval-data`)"
    )
    partition: str = setting(
        "auto",
        "client shares: `auto` (dirichlet where there is a label or `partition-column`, else iid), `dirichlet`"
        " (α over the column; default the label), `iid`, `shards` (pathological), `natural` (one client per value"
        " of the column), `domain` (built-in task only)",
    )
    partition_column: str = setting("", "the column `dirichlet` and `natural` partition by")
    alpha: float = setting(0.5, "Dirichlet concentration α (smaller: more skewed client shares)")
    shards_per_client: int = setting(2, "label shards per client for `shards`")
    max_length: int | str = setting("auto", "tokens per example (`auto`: 128 for sft, else 32)", auto=int)

    def __post_init__(self) -> None:
        check_choice(self, "task", TASKS)
        check_choice(self, "partition", PARTITIONS)
        check_at_least(self, 1, "shards_per_client")
        check_positive(self, "alpha")
        if self.max_length != "auto" and int(self.max_length) < 1:
            raise SettingsError(f"max-length must be >= 1 or 'auto'; got {self.max_length!r}")
        if self.data and self.data_dir:
            raise SettingsError(
                "data and data-dir are exclusive: one file partitioned over clients, or one file per client"
            )
        if self.task == "topics" and (self.data or self.data_dir):
            raise SettingsError(
                "task 'topics' is the built-in docstring task: use task 'classify', 'lm' or 'sft' with data"
            )
        if not 0.0 <= self.validation_fraction < 1.0:
            raise SettingsError(f"validation-fraction must be in [0, 1); got {self.validation_fraction}")
        if self.partition == "natural" and not self.partition_column:
            raise SettingsError("partition 'natural' needs partition-column (e.g. partition-column=institution)")

    @property
    def partition_scheme(self) -> str:
        """The partition the run uses: ``auto`` resolved to dirichlet where there is something to skew by.

        The built-in data and ``classify`` files have a label, and a ``partition-column`` names one; chat (sft)
        and text (lm) files have neither, so ``auto`` splits them iid.
        """
        if self.partition != "auto":
            return self.partition
        labelled = self.uses_builtin_data or self.task == "classify" or bool(self.partition_column)
        return "dirichlet" if labelled else "iid"

    @property
    def sequence_length(self) -> int:
        """Tokens per example, with "auto" resolved: 128 for chat SFT (template + answer), else 32."""
        if self.max_length == "auto":
            return AUTO_MAX_LENGTH.get(self.task, 32)
        return int(self.max_length)

    @property
    def label_names(self) -> tuple[str, ...]:
        """The ``labels`` run-config list, or () when the label set is read from the data."""
        return tuple(name.strip() for name in self.labels.split(",") if name.strip())

    @property
    def uses_builtin_data(self) -> bool:
        """Whether the run trains on the built-in standard-library docstring texts (no data file)."""
        return not (self.data or self.data_dir)
