"""The space a run merges in: full weights, exact LoRA ΔW, or naive LoRA factors (the baseline).

- full: clients send τ (already sparsified); it is merged as is.
- LoRA exact: each client's factors become ΔWₖ = s·BₖAₖ under the base weight's name, then the run's
  sparsifier (TIES trim or DARE) is applied to ΔWₖ and the head's τ here, on the server; the strategy
  merges in ΔW space and the merged ΔW is added to the base.
- LoRA factors: A and B are merged like any tensor (FedIT / FlowerTune) and the merged factors are
  turned into s·B̄Ā afterwards; cross terms included, kept only for comparison.
- LoRA frozen A (FFA-LoRA): every node shares the round's A (:func:`~fedfuse.algebra.lora.frozen_lora_a`,
  redrawn here, never sent) and sends only B; the strategy merges the B's (and the head's τ) as sent, and
  a linear merge B̄ gives the exact merged ΔW = s·B̄·A (Σ wₖ·s·Bₖ·A = s·(Σ wₖBₖ)·A), kept as
  :class:`LowRank` factors under the base weight's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from fedfuse.algebra import (
    Sparsifier,
    Update,
    dare_seed_fn,
    factor_names,
    factors_to_deltas,
    lora_modules,
    sparsify_update,
    to_dense,
)
from fedfuse.algebra.lora import LORA_A_SUFFIX, LORA_B_SUFFIX, frozen_lora_a
from fedfuse.algebra.low_rank import FactoredUpdate, LowRank
from fedfuse.wire import DecodedUpdate

SpaceKind = Literal["full", "lora-exact", "lora-factors", "lora-frozen-a"]
SPACE_KINDS = ("full", "lora-exact", "lora-factors", "lora-frozen-a")


@dataclass(frozen=True)
class UpdateSpace:
    """Turns decoded updates into what the strategy merges, and the merge result into a task vector.

    Parameters
    ----------
    kind : {"full", "lora-exact", "lora-factors", "lora-frozen-a"}
        How updates are merged (see the module docstring).
    wire_shapes : mapping of str to shape
        The tensors an update carries (LoRA: each module's A and B factors, and the head; frozen A: B and the head).
    scale : float
        LoRA's s = alpha / rank (unused for full weights).
    sparsifier : Sparsifier
        Applied on the server to each ΔWₖ in LoRA-exact space, and to task vectors the server formed
        itself from plain weights (:meth:`server_sparsified`); clients sparsify their own full updates.
    seed, seed_scope
        The run seed and DARE seed scope, so server-side DARE masks are seeded like a client's (and a frozen A
        drawn like a node's).
    lora_a_shapes : mapping of str to shape
        Frozen A only: each module's ``"<module>.lora_A"`` shape (r, in), which nodes do not send.
    """

    kind: SpaceKind
    wire_shapes: Mapping[str, tuple[int, ...]]
    scale: float = 1.0
    sparsifier: Sparsifier = field(default_factory=Sparsifier)
    seed: int = 0
    seed_scope: str = "node"
    lora_a_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in SPACE_KINDS:
            raise ValueError(f"update space must be one of {', '.join(SPACE_KINDS)}; got {self.kind!r}")
        object.__setattr__(self, "wire_shapes", {name: tuple(shape) for name, shape in self.wire_shapes.items()})
        object.__setattr__(self, "lora_a_shapes", {name: tuple(shape) for name, shape in self.lora_a_shapes.items()})
        if self.kind == "lora-frozen-a":
            self._check_frozen_a()

    def _check_frozen_a(self) -> None:
        """Frozen A: B on the wire, no A, every B with an A shape it chains with, and B merged as sent."""
        if self.sparsifier.kind != "none":
            raise ValueError("a frozen-A LoRA space merges B as sent: its sparsifier must be none")
        sent_a = [name for name in self.wire_shapes if name.endswith(LORA_A_SUFFIX)]
        if sent_a:
            raise ValueError(f"frozen-A LoRA nodes do not send A, but the update space expects {sent_a[0]}")
        for module in self.frozen_a_modules:
            a_name, b_name = factor_names(module)
            a_shape = self.lora_a_shapes.get(a_name)
            if a_shape is None or len(a_shape) != 2 or a_shape[0] != self.wire_shapes[b_name][1]:
                raise ValueError(
                    f"frozen-A LoRA: {b_name} {self.wire_shapes[b_name]} needs the shape (r, in) of its A; "
                    f"got {a_shape}"
                )

    @property
    def frozen_a_modules(self) -> list[str]:
        """Frozen A only: the modules whose B the nodes send (sorted)."""
        return sorted(name.removesuffix(LORA_B_SUFFIX) for name in self.wire_shapes if name.endswith(LORA_B_SUFFIX))

    def frozen_a(self, module: str, round_number: int) -> torch.Tensor:
        """The A every node shared for ``module`` in round ``round_number`` (redrawn, as the nodes drew it)."""
        r, fan_in = self.lora_a_shapes[factor_names(module)[0]]
        return frozen_lora_a(self.seed, round_number, module, (r, fan_in))

    @classmethod
    def full(cls, shapes: Mapping[str, tuple[int, ...]]) -> UpdateSpace:
        """Updates merged as sent (full fine-tuning, or any plain task vectors)."""
        return cls("full", shapes)

    @property
    def merge_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors the strategy merges (LoRA exact: each module's ΔW instead of A and B)."""
        shapes = dict(self.wire_shapes)
        if self.kind != "lora-exact":
            return shapes
        for module in lora_modules(list(shapes)):
            a_name, b_name = factor_names(module)
            shapes[module + ".weight"] = (shapes.pop(b_name)[0], shapes.pop(a_name)[1])
        return shapes

    @property
    def wire_sparsifier(self) -> Sparsifier:
        """How clients shrink what they send: the run's sparsifier for full weights; LoRA factors go dense."""
        return self.sparsifier if self.kind == "full" else Sparsifier()

    @property
    def has_factors(self) -> bool:
        """Updates are exact LoRA ΔW = s·B·A merged as is (no server-side sparsifier): they can stay factored."""
        return self.kind == "lora-exact" and self.sparsifier.kind == "none"

    def merge_input(self, update: DecodedUpdate, *, factored: bool = False) -> tuple[FactoredUpdate, Update | None]:
        """The (tensors, fisher) the strategy folds for one decoded update.

        ``factored`` (with :attr:`has_factors`): each module's ΔW as :class:`LowRank` factors (s·B, A), not formed.
        """
        if self.kind != "lora-exact":
            return update.tensors, update.fisher
        dense = {name: to_dense(tensor) for name, tensor in update.tensors.items()}
        if factored and self.has_factors:
            return factored_deltas(dense, self.scale), None
        deltas = factors_to_deltas(dense, self.scale)
        return self.server_sparsified(deltas, round_number=update.header.round, node=str(update.header.node_id)), None

    def merge_grams(self, update: DecodedUpdate) -> dict[str, torch.Tensor]:
        """The update's Gram matrices under the names the strategy merges (LoRA exact: a module's ΔW)."""
        if self.kind != "lora-exact":
            return dict(update.grams)
        suffix = factor_names("")[0]
        return {
            (name.removesuffix(suffix) + ".weight" if name.endswith(suffix) else name): gram
            for name, gram in update.grams.items()
        }

    def server_sparsified(self, dense: Update, *, round_number: int, node: str) -> Update:
        """``dense`` shrunk on the server by this space's sparsifier, DARE seeded as the client would be."""
        seed_for = dare_seed_fn(self.seed, round_number, node, self.seed_scope)
        return sparsify_update({name: to_dense(t) for name, t in dense.items()}, self.sparsifier, seed_for)

    def task_vector(
        self, merged: Mapping[str, torch.Tensor], *, round_number: int | None = None
    ) -> dict[str, torch.Tensor | LowRank]:
        """The merged change to the global weights, by parameter name.

        Frozen A: each merged B̄ becomes ΔW = (s·B̄)·A, factored, under ``"<module>.weight"`` (A of ``round_number``).
        """
        if self.kind == "lora-factors":
            return {**factors_to_deltas(dict(merged), self.scale)}
        if self.kind != "lora-frozen-a":
            return dict(merged)
        if round_number is None:
            raise ValueError("a frozen-A LoRA merge needs the round number to redraw A")
        modules = {factor_names(module)[1]: module for module in self.frozen_a_modules}
        out: dict[str, torch.Tensor | LowRank] = {name: t for name, t in merged.items() if name not in modules}
        for b_name, module in modules.items():
            a = self.frozen_a(module, round_number)
            out[module + ".weight"] = LowRank(merged[b_name].float() * self.scale, a)
        return out


def factored_deltas(tensors: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor | LowRank]:
    """Every A/B pair as ΔW = (s·B)·A kept factored under ``"<module>.weight"``; other tensors pass through.

    B is scaled in place: the tensors are a decoded update's own (:meth:`UpdateSpace.merge_input`).
    """
    out: dict[str, torch.Tensor | LowRank] = {}
    paired: set[str] = set()
    for module in lora_modules(list(tensors)):
        a_name, b_name = factor_names(module)
        paired.update((a_name, b_name))
        b = tensors[b_name].float().mul_(scale)  # a decoded update's own tensor: scaled in place, not copied
        out[module + ".weight"] = LowRank(b, tensors[a_name].float())
    out.update({name: t for name, t in tensors.items() if name not in paired})
    return out


def split_frozen_a(
    shapes: Mapping[str, tuple[int, ...]],
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """A LoRA adapter's shapes as (what a frozen-A node sends, each module's A shape, which it does not send)."""
    a_shapes = {name: tuple(shape) for name, shape in shapes.items() if name.endswith(LORA_A_SUFFIX)}
    return {name: tuple(shape) for name, shape in shapes.items() if name not in a_shapes}, a_shapes
