"""K candidate task vectors and a model whose weights are θ_base + Σₖ c[k, g(name)]·τₖ[name].

A coefficient matrix c has one row per candidate (a fine-tuned model, an adapter, an institution's update)
and one column per **layer group**: the transformer blocks split into G contiguous groups (G = 1: one
coefficient per candidate, "task-wise"; G = number of blocks: "layer-wise"). Parameters outside the blocks
(embeddings, final norm, heads) join the first or the last group. Task arithmetic at λ is c = λ everywhere.

:class:`CoefficientModel` keeps one copy of the model and the base values of the parameters the candidates
change; :meth:`CoefficientModel.load` writes a merge into it in place (for scoring by generation), and
:meth:`CoefficientModel.forward` runs the model with the merged parameters as a function of c
(``torch.func.functional_call``), so a loss or an entropy can be differentiated with respect to c.
LoRA candidates stay factors (:class:`~fedfuse.algebra.low_rank.LowRank`); B·A is formed per call, inside the
graph, so the gradient with respect to c is ⟨∂L/∂W, B·A⟩ without storing ΔW.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedfuse.algebra.low_rank import LowRank

Direction = torch.Tensor | LowRank
"""One candidate's change to one parameter: dense, or LoRA factors."""

_EMBEDDING = re.compile(r"embed|(?:^|\.)(?:wte|wpe)\.")
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer block a parameter belongs to (``model.layers.7.…`` → 7), None outside the blocks."""
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


def layer_groups(names: Sequence[str], count: int) -> dict[str, int]:
    """Each name's layer group among ``count`` contiguous groups of blocks (outside the blocks: first or last).

    Embeddings (a name with ``embed`` or ``wte``/``wpe``) join group 0, every other name outside the blocks
    (final norm, heads) the last group, whatever order the names come in; with no blocks every name is in 0.
    """
    if count < 1:
        raise ValueError(f"layer groups must be at least 1, got {count}")
    indices = [layer_index(name) for name in names]
    blocks = sorted({i for i in indices if i is not None})
    if not blocks:
        return dict.fromkeys(names, 0)
    count = min(count, len(blocks))
    position = {block: rank * count // len(blocks) for rank, block in enumerate(blocks)}
    return {
        name: position[index] if index is not None else (0 if _EMBEDDING.search(name) else count - 1)
        for name, index in zip(names, indices, strict=True)
    }


def _dense(direction: Direction) -> torch.Tensor:
    return direction.b @ direction.a if isinstance(direction, LowRank) else direction


def _norm(direction: Direction) -> float:
    return float(torch.linalg.vector_norm(_dense(direction).float()))


@dataclass(frozen=True)
class Candidates:
    """K candidates' task vectors over parameter names, with each name's layer group.

    ``vectors[k][name]`` is candidate k's change to ``name`` (a candidate may leave a name out: it adds 0).
    """

    labels: tuple[str, ...]
    vectors: tuple[Mapping[str, Direction], ...]
    groups: Mapping[str, int]
    num_groups: int

    @classmethod
    def build(
        cls, labels: Sequence[str], vectors: Sequence[Mapping[str, Direction]], num_groups: int = 1
    ) -> Candidates:
        """Candidates from their task vectors; names are ordered as the first candidate gives them."""
        if len(labels) != len(vectors) or not vectors:
            raise ValueError(
                f"need one label per candidate and at least one candidate, got {len(labels)} labels "
                f"for {len(vectors)} task vectors"
            )
        names = list(dict.fromkeys(name for vector in vectors for name in vector))
        groups = layer_groups(names, num_groups)
        return cls(tuple(labels), tuple(vectors), groups, 1 + max(groups.values(), default=0))

    @property
    def names(self) -> list[str]:
        """Every parameter some candidate changes."""
        return list(self.groups)

    def __len__(self) -> int:
        return len(self.vectors)

    def uniform(self, value: float) -> torch.Tensor:
        """The K×G coefficients all equal to ``value`` (task arithmetic at λ = value)."""
        return torch.full((len(self), self.num_groups), float(value))

    def check(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``coefficients`` as a K×G float32 (or float64) tensor (a K vector broadcasts over the groups)."""
        c = torch.as_tensor(coefficients)
        c = c if c.dtype == torch.float64 else c.float()
        if c.ndim == 1 and c.shape[0] == len(self):
            c = c[:, None].expand(len(self), self.num_groups)
        if tuple(c.shape) != (len(self), self.num_groups):
            raise ValueError(
                f"coefficients must be {len(self)}×{self.num_groups} (candidates × layer groups), got {tuple(c.shape)}"
            )
        return c

    def change(self, name: str, coefficients: torch.Tensor) -> torch.Tensor:
        """Σₖ c[k, g(name)]·τₖ[name] (differentiable in ``coefficients``)."""
        group = self.groups[name]
        total: torch.Tensor | None = None
        for k, vector in enumerate(self.vectors):
            if name in vector:
                term = coefficients[k, group] * _dense(vector[name]).to(coefficients.dtype)
                total = term if total is None else total + term
        assert total is not None
        return total

    def merged(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """The merged task vector Σₖ c[k, g]·τₖ, every name dense (no gradient)."""
        c = self.check(coefficients)
        with torch.no_grad():
            return {name: self.change(name, c) for name in self.names}

    def norms(self) -> list[float]:
        """‖τₖ‖ of each candidate (for reports)."""
        return [sum(_norm(d) ** 2 for d in vector.values()) ** 0.5 for vector in self.vectors]


class CoefficientModel:
    """One model whose changed parameters are θ_base + Σₖ c[k, g]·τₖ, loaded in place or as a function of c."""

    def __init__(self, model: torch.nn.Module, candidates: Candidates) -> None:
        self.model = model.eval()
        self.candidates = candidates
        parameters = dict(model.named_parameters())
        unknown = [name for name in candidates.names if name not in parameters]
        if unknown:
            raise ValueError(f"the candidates change parameters the model does not have: {unknown[:3]}")
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self._parameters = parameters
        self.base = {name: parameters[name].detach().clone() for name in candidates.names}

    def parameters_for(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """The changed parameters at ``coefficients`` (differentiable in them), in the model's dtype."""
        c = self.candidates.check(coefficients)
        return {
            name: (base.to(c.dtype) + self.candidates.change(name, c).reshape(base.shape)).to(base.dtype)
            for name, base in self.base.items()
        }

    def forward(self, coefficients: torch.Tensor, **inputs: Any) -> Any:
        """The model's output with the merged parameters at ``coefficients`` (gradients flow to them)."""
        return torch.func.functional_call(self.model, self.parameters_for(coefficients), args=(), kwargs=inputs)

    @torch.no_grad()
    def load(self, coefficients: torch.Tensor | None) -> None:
        """Write the merge at ``coefficients`` into the model in place (None: the base model)."""
        if coefficients is None:
            for name, base in self.base.items():
                self._parameters[name].copy_(base)
            return
        for name, value in self.parameters_for(coefficients).items():
            self._parameters[name].copy_(value)

    @torch.no_grad()
    def load_task_vector(self, tau: Mapping[str, torch.Tensor], lam: float = 1.0) -> None:
        """Write θ_base + λ·τ for any merged task vector τ over (a subset of) the candidates' names."""
        self.load(None)
        for name, delta in tau.items():
            if name not in self.base:
                raise ValueError(f"task vector names a parameter the candidates do not change: {name}")
            base = self.base[name]
            self._parameters[name].copy_(base + lam * delta.to(base.dtype).reshape(base.shape))
