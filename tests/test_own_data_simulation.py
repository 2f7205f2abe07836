"""Simulating a federation over your own dataset, end to end through Flower's simulation engine.

One file cut by a flwr-datasets partitioner (natural, by institution) with server-side evaluation on
an ``eval-data`` file; and chat SFT on one file per client (``data-dir``), where the only evaluation
is federated: the clients' held-out response loss, which must fall round after round.
"""

from __future__ import annotations

import pytest
from own_data_helpers import chat_rows, sentiment_rows, tiny_chat_llama, write_jsonl

from fedfuse.data.files import file_sha256
from fedfuse.simulation import simulate

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TINY = {"local-steps": 3, "batch-size": 8, "max-length": 24, "lora-rank": 2, "client-eval-examples": 16}


def test_one_file_partitioned_by_institution_with_server_evaluation_on_eval_data(tmp_path):
    data = write_jsonl(tmp_path / "reviews.jsonl", sentiment_rows(60, institutions=3))
    held_out = write_jsonl(tmp_path / "held-out.jsonl", sentiment_rows(12))
    history = simulate(
        {
            **TINY,
            "task": "classify",
            "data": str(data),
            "eval-data": str(held_out),
            "partition": "natural",
            "partition-column": "institution",
            "num-server-rounds": 1,
            "output-dir": str(tmp_path / "run"),
        },
        num_clients=3,
    )
    record = history["rounds"][-1]
    assert record["accepted"] == 3 and record["accuracy"] is not None, "the server evaluated on eval-data"
    assert history["settings"]["labels"] == "negative,positive", "the label set was read once from the file"
    clients = record["clients"]
    assert sorted(clients) == ["partition-0", "partition-1", "partition-2"]
    assert [clients[c]["data_rows"] for c in sorted(clients)] == [20, 20, 20], "one institution per client"
    assert all(c["data_sha256"] == file_sha256(str(data.resolve())) for c in clients.values())
    assert all(c["eval_examples"] == 2 for c in clients.values()), "10% of 20 rows held out locally"


def test_chat_sft_on_one_file_per_client_lowers_the_federated_response_loss(tmp_path):
    model = tiny_chat_llama(tmp_path / "tiny-chat-llama")
    folder = tmp_path / "institutions"
    folder.mkdir()
    rows = chat_rows(64)
    write_jsonl(folder / "a-north.jsonl", rows[:32])
    write_jsonl(folder / "b-south.jsonl", rows[32:])
    history = simulate(
        {
            **TINY,
            "model": str(model),
            "task": "sft",
            "data-dir": str(folder),
            "num-server-rounds": 2,
            "learning-rate": 0.02,
            "validation-fraction": 0.25,
            "output-dir": str(tmp_path / "run"),
        },
        num_clients=2,
    )
    losses = [history["initial"]["client_loss"]] + [r["client_loss"] for r in history["rounds"]]
    assert losses[0] > losses[1] > losses[2], losses
    assert all(r["accuracy"] is None for r in history["rounds"]), "no central test set: no server evaluation"
    assert history["rounds"][-1]["client_perplexity"] > 1
    clients = history["rounds"][-1]["clients"]
    assert {c["data_sha256"] for c in clients.values()} == {
        file_sha256(str((folder / name).resolve())) for name in ("a-north.jsonl", "b-south.jsonl")
    }
    assert (tmp_path / "run" / "report.md").read_text().count("## Federated evaluation") == 1
