"""``RunSettings``: the seven sections of a run, built from Flower's flat run config and checked across sections.

Flower hands both apps ``context.run_config``: the ``[tool.flwr.app.config]`` table of
``pyproject.toml`` with any ``--run-config`` overrides. Keys stay flat for users (``local-steps``);
in code each lives in its section (``settings.training.local_steps``). Each section checks its own
fields; :class:`RunSettings` checks only the rules that span sections.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedfuse.rounds import CentralDP, RoundEngine, RoundPolicy, UpdateSpace
from fedfuse.rounds.space import split_frozen_a
from fedfuse.settings.attack import AttackSettings
from fedfuse.settings.compression import CompressionSettings
from fedfuse.settings.fields import Scalar, SettingsError, coerce, key, section_fields
from fedfuse.settings.merge import MergeSettings, build_merge_strategy, check_coefficient_options
from fedfuse.settings.privacy import DP_STRATEGIES, PrivacySettings
from fedfuse.settings.run import RunControl
from fedfuse.settings.source import SourceSettings
from fedfuse.settings.training import TrainingSettings

SECTIONS: dict[str, type] = {
    "source": SourceSettings,
    "training": TrainingSettings,
    "compression": CompressionSettings,
    "merge": MergeSettings,
    "run": RunControl,
    "privacy": PrivacySettings,
    "attack": AttackSettings,
}
"""Section attribute of :class:`RunSettings` → its class, in run-config (and README table) order."""

SECTION_OF: dict[str, str] = {name: section for section, cls in SECTIONS.items() for name in section_fields(cls)}
"""Field name (underscored) → the section that owns it."""

AUTO_FISHER_BATCHES = 4
"""``fisher-batches = "auto"`` for a strategy that needs Fisher."""
AUTO_GRAM_BATCHES = 4
"""``gram-batches = "auto"`` for a strategy that needs Gram matrices (RegMean)."""


@dataclass(frozen=True)
class RunSettings:
    """Every knob of a federated run, by section; run-config key ``local-steps`` is ``training.local_steps``.

    Parameters
    ----------
    source : SourceSettings
        Model and data.
    training : TrainingSettings
        The clients' local round.
    compression : CompressionSettings
        What a client sends.
    merge : MergeSettings
        The server's merge.
    run : RunControl
        Rounds, sampling, evaluation, outputs, time-outs, signers, input bounds.
    privacy : PrivacySettings
        Client-level differential privacy.
    attack : AttackSettings
        Simulated attackers (a testing feature).
    """

    source: SourceSettings = field(default_factory=SourceSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    compression: CompressionSettings = field(default_factory=CompressionSettings)
    merge: MergeSettings = field(default_factory=MergeSettings)
    run: RunControl = field(default_factory=RunControl)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    attack: AttackSettings = field(default_factory=AttackSettings)

    def __post_init__(self) -> None:
        needs_fisher = self.merge.spec.capabilities.needs_fisher
        name = self.merge.strategy
        if needs_fisher and self.fisher_batch_count == 0:
            raise SettingsError(f"strategy {name!r} needs fisher-batches >= 1 (or 'auto')")
        if self.merge.spec.capabilities.needs_gram and self.gram_batch_count == 0:
            raise SettingsError(f"strategy {name!r} needs gram-batches >= 1 (or 'auto')")
        if self.merge.lora_aggregation == "frozen-a":
            self._check_frozen_a()
        if (
            self.merge.spec.capabilities.needs_gram
            and self.training.mode == "lora"
            and self.merge.lora_aggregation != "exact"
        ):
            raise SettingsError(
                f"strategy {name!r} with LoRA needs lora-aggregation exact: a Gram matrix weights a module's ΔW, "
                "not its factors"
            )
        if needs_fisher and self.training.mode == "lora":
            raise SettingsError(
                f"strategy {name!r} needs mode 'full': "
                "a LoRA client has no Fisher diagonal for the ΔW the server merges"
            )
        if self.attack.attack == "label_flip" and self.source.task not in ("topics", "classify"):
            raise SettingsError(f"attack 'label_flip' needs a classification task; task is {self.source.task!r}")
        c = self.compression
        if self.uses_error_feedback and c.sparsifier == "dare" and c.seed_scope == "round":
            raise SettingsError("error-feedback with round-scoped DARE seeds would drop the same entries every round")
        if self.privacy.enabled:
            self._check_privacy()
        if self.privacy.secure is not None:
            self._check_secure_aggregation()
        check_coefficient_options(self)
        if c.broadcast == "factors" and not self.merges_low_rank:
            raise SettingsError(
                "broadcast 'factors' needs a low-rank merge: mode lora with lora-aggregation exact or frozen-a, a "
                "linear strategy (fedavg, task_arithmetic, linear), sparsifier none, no server optimizer and no "
                f"central DP; {name!r} gives a full-rank change: use broadcast auto, dense or svd"
            )

    @property
    def merges_low_rank(self) -> bool:
        """Whether every round's merged change of the adapted matrices is a product of stacked LoRA factors."""
        return (
            self.training.mode == "lora"
            and self.merge.lora_aggregation in ("exact", "frozen-a")
            and self.merge.spec.capabilities.linear
            and self.compression.sparsifier == "none"
            and self.merge.server_optimizer == "none"
            and self.privacy.dp != "central"
        )

    def _check_frozen_a(self) -> None:
        """Frozen A merges B alone: exact only for a linear merge of LoRA updates sent whole."""
        name = self.merge.strategy
        if self.training.mode != "lora":
            raise SettingsError("lora-aggregation 'frozen-a' needs mode lora: it freezes the LoRA A and trains B")
        capabilities = self.merge.spec.capabilities
        if not capabilities.linear or capabilities.needs_gram:
            raise SettingsError(
                f"lora-aggregation 'frozen-a' needs a linear strategy (fedavg, task_arithmetic, linear); {name!r} is "
                "refused: it merges B, and only a weighted sum of B's is the merge of ΔW = s·B·A. TIES's votes on "
                "ΔW = s·B·A are not linear in B, Fisher and RegMean weight ΔW by statistics of a node's own, and "
                "robust methods select among the ΔW's (use lora-aggregation exact)"
            )
        if self.compression.sparsifier != "none":
            raise SettingsError(
                f"lora-aggregation 'frozen-a' needs sparsifier none; got {self.compression.sparsifier!r}: a node sends "
                "only B (out×r), merged as sent"
            )

    def _check_privacy(self) -> None:
        """A DP run's merge must be a linear function of the clipped updates, on a support that reveals no one."""
        p, c, name = self.privacy, self.compression, self.merge.strategy
        base = self.merge.spec.preset_of or name
        if base not in DP_STRATEGIES:
            raise SettingsError(
                f"dp {p.dp!r} needs strategy fedavg, task_arithmetic or dare_linear; {name!r} is refused: TIES elects "
                "signs and divides by agreeing weights, Fisher weights each client by its own Fisher, RegMean sends "
                "Gram matrices of a client's inputs and robust methods select individual updates, so Gaussian noise "
                "on the clipped sum does not bound what they release"
            )
        if c.sparsifier == "trim" or (c.sparsifier == "dare" and c.seed_scope != "round"):
            raise SettingsError(
                f"dp {p.dp!r} needs sparsifier none, or dare with seed-scope round: a trimmed support (top-|τ|) "
                "depends on a client's data and a node-seeded DARE support identifies the client"
            )
        if self.merge.weighting != "uniform":
            raise SettingsError(
                f"dp {p.dp!r} needs weighting uniform: weighting by examples gives one client more than 1/K of the "
                "mean, beyond what clipping bounds"
            )
        if self.merge.clip_norm and self.merge.clip_norm != p.dp_clip_norm:
            raise SettingsError(
                f"clip-norm {self.merge.clip_norm} differs from dp-clip-norm {p.dp_clip_norm}: a DP run clips at C"
            )
        if p.dp == "local" and self.training.mode == "lora":
            raise SettingsError(
                "dp 'local' needs mode full: a LoRA client sends factors, and noise on B and A is not "
                "Gaussian noise on ΔW = s·B·A (use dp central, which clips and noises ΔW on the server)"
            )
        if p.dp == "central" and self.training.mode == "lora" and self.merge.lora_aggregation != "exact":
            raise SettingsError("dp 'central' with LoRA needs lora-aggregation exact (clipping and noise act on ΔW)")

    def _check_secure_aggregation(self) -> None:
        """Secure sums need additive statistics on supports that reveal no node (dense, or round-seeded DARE)."""
        name, c = self.merge.strategy, self.compression
        capabilities = self.merge.spec.capabilities
        if not capabilities.mergeable or capabilities.needs_base:
            raise SettingsError(
                f"secure-aggregation needs a method whose state is a sum over nodes; {name!r} is refused: robust "
                "methods look at each update (a median or Krum score needs them one by one)"
            )
        if c.sparsifier not in ("none", "dare") or (c.sparsifier == "dare" and c.seed_scope != "round"):
            raise SettingsError(
                f"secure-aggregation needs sparsifier none, or dare with seed-scope round; got {c.sparsifier!r} "
                f"(seed-scope {c.seed_scope!r}): a node's own trim or DARE mask would reveal where its update is large "
                "and who sent it"
            )
        if self.training.mode == "lora" and self.merge.lora_aggregation != "frozen-a":
            raise SettingsError(
                "secure-aggregation with mode lora needs lora-aggregation frozen-a: with a shared frozen A the sum of "
                "the nodes' B's is the exact merge, while exact ΔW = s·B·A would need every node's dense ΔW summed"
            )
        if self.privacy.dp == "central":
            raise SettingsError(
                "secure-aggregation hides each update from the server, which central DP must clip: use dp local"
            )

    @property
    def server_clip_norm(self) -> float:
        """The norm the server (and a gateway) clips each update to: C in central DP, else ``clip-norm``."""
        return self.privacy.dp_clip_norm if self.privacy.dp == "central" else self.merge.clip_norm

    @property
    def round_policy(self) -> RoundPolicy:
        """What every round of this run enforces: size cap, sparsifier check, bounds, clipping, DP, optimizer."""
        p = self.privacy
        central = CentralDP(p.dp_clip_norm, p.dp_noise_multiplier, p.dp_noise_seed) if p.dp == "central" else None
        return RoundPolicy(
            weighting=self.merge.weighting,
            max_update_bytes=self.run.max_update_bytes,
            clip_norm=self.server_clip_norm,
            max_num_examples=self.merge.max_num_examples,
            central_dp=central,
            server_optimizer=self.merge.server_rule,
            timeout=self.run.timeout,
            secure_aggregation=self.privacy.secure,
        )

    def update_space(self, wire_shapes: Mapping[str, tuple[int, ...]], scale: float) -> UpdateSpace:
        """The space this run merges in (mode, LoRA aggregation, sparsifier, seeds) for these wire tensors.

        Frozen A: ``wire_shapes`` is the adapter's (:func:`fedfuse.training.run_model.update_shapes`), A included; its
        A shapes are kept by the space to redraw A, and its ``wire_shapes`` are what nodes send (B and the head).
        """
        kind = "full" if self.training.mode == "full" else f"lora-{self.merge.lora_aggregation}"
        c = self.compression
        a_shapes: dict[str, tuple[int, ...]] = {}
        if kind == "lora-frozen-a":  # A is redrawn, not sent: its shapes go to the space, off the wire
            wire_shapes, a_shapes = split_frozen_a(wire_shapes)
        return UpdateSpace(kind, wire_shapes, scale, c.sparsifier_spec, self.run.seed, c.seed_scope, a_shapes)  # type: ignore[arg-type]

    def round_engine(self, space: UpdateSpace, *, bind_senders: bool = True, **round_facts: Any) -> RoundEngine:
        """A round engine with this run's strategy and policy (``round_facts``: see ``RoundPolicy.engine``).

        ``bind_senders=False`` for payloads made in-process (a gateway's members, benchmarks): no transport peer.
        """
        policy = dataclasses.replace(self.round_policy, bind_senders=bind_senders)
        return policy.engine(build_merge_strategy(self), space, **round_facts)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any] | None = None, **overrides: Any) -> RunSettings:
        """Defaults, then ``run_config`` (dashed keys), then ``overrides`` (dashed or underscored keys)."""
        values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
        for entries in (run_config or {}, overrides):
            for raw_key, value in entries.items():
                name = raw_key.replace("-", "_")
                section = SECTION_OF.get(name)
                if section is None:
                    raise SettingsError(f"unknown run-config key {raw_key!r}{_did_you_mean(name)}")
                if value is not None:
                    values[section][name] = coerce(section_fields(SECTIONS[section])[name], value)
        return cls(**{section: SECTIONS[section](**kwargs) for section, kwargs in values.items()})

    def to_run_config(self) -> dict[str, Scalar]:
        """The settings as Flower run-config entries (flat dashed keys, scalar values)."""
        return {
            key(name): getattr(getattr(self, section), name)
            for section, cls in SECTIONS.items()
            for name in section_fields(cls)
        }

    def replace(self, **changes: Any) -> RunSettings:
        """A copy with some fields changed (flat underscored names, e.g. ``replace(strategy="ties")``)."""
        grouped: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            section = SECTION_OF.get(name)
            if section is None:
                raise SettingsError(f"unknown setting {name!r}{_did_you_mean(name)}")
            grouped.setdefault(section, {})[name] = value
        sections = {section: dataclasses.replace(getattr(self, section), **kw) for section, kw in grouped.items()}
        return dataclasses.replace(self, **sections)

    @property
    def fisher_batch_count(self) -> int:
        """Batches for the Fisher diagonal ("auto": 4 when the strategy declares it needs Fisher, else none)."""
        if self.training.fisher_batches == "auto":
            return AUTO_FISHER_BATCHES if self.merge.spec.capabilities.needs_fisher else 0
        return int(self.training.fisher_batches)

    @property
    def gram_batch_count(self) -> int:
        """Batches for the Gram matrices ("auto": 4 when the strategy declares it needs them, else none)."""
        if self.training.gram_batches == "auto":
            return AUTO_GRAM_BATCHES if self.merge.spec.capabilities.needs_gram else 0
        return int(self.training.gram_batches)

    @property
    def uses_error_feedback(self) -> bool:
        """Whether clients carry dropped mass to the next round ("auto": for trim only; never in LoRA mode)."""
        c = self.compression
        if c.sparsifier == "none" or self.training.mode == "lora":
            return False
        if c.error_feedback == "auto":
            return c.sparsifier == "trim"
        return bool(c.error_feedback)


def _did_you_mean(name: str) -> str:
    """`` (did you mean a, b?)`` for a mistyped key: close spellings, else keys sharing its first letters."""
    close = difflib.get_close_matches(name, SECTION_OF, n=3, cutoff=0.6)
    close = close or sorted(k for k in SECTION_OF if k[:3] == name[:3])
    return f" (did you mean {', '.join(key(k) for k in close)}?)" if close else ""
