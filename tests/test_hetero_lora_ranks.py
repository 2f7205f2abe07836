"""Federated LoRA with heterogeneous ranks: nodes of different ``lora-rank`` merge exactly, with no rejection.

The server expects every factor at the run's ``lora-rank`` r (the wire checks shapes strictly); a node
that trains at rₖ ≤ r (node config ``lora-rank``) sends A and B·(r/rₖ) zero-padded to rank r
(``to_run_rank``), so the server's ΔW = (α/r)·B·A is the node's own (α/rₖ)·Bₖ·Aₖ.
"""

from __future__ import annotations

import pytest
import torch

from fedfuse.algebra import factor_names, lora_delta, to_dense
from fedfuse.client.app import shard_of
from fedfuse.client.local_round import Shard, node_settings, run_local_round, to_run_rank
from fedfuse.rounds import RoundEngine
from fedfuse.settings import RunSettings, build_merge_strategy
from fedfuse.settings.fields import SettingsError
from fedfuse.wire import Expectation, UpdateHeader, decode_update, encode_update

pytestmark = pytest.mark.unit

OUT, IN, ALPHA, RUN_RANK = 12, 10, 8.0, 4
MODULES = ("layer.0.query", "layer.0.value")
FINGERPRINT = "f" * 64


def run_settings(**extra: object) -> RunSettings:
    return RunSettings.from_run_config({}, **{"lora-rank": RUN_RANK, "lora-alpha": ALPHA, **extra})


def wire_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for module in MODULES:
        a_name, b_name = factor_names(module)
        shapes[a_name], shapes[b_name] = (RUN_RANK, IN), (OUT, RUN_RANK)
    return shapes


