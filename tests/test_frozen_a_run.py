"""A frozen-A LoRA run through fedfuse's server: nodes send B only, the server broadcasts rank-r factors."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict
from seeded_grid import SeededGrid

from fedfuse.algebra import factor_names
from fedfuse.algebra.lora import frozen_lora_a
from fedfuse.server.app import run_server
from fedfuse.server.run_checkpoint import load_checkpoint
from fedfuse.settings import RunSettings
from fedfuse.training.run_model import lora_scale, update_shapes

pytestmark = pytest.mark.integration

RUN = {
    "task": "classify",
    "labels": "cardiac,respiratory,musculoskeletal",
    "mode": "lora",
    "lora-aggregation": "frozen-a",
    "strategy": "fedavg",
    "lora-rank": 2,
    "max-length": 16,
    "fraction-evaluate": 0.0,
    "num-server-rounds": 2,
    "timeout": 30.0,
}


def test_two_frozen_a_fedavg_rounds_broadcast_rank_r_factors_of_the_shared_a(server_identity, tmp_path) -> None:
    settings = RunSettings.from_run_config({**RUN, "output-dir": str(tmp_path)})
    space = settings.update_space(update_shapes(settings), lora_scale(settings))
    grid = SeededGrid(dict(space.wire_shapes))  # three nodes reply with seeded B's and head τ, no A
    context = Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config={})
    history = run_server(grid, context, settings)  # type: ignore[arg-type]
    rounds = history["rounds"]
    assert [r["accepted"] for r in rounds] == [3, 3] and not any(r["rejections"] for r in rounds)
    modules = space.frozen_a_modules
    rank = settings.training.lora_rank
    head = sum(torch.Size(s).numel() for n, s in space.wire_shapes.items() if not n.endswith(".lora_B"))
    factor_entries = sum(
        rank * (space.wire_shapes[factor_names(m)[1]][0] + space.lora_a_shapes[factor_names(m)[0]][1]) for m in modules
    )
    for sent in (r["broadcast"] for r in rounds):
        assert sent["mode"] == "auto" and sent["factored"] == len(modules)
        assert sent["delta_bytes"] == 4 * (factor_entries + head)  # rank r, not K·r = 3r: one shared A
    # the run's change lies in the span of the rounds' shared A's: its rows are combinations of A₁'s and A₂'s rows
    change = load_checkpoint(tmp_path).weights
    module = modules[0]
    fan_in = space.lora_a_shapes[factor_names(module)[0]][1]
    span = torch.cat([frozen_lora_a(settings.run.seed, n, module, (rank, fan_in)) for n in (1, 2)]).double()
    delta = change[module + ".weight"].double()
    assert float(delta.abs().max()) > 0
    residual = delta - delta @ torch.linalg.pinv(span) @ span
    assert float(residual.abs().max()) < 1e-5 * float(delta.abs().max())
