"""Merges that choose their own coefficients: searched, greedy-soup, learned (AdaMerging), federated.

The pieces every method shares live here: :mod:`.coefficients` (K candidate task vectors, layer groups,
θ = θ_base + Σₖ c[k, g]·τₖ on a model, differentiable in c) and :mod:`.objectives` (what a coefficient
vector is scored or trained on: labelled loss, prediction entropy, exact match).
"""

from fedfuse.automerge.coefficients import Candidates, CoefficientModel, layer_groups, layer_index

__all__ = ["Candidates", "CoefficientModel", "layer_groups", "layer_index"]