def node_factors(seed: int, rank: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for module in MODULES:
        a_name, b_name = factor_names(module)
        factors[a_name] = torch.randn(rank, IN, generator=generator)
        factors[b_name] = torch.randn(OUT, rank, generator=generator)
    return factors


def engine(settings: RunSettings, shapes: dict[str, tuple[int, ...]], strategy: str = "fedavg") -> RoundEngine:
    settings = settings.replace(strategy=strategy)
    space = settings.update_space(shapes, settings.training.lora_alpha / settings.training.lora_rank)
    return settings.round_engine(space, round_number=1, run_id="run", base_fingerprint=FINGERPRINT, bind_senders=False)


def payload(node: str, tensors: dict[str, torch.Tensor], examples: int) -> bytes:
    header = UpdateHeader(run_id="run", round=1, base_fingerprint=FINGERPRINT, node_id=node, num_examples=examples)
    return encode_update(tensors, header=header)


def test_native_lower_rank_factors_do_not_fit_the_run_shapes() -> None:
    """Why nodes pad: the wire checks every factor against the run's rank."""
    merge_round = engine(run_settings(), wire_shapes())
    rejection = merge_round.offer(payload("n2", node_factors(0, 2), 10))
    assert rejection is not None and rejection.reason == "wrong_shape"


@pytest.mark.parametrize("strategy", ["fedavg", "task_arithmetic"])
def test_rank_2_and_rank_4_nodes_merge_without_rejection_to_the_weighted_mean_of_their_deltas(strategy) -> None:
    settings = run_settings()
    merge_round = engine(settings, wire_shapes(), strategy)
    nodes = {"n2": (2, 30, node_factors(1, 2)), "n4": (4, 10, node_factors(2, 4))}
    for node, (rank, examples, factors) in nodes.items():
        sent = to_run_rank(factors, settings, rank)
        assert all(tuple(t.shape) == wire_shapes()[name] for name, t in sent.items())
        assert merge_round.offer(payload(node, sent, examples)) is None
    assert merge_round.rejections == []
    merged = merge_round.merged_task_vector()
    total = sum(examples for _, examples, _ in nodes.values())
    for module in MODULES:
        a_name, b_name = factor_names(module)
        own = {node: lora_delta(f[a_name], f[b_name], ALPHA / rank) for node, (rank, _, f) in nodes.items()}
        weighted = sum(examples * own[node] for node, (_, examples, _) in nodes.items())
        expected = weighted / total if strategy == "fedavg" else weighted  # task arithmetic: Σ wₖ·ΔWₖ
        torch.testing.assert_close(merged[module + ".weight"], expected, atol=1e-5, rtol=1e-5)


def test_a_ties_round_over_mixed_ranks_has_no_rejection() -> None:
    settings = run_settings(sparsifier="trim", density=0.5)
    merge_round = engine(settings, wire_shapes(), "ties")
    for node, rank in (("n2", 2), ("n3", 3), ("n4", 4)):
        sent = to_run_rank(node_factors(rank, rank), settings, rank)
        assert merge_round.offer(payload(node, sent, 5)) is None
    assert merge_round.rejections == [] and len(merge_round.accepted) == 3


def test_node_rank_is_bounded_by_the_run_rank_and_kept_by_gateway_members() -> None:
    settings = run_settings()
    assert node_settings(settings, Shard(0, 2, "a", lora_rank=2)).training.lora_rank == 2
    assert node_settings(settings, Shard(0, 2, "a")) is settings
    assert node_settings(run_settings(mode="full"), Shard(0, 2, "a", lora_rank=2)).training.mode == "full"
    with pytest.raises(ValueError, match="exceeds the run's lora-rank 4"):
        node_settings(settings, Shard(0, 2, "a", lora_rank=8))
    assert Shard(0, 2, "g", lora_rank=2).member_shard(1, 3).lora_rank == 2
    with pytest.raises(ValueError, match="lora-rank"):
        Shard(0, 2, "a", lora_rank=-1)


def test_real_clients_at_ranks_2_and_4_are_both_accepted_by_the_server_engine() -> None:
    from fedfuse.training.run_model import lora_scale, update_shapes

    settings = RunSettings.from_run_config(
        {}, **{"local-steps": 1, "batch-size": 4, "max-length": 16, "lora-rank": 4, "client-eval-examples": 4}
    )
    shapes = update_shapes(settings)
    space = settings.update_space(shapes, lora_scale(settings))
    merge_round = RoundEngine(build_merge_strategy(settings), space, round_number=1, run_id="r", check_sparsifier=True)
    shards = [Shard(0, 2, "rank-2", lora_rank=2), Shard(1, 2, "rank-4")]
    for shard in shards:
        result = run_local_round(settings, {}, round_number=1, run_id="r", shard=shard)
        sent = decode_update(result.payload, expect=Expectation(shapes)).tensors
        padded = [to_dense(t)[2:] for name, t in sent.items() if name.endswith(".lora_A")]
        assert padded and all(bool((rows == 0).all()) == (shard.lora_rank == 2) for rows in padded)
        assert merge_round.offer(result.payload) is None
    assert merge_round.rejections == []
    assert sorted(merge_round.accepted) == ["rank-2", "rank-4"]
    merged = merge_round.merged_task_vector()
    assert all(bool(torch.isfinite(to_dense(t)).all()) for t in merged.values())


class _Context:
    """The two fields of a Flower Context that ``shard_of`` reads."""

    def __init__(self, node_config: dict[str, object]) -> None:
        self.node_config = node_config
        self.node_id = 7


def test_a_simulation_gives_nodes_their_lora_node_ranks_unless_their_node_config_sets_one() -> None:
    settings = run_settings(**{"lora-node-ranks": "1,2"})
    ranks = [shard_of(_Context({"partition-id": i, "num-partitions": 3}), settings).lora_rank for i in range(3)]
    assert ranks == [1, 2, 1]
    own = _Context({"partition-id": 1, "num-partitions": 3, "lora-rank": 3})
    assert shard_of(own, settings).lora_rank == 3
    assert shard_of(_Context({"partition-id": 1, "num-partitions": 3}), run_settings()).lora_rank == 0


@pytest.mark.parametrize("ranks", ["0,2", "2,5", "2,x"])
def test_lora_node_ranks_outside_one_to_the_run_rank_are_refused_in_one_line(ranks) -> None:
    with pytest.raises(SettingsError, match=r"^lora-node-ranks must be"):
        run_settings(**{"lora-node-ranks": ranks})


def test_a_node_trains_at_its_lora_node_rank_in_settings_that_stay_valid() -> None:
    settings = run_settings(**{"lora-node-ranks": "2,4"})
    shard = Shard(0, 2, "partition-0", lora_rank=settings.training.node_rank(0))
    assert node_settings(settings, shard).training.lora_rank == 2
