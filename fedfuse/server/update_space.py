"""The space a run merges in: full weights, exact LoRA ΔW, or naive LoRA factors (the baseline).

- full: clients send τ (already sparsified); it is merged as is.
- LoRA exact: each client's factors become ΔWₖ = s·BₖAₖ under the base weight's name, then the run's
  sparsifier (TIES trim or DARE) is applied to ΔWₖ and the head's τ here, on the server; the strategy
  merges in ΔW space and the merged ΔW is added to the base.
- LoRA factors: A and B are merged like any tensor (FedIT / FlowerTune) and the merged factors are
  turned into s·B̄Ā afterwards; cross terms included, kept only for comparison.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedfuse.algebra import (
    dare_seed_fn,
    factor_names,
    factors_to_deltas,
    lora_modules,
    sparsify_update,
    to_dense,
)
from fedfuse.server.aggregator import RoundAggregator
from fedfuse.settings import RunSettings
from fedfuse.strategies import MergeStrategy
from fedfuse.wire import DecodedUpdate, Expectation


class UpdateSpace:
    """Turns decoded updates into what the strategy merges, and the merge result into a task vector."""

    def __init__(self, settings: RunSettings, wire_shapes: Mapping[str, tuple[int, ...]], scale: float) -> None:
        self.settings = settings
        self.wire_shapes = dict(wire_shapes)
        self.scale = scale
        self.kind = "full" if settings.mode == "full" else f"lora-{settings.lora_aggregation}"

    def aggregator(self, strategy: MergeStrategy, expect: Expectation, round_number: int) -> RoundAggregator:
        """A round aggregator that folds this space's merge inputs (and gateways' partial states)."""
        return RoundAggregator(
            strategy,
            expect,
            weighting=self.settings.weighting,
            transform=lambda update: self.merge_input(update, round_number),
            partial_shapes=self.merge_shapes,
        )

    @property
    def merge_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors the strategy merges (LoRA exact: each module's ΔW instead of A and B)."""
        if self.kind != "lora-exact":
            return dict(self.wire_shapes)
        shapes = dict(self.wire_shapes)
        for module in lora_modules(list(shapes)):
            a_name, b_name = factor_names(module)
            shapes[module + ".weight"] = (shapes.pop(b_name)[0], shapes.pop(a_name)[1])
        return shapes

    def merge_input(self, update: DecodedUpdate, round_number: int) -> tuple[dict, dict | None]:
        """The (tensors, fisher) the strategy folds for one decoded update."""
        if self.kind != "lora-exact":
            return update.tensors, update.fisher
        dense = {name: to_dense(tensor) for name, tensor in update.tensors.items()}
        deltas = factors_to_deltas(dense, self.scale)
        seed_for = dare_seed_fn(self.settings.seed, round_number, str(update.header.node_id), self.settings.seed_scope)
        return sparsify_update(deltas, self.settings.sparsifier_spec, seed_for), None

    def task_vector(self, merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The merged change to the global weights, by parameter name."""
        if self.kind == "lora-factors":
            return factors_to_deltas(dict(merged), self.scale)
        return dict(merged)
