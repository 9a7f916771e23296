"""The ClientApp: one fedclip client per Flower node.

Every message carries the run's resolved config; the node config says which client this
node is (`client-id`; Flower's simulation gives `partition-id` instead) and, optionally, where
its data lives (`data-root`). The client's personal state (its learner, including pFedMoAP's
gating network and experts, and its optimizer and scheduler state) is kept in
`context.state` between messages (a SuperNode runs each message in a fresh process) and
sent back with every reply, so the server's checkpoint holds it (resume, `fedclip export`,
`fedclip evaluate`). A message says which state the server expects (its digest): a node
that does not hold it (it restarted and lost it, or the server resumed from a checkpoint)
answers "stale" and the server sends the state along; a node never starts from scratch
silently.

- query: the set-up answer (initial shared state, schema, counts, class names);
- train: the client's turn of the round (download, local epochs, checked upload);
- evaluate: the client's evaluation with its evaluation payload.
"""

from __future__ import annotations

from fedclip.flower._flwr import ClientApp, ConfigRecord, Context, Message, RecordDict
from fedclip.flower.node import NodeClient, node_for, node_identity
from fedclip.flower.records import (
    describe_record,
    digest,
    eval_record,
    put_state,
    read_header,
    read_payload,
    read_state,
    read_state_bytes,
    stale_record,
    state_bytes,
    turn_record,
)

STATE = "fedclip"  # the ConfigRecord in context.state that holds the personal state

app = ClientApp()


def _node(message: Message, context: Context) -> tuple[NodeClient | None, str, int]:
    """This node's client for the message's run with the personal state the server expects
    restored (None when the node does not hold it and the message does not carry it); also
    the run's config fingerprint and the message's round."""
    plain, fingerprint, rnd, expected = read_header(message.content)
    client_id, data_root = node_identity(context.node_config)
    node = node_for(context.run_id, plain, fingerprint, client_id, data_root)
    sent = read_state(message.content)
    saved = context.state.get(STATE)
    mine = (
        saved is not None and saved["fingerprint"] == fingerprint and saved["client"] == client_id
    )
    if sent is not None:  # the server's copy wins
        node.load_state(read_state_bytes(sent[0]))
    elif mine and saved["digest"] == expected:
        node.load_state(read_state_bytes(bytes(saved["state"])))
    elif expected == "":  # first contact: the state before any message
        node.load_state(None)
    else:
        return None, fingerprint, rnd
    return node, fingerprint, rnd


def _reply(node: NodeClient, fingerprint: str, context: Context, content: RecordDict) -> RecordDict:
    """Keep the client's state on the node and attach it to the reply."""
    data = state_bytes(node.state())
    context.state[STATE] = ConfigRecord(
        {
            "fingerprint": fingerprint,
            "client": node.client_id,
            "state": data,
            "digest": digest(data),
        }
    )
    put_state(content, data)
    return content


@app.query()
def describe(message: Message, context: Context) -> Message:
    """What the server needs to know of this node's client before round 1."""
    node, fingerprint, _ = _node(message, context)
    if node is None:
        return Message(stale_record(), reply_to=message)
    content = _reply(node, fingerprint, context, describe_record(node.describe()))
    return Message(content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """The client's turn of the message's round; a failure is reported, not raised."""
    node, fingerprint, rnd = _node(message, context)
    if node is None:
        return Message(stale_record(), reply_to=message)
    outcome = node.train(rnd, read_payload(message.content))
    return Message(_reply(node, fingerprint, context, turn_record(outcome)), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """The client's evaluation with the payload the strategy gives it for evaluation."""
    node, fingerprint, _ = _node(message, context)
    if node is None:
        return Message(stale_record(), reply_to=message)
    result = node.evaluate(read_payload(message.content))
    content = eval_record(result, node.report())
    return Message(_reply(node, fingerprint, context, content), reply_to=message)
