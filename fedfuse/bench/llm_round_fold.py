"""``fedfuse bench llm-round``'s fold timing: the server's time per exact LoRA update, factors against ΔW.

For a model's LoRA layout (the tensors a client of the run sends, from the model's skeleton: no weights
loaded) K seeded random updates are encoded as clients encode them and offered to two FedAvg round
engines: one folding them as stacked factors (``fold_factors=True``, the default) and one forming each
update's dense ΔW = s·B·A first (``fold_factors=False``: how every update was folded before factors).
Each engine is timed from the first offer to the merged change in the form the broadcast uses (factors,
or dense): the server's whole work per update. Decoding the payloads (the same for both) is timed on its
own, and the *fold* is the rest: what folding as factors saves. Medians of ``repeat`` runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch

from fedfuse.rounds import RoundEngine
from fedfuse.settings import RunSettings
from fedfuse.strategies import get_strategy
from fedfuse.training.run_model import lora_scale, update_shapes
from fedfuse.wire import Expectation, UpdateHeader, decode_update, encode_update


def seeded_payloads(shapes: Mapping[str, tuple[int, ...]], clients: int) -> list[bytes]:
    """K encoded LoRA updates of ``shapes`` with seeded random factors (B nonzero, as after training)."""
    payloads = []
    for k in range(clients):
        generator = torch.Generator().manual_seed(k)
        tensors = {name: 0.01 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
        header = UpdateHeader(run_id="bench", round=1, base_fingerprint="v:bench", node_id=f"n{k}", num_examples=10)
        payloads.append(encode_update(tensors, header=header))
    return payloads


def fold_seconds(settings: RunSettings, payloads: list[bytes], *, factors: bool) -> float:
    """Seconds one FedAvg engine takes to fold ``payloads`` and hand back the merged change."""
    space = settings.update_space(update_shapes(settings), lora_scale(settings))
    engine = RoundEngine(get_strategy("fedavg"), space, round_number=1, fold_factors=factors, diagnostics=False)
    started = time.perf_counter()
    for payload in payloads:
        if engine.offer(payload) is not None:
            raise RuntimeError("fold bench: an update was refused")
    engine.merged_factored()
    return time.perf_counter() - started


def decode_seconds(settings: RunSettings, payloads: list[bytes]) -> float:
    """Seconds to decode and check ``payloads`` as the engine does (the part both folds share)."""
    expect = Expectation(update_shapes(settings))
    started = time.perf_counter()
    for payload in payloads:
        decode_update(payload, expect=expect)
    return time.perf_counter() - started


def fold_timing(config: Mapping[str, Any], clients: int, repeat: int = 3) -> dict[str, float]:
    """Per update: server seconds folding as factors and as dense ΔW, decode seconds, and the folds' ratio."""
    settings = RunSettings.from_run_config({}, **config)
    payloads = seeded_payloads(update_shapes(settings), clients)

    def median(measure: Any) -> float:
        return statistics.median(measure() for _ in range(repeat)) / clients

    decode = median(lambda: decode_seconds(settings, payloads))
    factored = median(lambda: fold_seconds(settings, payloads, factors=True))
    dense = median(lambda: fold_seconds(settings, payloads, factors=False))
    fold_factors, fold_dense = max(factored - decode, 1e-9), max(dense - decode, 1e-9)
    return {
        "server_factors_s": factored,
        "server_dense_s": dense,
        "decode_s": decode,
        "fold_factors_s": fold_factors,
        "fold_dense_s": fold_dense,
        "fold_speedup": fold_dense / fold_factors,
    }
