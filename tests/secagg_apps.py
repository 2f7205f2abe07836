"""A test ClientApp for tests/test_secagg_deployed.py: fedfuse's own app, one node of which stalls mid-SecAgg+.

Node config ``secagg-stall-at`` (a stage: ``share``, ``mask`` or ``unmask``), ``secagg-stall-round`` and
``secagg-stall-marker`` (a file path): when that stage's message of that round arrives, the node writes the
marker and sleeps before answering, so the test knows the node has sent its keys and shares (the earlier
stages) and kills its SuperNode there. Every other message goes to fedfuse's ClientApp unchanged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp

from fedfuse.client.app import make_client_app
from fedfuse.messages import SECAGG_RECORD, SECAGG_STATE_RECORD

STALL_S = 600.0
honest = make_client_app()
app = ClientApp()


def stalls_here(msg: Message, context: Context) -> bool:
    """Whether this message is the stage and round the node config says to stall at."""
    stage = str(context.node_config.get("secagg-stall-at", "") or "")
    request = msg.content.config_records.get(SECAGG_RECORD)
    kept = context.state.config_records.get(SECAGG_STATE_RECORD)
    if not stage or msg.metadata.message_type != MessageType.TRAIN or request is None or kept is None:
        return False
    in_round = int(json.loads(str(kept["setup"]))["round"])
    return str(request.get("stage", "")) == stage and in_round == int(context.node_config["secagg-stall-round"])


@app.train()
def train(msg: Message, context: Context) -> Message:
    if stalls_here(msg, context):
        Path(str(context.node_config["secagg-stall-marker"])).write_text(str(context.node_id))
        time.sleep(STALL_S)
    return honest(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return honest(msg, context)
