"""Specification of client-side error feedback: what the sparsifier dropped reaches the server later.

Rounds use task vectors τ_r = g + ξ_r: a small consistent drift g (the direction a client keeps
pushing, entry by entry below the trim threshold) plus fresh N(0, 1) noise. Without feedback a trim
drops most of g every round, so the gap ‖Σ τ − Σ sent‖ grows linearly with the number of rounds;
with feedback the gap is the residual, which stays below a bound that does not depend on R.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from fedfuse.algebra import SparseTensor, Sparsifier, dare_indices, dare_seed_fn, sparsify_update, to_dense
from fedfuse.client import ErrorFeedback

# Tiers are marked per test here: this module mixes integration and unit tests.

SHAPES = {"layer.weight": (40, 40), "layer.bias": (400,)}


def task_vectors(rounds: int, seed: int = 0, drift: float = 0.3) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    g = {n: drift * torch.randn(s, generator=gen).sign() for n, s in SHAPES.items()}
    return [{n: g[n] + torch.randn(s, generator=gen) for n, s in SHAPES.items()} for _ in range(rounds)]


def norm(update) -> float:
    return math.sqrt(sum(float(to_dense(t).double().pow(2).sum()) for t in update.values()))


def gaps(ef: ErrorFeedback, taus, feedback: bool = True) -> tuple[list[float], list[float]]:
    """‖Σ τ − Σ sent‖ and ‖residual‖ after each round; ``feedback=False`` resets the residual every round."""
    true = {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()}
    sent_sum = {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()}
    gap, residual = [], []
    for r, tau in enumerate(taus):
        if not feedback:
            ef.reset()
        sent = ef.compress(tau, dare_seed_fn(0, r, "client-1"))
        for n in SHAPES:
            true[n] += tau[n].double()
            sent_sum[n] += to_dense(sent[n]).double()
        gap.append(norm({n: true[n] - sent_sum[n] for n in SHAPES}))
        residual.append(norm(ef.residual))
    return gap, residual


def contraction_bound(delta: float, taus) -> float:
    """R-independent bound on ‖r‖ for a δ-contractive compressor.

    ‖r'‖ ≤ √(1−δ)(‖τ‖ + ‖r‖) ⇒ ‖r‖ ≤ √(1−δ)/(1−√(1−δ))·max‖τ‖.
    """
    q = math.sqrt(1 - delta)
    return q / (1 - q) * max(norm(t) for t in taus)


@pytest.mark.unit
def test_what_was_sent_plus_the_residual_is_everything_that_was_produced() -> None:
    taus = task_vectors(20)
    for sparsifier, rescale in [
        (Sparsifier("trim", 0.1), False),
        (Sparsifier("trim", 0.05, scope="global"), False),
        (Sparsifier("dare", 0.2), False),
        (Sparsifier("dare", 0.8), True),
        (Sparsifier("none"), False),
    ]:
        ef = ErrorFeedback(sparsifier, dare_rescale=rescale)
        total = {n: torch.zeros(s) for n, s in SHAPES.items()}
        for r, tau in enumerate(taus):
            for n, t in ef.compress(tau, dare_seed_fn(0, r, 1)).items():
                total[n] += to_dense(t)
        for n in SHAPES:
            produced = sum(t[n] for t in taus)
            torch.testing.assert_close(total[n] + ef.residual[n], produced, rtol=1e-5, atol=1e-4)


@pytest.mark.unit
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_with_trim_feedback_the_gap_stays_bounded_and_without_it_grows_with_the_rounds(scope) -> None:
    density = 0.1
    taus = task_vectors(50)
    with_feedback, residuals = gaps(ErrorFeedback(Sparsifier("trim", density, scope=scope)), taus)
    without, _ = gaps(ErrorFeedback(Sparsifier("trim", density, scope=scope)), taus, feedback=False)
    delta = min(int(density * math.prod(s)) / math.prod(s) for s in SHAPES.values())
    bound = contraction_bound(delta, taus)
    for gap, residual in zip(with_feedback, residuals, strict=False):
        assert gap == pytest.approx(residual, rel=1e-4)
        assert residual <= bound
    assert with_feedback[49] < 1.5 * with_feedback[4]
    assert without[49] > 3 * without[4]
    assert with_feedback[49] < without[49] / 5


@pytest.mark.unit
@pytest.mark.parametrize("density", [0.1, 0.25, 0.5])
def test_with_dare_feedback_the_residual_is_bounded_for_every_density(density) -> None:
    """Unrescaled drops are contractive in expectation (δ = density): the residual settles at a level set
    by the density, while without feedback the dropped share of the drift accumulates."""
    taus = task_vectors(200, seed=1)
    with_feedback, residuals = gaps(ErrorFeedback(Sparsifier("dare", density)), taus)
    without, _ = gaps(ErrorFeedback(Sparsifier("dare", density)), taus[:50], feedback=False)
    bound = contraction_bound(density, taus)
    assert max(residuals) <= bound
    late, early = sum(residuals[150:]) / 50, sum(residuals[25:50]) / 25
    assert late < 1.5 * early
    assert without[49] > 3 * without[4]
    assert with_feedback[49] < without[49] / 2


@pytest.mark.unit
def test_rescaled_dare_feedback_is_bounded_above_density_one_half() -> None:
    """At density 0.75 the rescaled drop is contractive in expectation ((1−d)/d = 1/3 < 1)."""
    taus = task_vectors(200, seed=2)
    _, residuals = gaps(ErrorFeedback(Sparsifier("dare", 0.75), dare_rescale=True), taus)
    assert max(residuals) <= contraction_bound(1 - 1 / 3, taus)
    assert sum(residuals[150:]) / 50 < 1.5 * sum(residuals[25:50]) / 25


@pytest.mark.unit
@pytest.mark.parametrize("density", [0.1, 0.5])
def test_rescaled_dare_feedback_is_refused_where_it_diverges(density) -> None:
    with pytest.raises(ValueError, match="dare_rescale=False"):
        ErrorFeedback(Sparsifier("dare", density), dare_rescale=True)


@pytest.mark.unit
def test_why_rescaled_dare_feedback_is_refused_the_residual_explodes() -> None:
    """r' = (τ + r)(1 − m/d) has E r'² = (1−d)/d·E(τ + r)²: at d = 0.25 the residual triples in variance
    every round. Simulated here with the algebra directly, since ErrorFeedback refuses it."""
    taus = task_vectors(30, seed=3)
    residual = {n: torch.zeros(s) for n, s in SHAPES.items()}
    for r, tau in enumerate(taus):
        corrected = {n: tau[n] + residual[n] for n in SHAPES}
        sent = sparsify_update(corrected, Sparsifier("dare", 0.25), dare_seed_fn(0, r, 1))
        residual = {n: corrected[n] - to_dense(sent[n]) for n in SHAPES}
    assert norm(residual) > 1000 * max(norm(t) for t in taus)


@pytest.mark.unit
def test_plain_dare_without_feedback_is_unbiased_so_its_gap_grows_like_the_square_root_of_r() -> None:
    taus = task_vectors(200, seed=4)
    without, _ = gaps(ErrorFeedback(Sparsifier("dare", 0.75), dare_rescale=True), taus, feedback=False)
    assert 1.4 < without[199] / without[49] < 3.0


@pytest.mark.unit
def test_dare_updates_carry_their_seed_so_the_wire_needs_no_indices() -> None:
    seeds = dare_seed_fn(5, 2, "client-9")
    ef = ErrorFeedback(Sparsifier("dare", 0.3))
    sent = ef.compress(task_vectors(1)[0], seeds)
    for name, tensor in sent.items():
        assert isinstance(tensor, SparseTensor) and tensor.dare_seed == seeds(name)
        assert torch.equal(tensor.indices, dare_indices(tensor.numel, 0.3, seeds(name)))
    with pytest.raises(ValueError, match="seed_for"):
        ef.compress(task_vectors(1)[0])


@pytest.mark.unit
def test_the_none_sparsifier_sends_everything_and_keeps_a_zero_residual() -> None:
    ef = ErrorFeedback(Sparsifier("none"))
    tau = task_vectors(1)[0]
    sent = ef.compress(tau)
    for n in SHAPES:
        assert torch.equal(sent[n], tau[n]) and not ef.residual[n].any()


@pytest.mark.unit
def test_half_precision_task_vectors_give_an_fp32_residual() -> None:
    ef = ErrorFeedback(Sparsifier("trim", 0.5))
    tau = {"w": torch.tensor([1.0, -0.5, 0.25, 3.0], dtype=torch.bfloat16)}
    sent = ef.compress(tau)
    assert sent["w"].values.dtype == torch.float32 and ef.residual["w"].dtype == torch.float32
    assert torch.equal(ef.residual["w"], torch.tensor([0.0, -0.5, 0.25, 0.0]))
    sent = ef.compress({"w": torch.zeros(4, dtype=torch.float16)})
    assert torch.equal(sent["w"].to_dense(), torch.tensor([0.0, -0.5, 0.25, 0.0]))
    assert not ef.residual["w"].any()


@pytest.mark.unit
def test_non_contiguous_task_vectors_are_handled_in_logical_order() -> None:
    tau = {"w": torch.tensor([[4.0, 0.1], [0.2, -3.0]]).t()}
    ef = ErrorFeedback(Sparsifier("trim", 0.5))
    sent = ef.compress(tau)
    assert torch.equal(sent["w"].to_dense(), torch.tensor([[4.0, 0.0], [0.0, -3.0]]))
    assert torch.equal(ef.residual["w"], torch.tensor([[0.0, 0.2], [0.1, 0.0]]))


@pytest.mark.unit
def test_the_residual_is_folded_into_the_next_round() -> None:
    ef = ErrorFeedback(Sparsifier("trim", 0.25))
    first = ef.compress({"w": torch.tensor([4.0, 1.0, -2.0, 0.5])})
    assert torch.equal(first["w"].to_dense(), torch.tensor([4.0, 0.0, 0.0, 0.0]))
    second = ef.compress({"w": torch.tensor([0.0, 0.0, -1.5, 0.0])})
    assert torch.equal(second["w"].to_dense(), torch.tensor([0.0, 0.0, -3.5, 0.0]))
    assert torch.equal(ef.residual["w"], torch.tensor([0.0, 1.0, 0.0, 0.5]))


@pytest.mark.unit
def test_state_dict_round_trips_and_continues_identically() -> None:
    taus = task_vectors(4)
    original = ErrorFeedback(Sparsifier("dare", 0.3))
    for r in range(2):
        original.compress(taus[r], dare_seed_fn(0, r, 1))
    state = original.state_dict()
    assert set(state) == set(SHAPES) and all(isinstance(t, torch.Tensor) for t in state.values())
    restored = ErrorFeedback(Sparsifier("dare", 0.3))
    restored.load_state_dict(state)
    for r in (2, 3):
        a = original.compress(taus[r], dare_seed_fn(0, r, 1))
        b = restored.compress(taus[r], dare_seed_fn(0, r, 1))
        for n in SHAPES:
            assert torch.equal(a[n].values, b[n].values) and torch.equal(a[n].indices, b[n].indices)
    for n in SHAPES:
        assert torch.equal(original.residual[n], restored.residual[n])


@pytest.mark.unit
def test_state_dict_and_residual_are_copies() -> None:
    ef = ErrorFeedback(Sparsifier("trim", 0.5))
    ef.compress({"w": torch.tensor([1.0, 2.0])})
    state = ef.state_dict()
    state["w"].fill_(99.0)
    ef.residual.clear()
    assert torch.equal(ef.residual["w"], torch.tensor([1.0, 0.0]))
    loaded = {"w": torch.tensor([5.0, 5.0], dtype=torch.float64)}
    ef.load_state_dict(loaded)
    loaded["w"].fill_(0.0)
    assert ef.residual["w"].dtype == torch.float32 and torch.equal(ef.residual["w"], torch.tensor([5.0, 5.0]))


@pytest.mark.unit
def test_load_state_dict_rejects_what_is_not_a_residual() -> None:
    ef = ErrorFeedback(Sparsifier("trim", 0.5))
    with pytest.raises(TypeError, match="'w'"):
        ef.load_state_dict({"w": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"'w'.*floating"):
        ef.load_state_dict({"w": torch.arange(2)})


@pytest.mark.unit
def test_reset_forgets_the_residual() -> None:
    ef = ErrorFeedback(Sparsifier("trim", 0.5))
    ef.compress({"w": torch.tensor([1.0, 2.0])})
    ef.reset()
    assert ef.residual == {} and ef.state_dict() == {}
    assert torch.equal(ef.compress({"v": torch.ones(3)})["v"].to_dense(), torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.unit
def test_a_renamed_or_missing_tensor_is_a_clear_error_and_keeps_the_residual() -> None:
    ef = ErrorFeedback(Sparsifier("trim", 0.5))
    ef.compress({"a": torch.tensor([1.0, 2.0]), "b": torch.ones(2)})
    before = ef.state_dict()
    with pytest.raises(ValueError, match="missing this round: b; new this round: c"):
        ef.compress({"a": torch.ones(2), "c": torch.ones(2)})
    with pytest.raises(ValueError, match="missing this round: b"):
        ef.compress({"a": torch.ones(2)})
    assert all(torch.equal(ef.residual[n], before[n]) for n in before)


@pytest.mark.unit
def test_a_changed_shape_is_a_clear_error_and_keeps_the_residual() -> None:
    ef = ErrorFeedback(Sparsifier("trim", 0.5))
    ef.compress({"a": torch.tensor([1.0, 2.0]), "b": torch.ones(2)})
    before = ef.state_dict()
    with pytest.raises(ValueError, match=r"'b': shape \(3,\).*\(2,\)"):
        ef.compress({"a": torch.ones(2), "b": torch.ones(3)})
    assert all(torch.equal(ef.residual[n], before[n]) for n in before)


@pytest.mark.unit
def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(TypeError, match="Sparsifier"):
        ErrorFeedback("trim")
    with pytest.raises(ValueError, match=r"'ids'.*floating"):
        ErrorFeedback(Sparsifier("trim", 0.5)).compress({"ids": torch.arange(4)})


@pytest.mark.unit
def test_error_feedback_is_a_client_module_that_imports_only_the_algebra() -> None:
    source = Path(__file__).resolve().parents[1] / "fedfuse" / "client" / "error_feedback.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert {m for m in imported if m.startswith("fedfuse")} == {"fedfuse.algebra"}
    assert imported <= {"__future__", "typing", "collections.abc", "torch", "fedfuse.algebra"}


UPLINK_RUN = {"mode": "full", "local-steps": 1, "batch-size": 4, "max-length": 16, "sparsifier": "trim", "density": 0.2}


def _train_message(round_number: int, run_key: str):
    from flwr.app import Message
    from seeded_grid import train_content

    from fedfuse.messages import RoundInstruction

    config = RoundInstruction(round_number, "run", "", run_key).to_config()
    return Message(train_content(config), dst_node_id=7, message_type="train")


@pytest.mark.integration
def test_the_client_app_sends_through_the_mods_what_the_local_round_sends_and_keeps_residuals_by_run_key(
    server_identity, tmp_path
) -> None:
    """fedfuse's ClientApp = training handler + the uplink mods: byte for byte the Flower-free round, every round."""
    from flwr.app import Context, RecordDict

    from fedfuse.client.app import make_client_app
    from fedfuse.client.local_round import Shard, run_local_round
    from fedfuse.client.residuals import ResidualFiles
    from fedfuse.messages import TIMING_RECORD, TrainReply
    from fedfuse.settings import RunSettings

    settings = RunSettings.from_run_config({}, **UPLINK_RUN)
    app = make_client_app(UPLINK_RUN)
    node_config = {"partition-id": 1, "num-partitions": 3, "state-dir": str(tmp_path)}
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    feedback = ErrorFeedback(settings.compression.sparsifier_spec)
    shard = Shard(1, 3, "partition-1", sender="7")
    for round_number in (1, 2):
        reply = app(_train_message(round_number, "key"), context)
        expected = run_local_round(
            settings,
            {},
            round_number=round_number,
            run_id="run",
            shard=shard,
            error_feedback=feedback,
            model_version="v:base",
        )
        sent, local = (
            _decoded(payload, settings)
            for payload in (TrainReply.from_content(reply.content).payload, expected.payload)
        )
        assert sent == local  # the same bytes but for the measured train-seconds
        timing = reply.content.metric_records[TIMING_RECORD]
        assert {"build", "data", "train", "encode", "sign", "total"} <= set(timing)
        assert set(reply.content) == {"fedfuse.update", TIMING_RECORD}
    kept = ResidualFiles.of(context, "key", "partition-1", "fedfuse.residual").load(2)
    assert kept is not None and feedback.residual
    for name, residual in feedback.residual.items():
        assert torch.equal(kept[name], residual)


def _decoded(payload: bytes, settings) -> tuple:
    """A payload's header (train-seconds left out: it is measured) and its tensors as lists."""
    from fedfuse.training.run_model import update_shapes
    from fedfuse.wire import Expectation, decode_update

    update = decode_update(payload, expect=Expectation(shapes=update_shapes(settings)))
    header = {
        **vars(update.header),
        "metrics": {k: v for k, v in update.header.metrics.items() if k != "train-seconds"},
    }
    return header, {name: to_dense(t).tolist() for name, t in sorted(update.tensors.items())}
