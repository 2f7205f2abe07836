"""A client's uplink, written once: trained update → shrink with error feedback → local DP → header → encode.

Every fedfuse sender goes through :func:`encode_uplink`: :func:`fedfuse.client.mods.task_vector_mod`
(which fedfuse's own ClientApp uses, as any Flower app can), a tier gateway's members and the
Flower-free local round of the benches. Training hands it a :class:`TrainedUpdate` — the task vector
τ (shrunk here) or LoRA factors (sent as they are: the server forms ΔW and sparsifies there), with
the optional Fisher diagonal and Gram matrices — and :class:`UpdateFacts` say who sends it for
which round. Signing is :func:`fedfuse.client.mods.signing_mod`'s. No Flower here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, cast

import torch

from fedfuse.algebra import Sparsifier, UpdateTensor, dare_seed_fn
from fedfuse.algebra.noise import add_gaussian_noise
from fedfuse.algebra.robust import clip_factor, scale_update, update_norm
from fedfuse.client.error_feedback import ErrorFeedback, shrink_update
from fedfuse.rounds.dp import noise_generator
from fedfuse.wire import UPDATE_VALUE_DTYPES, UpdateHeader, encode_update
from fedfuse.wire.header import MetricValue

UpdateKind = Literal["task-vector", "factors"]


@dataclass(frozen=True)
class LocalDP:
    """Local DP: clip each update to ``clip_norm`` C, add N(0, σ²C²) on every entry it carries.

    ``noise_seed`` < 0 draws the noise from the operating system (as DP needs); a test may fix it.
    """

    clip_norm: float
    noise_multiplier: float
    noise_seed: int = -1


@dataclass(frozen=True)
class Uplink:
    """How a node shrinks and encodes its task vectors (the ``task_vector_mod`` options).

    ``seed`` and ``seed_scope`` seed DARE masks per (node, round) or per round; ``error_feedback``
    carries what the sparsifier dropped into the next round; ``local_dp`` noises each update.
    """

    sparsifier: Sparsifier = field(default_factory=lambda: Sparsifier("trim", 0.1))
    wire_dtype: str = "float16"
    error_feedback: bool = True
    seed: int = 0
    seed_scope: str = "node"
    local_dp: LocalDP | None = None

    def __post_init__(self) -> None:
        if self.wire_dtype not in UPDATE_VALUE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {', '.join(UPDATE_VALUE_DTYPES)}; got {self.wire_dtype!r}")

    @property
    def uses_error_feedback(self) -> bool:
        """Whether task vectors keep a residual between rounds (a dense run has nothing to carry)."""
        return self.error_feedback and self.sparsifier.kind != "none"


@dataclass(frozen=True)
class UpdateFacts:
    """Who sends an update for which round: the header's facts.

    ``node`` is the id the header carries; ``institution`` (default ``node``) seeds DARE masks and
    local-DP noise and names the node's residual files.
    """

    run_id: str
    round_number: int
    base_fingerprint: str
    node: str
    institution: str = ""
    tier: str = ""

    @property
    def seed_name(self) -> str:
        return self.institution or self.node


@dataclass(frozen=True)
class TrainedUpdate:
    """What local training hands the uplink.

    ``tensors`` is the task vector τ (``kind="task-vector"``: shrunk, error-fed and noised here) or a
    LoRA update (``kind="factors"``: every module's A and B and the head's τ, sent dense as they are).
    ``metrics`` go into the header as they are (numbers and strings); ``fisher`` and ``grams`` are
    optional (Fisher diagonal per tensor; in × in input Gram matrix per 2-D weight).
    """

    tensors: dict[str, torch.Tensor]
    num_examples: int
    kind: UpdateKind = "task-vector"
    metrics: Mapping[str, MetricValue] = field(default_factory=dict)
    fisher: dict[str, torch.Tensor] | None = None
    grams: dict[str, torch.Tensor] | None = None

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> TrainedUpdate:
        """The same update with other tensors (a simulated attacker's)."""
        return replace(self, tensors=tensors)


def locally_noised(
    tensors: Mapping[str, UpdateTensor], dp: LocalDP, round_number: int, node: str
) -> dict[str, UpdateTensor]:
    """Local DP: the update clipped to C, then N(0, σ²C²) on every entry it carries (DARE: its round mask)."""
    factor = clip_factor(update_norm(dict(tensors)), dp.clip_norm)
    clipped = cast(dict[str, UpdateTensor], scale_update(dict(tensors), factor))  # no LowRank in, none out
    generator = noise_generator(dp.noise_seed, round_number, f"local|{node}")
    std = dp.noise_multiplier * dp.clip_norm
    return {name: add_gaussian_noise(clipped[name], std, generator) for name in sorted(clipped)}


def shrunk(
    update: TrainedUpdate, facts: UpdateFacts, uplink: Uplink, feedback: ErrorFeedback | None
) -> tuple[dict[str, UpdateTensor], Sparsifier]:
    """What goes on the wire and how it was shrunk: factors as they are, τ shrunk (error-fed, noised)."""
    if update.kind == "factors":
        return dict(update.tensors), Sparsifier()
    seed_for = dare_seed_fn(uplink.seed, facts.round_number, facts.seed_name, uplink.seed_scope)
    tensors = shrink_update(update.tensors, uplink.sparsifier, seed_for, feedback)
    if uplink.local_dp is not None:
        tensors = locally_noised(tensors, uplink.local_dp, facts.round_number, facts.seed_name)
    return tensors, uplink.sparsifier


def encode_uplink(
    update: TrainedUpdate, facts: UpdateFacts, uplink: Uplink, feedback: ErrorFeedback | None = None
) -> bytes:
    """The update's payload: shrunk (``feedback``: the node's residual store, updated in place), headed, encoded."""
    tensors, sparsifier = shrunk(update, facts, uplink, feedback)
    header = UpdateHeader(
        run_id=facts.run_id,
        round=facts.round_number,
        base_fingerprint=facts.base_fingerprint,
        node_id=facts.node,
        num_examples=update.num_examples,
        sparsifier=sparsifier,
        metrics=update.metrics,
        tier=facts.tier,
    )
    return encode_update(
        tensors, header=header, value_dtype=uplink.wire_dtype, fisher=update.fisher, grams=update.grams
    )
