"""The shared pieces of automated merging: layer groups, θ_base + Σ c·τ, and the objectives' gradients."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama

from fedfuse.algebra.low_rank import LowRank
from fedfuse.automerge import Candidates, CoefficientModel, layer_groups, layer_index
from fedfuse.automerge.objectives import Rows, value, value_and_gradient

pytestmark = pytest.mark.unit


def test_layer_groups_split_blocks_contiguously_and_put_the_rest_at_the_ends():
    names = ["embed.weight", *[f"model.layers.{i}.q.weight" for i in range(6)], "norm.weight", "lm_head.weight"]
    groups = layer_groups(names, 3)
    assert [groups[f"model.layers.{i}.q.weight"] for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert groups["embed.weight"] == 0 and groups["norm.weight"] == 2 and groups["lm_head.weight"] == 2
    assert layer_groups(list(reversed(names)), 3) == groups  # placement does not depend on the order given
    assert set(layer_groups(names, 1).values()) == {0}
    assert max(layer_groups(names, 50).values()) == 5  # never more groups than blocks
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12 and layer_index("lm_head.weight") is None


def _candidates(model: torch.nn.Module, groups: int) -> Candidates:
    generator = torch.Generator().manual_seed(0)
    targets = [n for n, p in model.named_parameters() if n.endswith(("q_proj.weight", "v_proj.weight"))]
    vectors = []
    for k in range(3):
        vector: dict[str, torch.Tensor | LowRank] = {}
        for name in targets:
            out, inp = dict(model.named_parameters())[name].shape
            b, a = torch.randn(out, 2, generator=generator), torch.randn(2, inp, generator=generator)
            vector[name] = LowRank(0.05 * b, a) if k % 2 else 0.05 * b @ a
        vectors.append(vector)
    return Candidates.build(["a", "b", "c"], vectors, num_groups=groups)


def _rows() -> Rows:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 60, (4, 10), generator=generator)
    targets = torch.full_like(ids, -100)
    targets[:, 5:] = ids[:, 5:]
    return Rows(ids, torch.ones_like(ids), targets, causal=True)


@pytest.mark.parametrize("objective", ["loss", "entropy"])
def test_the_gradient_in_the_coefficients_matches_finite_differences(objective):
    torch.manual_seed(0)
    model = CoefficientModel(tiny_llama(vocab_size=64).double(), _candidates(tiny_llama(vocab_size=64), 2))
    c = torch.tensor([[0.3, 0.6], [0.9, -0.2], [0.5, 0.4]], dtype=torch.float64)
    rows = _rows()
    _, gradient, _ = value_and_gradient(model, c, rows, objective, batch_size=3)
    for k, g in [(0, 0), (1, 1), (2, 0)]:
        step = torch.zeros_like(c)
        step[k, g] = 1e-4
        numeric = (value(model, c + step, rows, objective) - value(model, c - step, rows, objective)) / 2e-4
        assert gradient[k, g].item() == pytest.approx(numeric, rel=1e-3, abs=1e-6)


def test_load_writes_the_same_weights_the_function_uses_and_restores_the_base():
    model = tiny_llama(vocab_size=64)
    candidates = _candidates(model, 1)
    merged = CoefficientModel(model, candidates)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    c = torch.tensor([0.5, 1.0, -0.5])
    merged.load(c)
    for name, expected in merged.parameters_for(c).items():
        assert torch.allclose(dict(model.named_parameters())[name], expected)
        assert not torch.allclose(expected, before[name])
    merged.load(None)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_coefficients_of_the_wrong_shape_are_refused_in_one_line():
    candidates = _candidates(tiny_llama(vocab_size=64), 2)
    with pytest.raises(ValueError, match="3×2"):
        candidates.check(torch.ones(2, 2))
