"""The ClientApp: one fedclip client per Flower node.

Every message carries the run's resolved config; the node config says which client this
node is (`client-id`; Flower's simulation gives `partition-id` instead) and, optionally, where
its data lives (`data-root`). The client's personal state (its learner, including pFedMoAP's
gating network and experts, and its optimizer and scheduler state) is kept in
`context.state`, which Flower holds on the node between messages and never sends anywhere;
it is restored before and saved after every message, because a SuperNode runs each message
in a fresh process. What a process can keep (backbone, data, frozen features) it keeps.

- query: the set-up answer (initial shared state, schema, counts, class names);
- train: the client's turn of the round (download, local epochs, checked upload);
- evaluate: the client's evaluation with its evaluation payload.
"""

from __future__ import annotations

from fedclip.flower._flwr import ClientApp, ConfigRecord, Context, Message
from fedclip.flower.node import NodeFederation, node_for, node_identity
from fedclip.flower.records import (
    describe_record,
    eval_record,
    read_header,
    read_payload,
    turn_record,
)

STATE = "fedclip"  # the ConfigRecord in context.state that holds the personal state

app = ClientApp()


def _node(message: Message, context: Context) -> tuple[NodeFederation, str, int]:
    """This node's client for the message's run, with its personal state restored; also
    the run's config fingerprint and the message's round."""
    plain, fingerprint, rnd = read_header(message.content)
    client_id, data_root = node_identity(context.node_config)
    node = node_for(context.run_id, plain, fingerprint, client_id, data_root)
    saved = context.state.get(STATE)
    mine = (
        saved is not None and saved["fingerprint"] == fingerprint and saved["client"] == client_id
    )
    # a node's state is what context.state holds, whatever this process did before
    node.load_state_bytes(saved["state"] if mine else None)
    return node, fingerprint, rnd


def _keep(node: NodeFederation, fingerprint: str, context: Context) -> None:
    context.state[STATE] = ConfigRecord(
        {"fingerprint": fingerprint, "client": node.client_id, "state": node.state_bytes()}
    )


@app.query()
def describe(message: Message, context: Context) -> Message:
    """What the server needs to know of this node's client before round 1."""
    node, _, _ = _node(message, context)
    return Message(describe_record(node.describe()), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """The client's turn of the message's round; a failure is reported, not raised."""
    node, fingerprint, rnd = _node(message, context)
    out, error = node.train(rnd, read_payload(message.content))
    _keep(node, fingerprint, context)
    return Message(turn_record(out, error, node.experts()), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """The client's evaluation with the payload the strategy gives it for evaluation."""
    node, fingerprint, _ = _node(message, context)
    result = node.evaluate(read_payload(message.content))
    _keep(node, fingerprint, context)
    return Message(eval_record(result, node.experts()), reply_to=message)
