"""The Flower executor: the round loop's client turns and evaluations, each sent to the
client's node through a Flower Grid.

It never sees a sample: it learns each client's initial state, schema, sample counts and
class names from the nodes' answers to a set-up query, and maps Flower node ids to fedclip
client ids by the `client-id` each node reports. Every reply carries the client's personal
state, which the executor keeps for the loop's checkpoints; a node that answers "stale"
(it lacks the state the server expects) is sent its state and asked again, once.

A node that answers with an error, or not within `node_timeout` seconds, counts as a failed
client of that round. A client missing from an evaluation is left out of that evaluation's
metrics, with a warning.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

import torch

from fedclip.errors import FlowerSetupError, UploadError
from fedclip.federation import ClientOutcome, Executor, FederationInfo, failure_reason
from fedclip.flower._flwr import Grid, Message, MessageType, RecordDict, log
from fedclip.flower.records import (
    header_record,
    is_stale,
    put_payload,
    put_state,
    read_describe,
    read_eval,
    read_state,
    read_state_bytes,
    read_turn,
    state_bytes,
)
from fedclip.strategies.base import Payload, check_upload

POLL_S = 0.2  # between pulls of replies (Grid.send_and_receive waits 3 s between pulls)


def check_node_count(nodes: int, num_clients: int) -> None:
    """One SuperNode per client, or FlowerSetupError."""
    if nodes != num_clients:
        raise FlowerSetupError(
            f"{nodes} node(s) connected, but the config has {num_clients} clients "
            "(data.num_clients): start one SuperNode per client"
        )


def map_clients(reported: Mapping[int, int], num_clients: int) -> dict[int, int]:
    """{client id: node id} from the client id each node reported ({node id: client id}).

    Every client 0..num_clients-1 needs exactly one node; anything else raises
    FlowerSetupError naming the nodes at fault."""
    check_node_count(len(reported), num_clients)
    nodes: dict[int, int] = {}
    for node, client in sorted(reported.items()):
        if not 0 <= client < num_clients:
            raise FlowerSetupError(
                f"node {node} reports client-id {client}, the config has clients 0 to "
                f"{num_clients - 1}"
            )
        if client in nodes:
            raise FlowerSetupError(
                f"nodes {nodes[client]} and {node} both report client-id {client}: give every "
                "SuperNode its own client-id"
            )
        nodes[client] = node
    return nodes


def flower_reason(reply: Message) -> str:
    """One line from a Flower error reply ("<class 'x.Error'>:<'text'>" -> "Error: text")."""
    reason = " ".join(str(reply.error.reason).split())
    match = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>", reason)
    return f"{match.group(1)}: {match.group(2)}" if match else reason


class FlowerExecutor(Executor):
    """Client turns on the nodes of a Flower Grid (one node per client)."""

    mid_round_stops = False  # a round's messages are out: stops wait for its end

    def __init__(
        self,
        grid: Grid,
        plain: dict[str, Any],
        fingerprint: str,
        num_clients: int,
        node_timeout: float = 600.0,
        connect_timeout: float = 120.0,
    ) -> None:
        self.grid = grid
        self.plain = plain
        self.fingerprint = fingerprint
        self.num_clients = num_clients
        self.node_timeout = node_timeout
        self.connect_timeout = connect_timeout
        self.nodes: dict[int, int] = {}  # client id -> node id
        self.states: dict[int, dict[str, Any]] = {}  # client id -> its personal state
        self.digests: dict[int, str] = {}  # client id -> digest of the state its node holds
        self.send_state: set[int] = set()  # clients whose next message carries their state
        self._reports: dict[int, dict[str, Any]] = {}
        self._info: FederationInfo | None = None

    def device(self) -> str:
        return f"Flower SuperNodes ({len(set(self.nodes.values()))})"

    # ---- set-up --------------------------------------------------------------------------
    def connect(self) -> None:
        """Wait for one node per client and ask each for its client."""
        end = time.monotonic() + self.connect_timeout
        while True:
            node_ids = sorted(self.grid.get_node_ids())
            if len(node_ids) >= self.num_clients or time.monotonic() > end:
                break
            time.sleep(1.0)
        check_node_count(len(node_ids), self.num_clients)
        log(INFO, "fedclip: %d nodes connected, asking for their clients", len(node_ids))
        header = header_record(self.plain, self.fingerprint, -1)
        replies = self._exchange(
            MessageType.QUERY, {n: RecordDict({"fedclip": header}) for n in node_ids}, -1, True
        )
        infos = {}
        for node in node_ids:
            reply = replies[node]
            if reply is None:
                raise FlowerSetupError(
                    f"node {node} did not answer the set-up query within {self.node_timeout:g} s"
                )
            if reply.has_error():
                raise FlowerSetupError(f"node {node}: {flower_reason(reply)}")
            infos[node] = read_describe(reply.content)
            self._keep_state(int(infos[node]["client"]), reply.content)
        self.nodes = map_clients({n: int(i["client"]) for n, i in infos.items()}, self.num_clients)
        info = {k: infos[node] for k, node in self.nodes.items()}
        first = info[0]
        for k, row in info.items():
            for key in ("classnames", "schema", "multilabel", "base_to_novel"):
                if row[key] != first[key]:
                    raise FlowerSetupError(
                        f"client {k} (node {self.nodes[k]}) differs from client 0 in {key}: "
                        "every site needs the same classes and the same fedclip version"
                    )
        ks = sorted(info)
        self._info = FederationInfo(
            num_clients=self.num_clients,
            initial=first["initial"],
            schema={
                name: (tuple(shape), getattr(torch, dtype))
                for name, (shape, dtype) in first["schema"].items()
            },
            num_train=[int(info[k]["num_train"]) for k in ks],
            num_test=[int(info[k]["num_test"]) for k in ks],
            data_summary={
                "dataset": first["dataset"],
                "partitioner": first["partitioner"],
                "seed": self.plain.get("seed", 0),
                "classnames": first["classnames"],
                "multilabel": bool(first["multilabel"]),
                **({"datasets": first["datasets"]} if first.get("datasets") else {}),
                "clients": [info[k]["row"] for k in ks],
                "train_counts": [info[k]["train_counts"] for k in ks],
                "test_counts": [info[k]["test_counts"] for k in ks],
                **(
                    {
                        "val_fraction": first["val_fraction"],
                        "val_counts": [info[k]["val_counts"] for k in ks],
                    }
                    if first.get("val_counts") is not None
                    else {}
                ),
            },
            classnames=first["classnames"],
            multilabel=bool(first["multilabel"]),
            base_to_novel=bool(first["base_to_novel"]),
        )
        log(INFO, "fedclip: clients on nodes %s", {k: self.nodes[k] for k in ks})

    def describe(self) -> FederationInfo:
        if self._info is None:
            raise RuntimeError("FlowerExecutor.connect() was not called")
        return self._info

    # ---- messages ------------------------------------------------------------------------
    def _exchange(
        self, kind: str, contents: dict[int, RecordDict], rnd: int, by_node: bool = False
    ) -> dict[int, Message | None]:
        """Send every message at once; the replies by client id (by node id with `by_node`),
        None for those that did not come within `node_timeout`."""
        node_of = (lambda n: n) if by_node else self.nodes.__getitem__
        key_of = {node_of(k): k for k in contents}
        messages = [
            Message(content, node_of(k), kind, ttl=self.node_timeout, group_id=str(rnd + 1))
            for k, content in contents.items()
        ]
        waiting = {mid for mid in self.grid.push_messages(messages) if mid}
        replies: dict[int, Message] = {}
        end = time.monotonic() + self.node_timeout
        while waiting and time.monotonic() < end:
            for reply in self.grid.pull_messages(list(waiting)):
                waiting.discard(reply.metadata.reply_to_message_id)
                if reply.metadata.src_node_id in key_of:
                    replies[key_of[reply.metadata.src_node_id]] = reply
            if waiting:
                time.sleep(POLL_S)
        return {k: replies.get(k) for k in contents}

    def _message(self, rnd: int, k: int, payload: Payload | None) -> RecordDict:
        header = header_record(self.plain, self.fingerprint, rnd, self.digests.get(k, ""))
        content = RecordDict({"fedclip": header})
        put_payload(content, payload)
        if k in self.send_state:
            put_state(content, state_bytes(self.states[k]))
        return content

    def _send(self, kind: str, rnd: int, payloads: dict[int, Payload | None]):
        """Messages to the clients in `payloads`; a node that answers stale gets its state
        with the same message once more."""
        replies = self._exchange(
            kind, {k: self._message(rnd, k, p) for k, p in payloads.items()}, rnd
        )
        stale = [
            k
            for k, r in replies.items()
            if r is not None and not r.has_error() and is_stale(r.content)
        ]
        if stale:
            log(WARNING, "fedclip: nodes of clients %s lack their state; sending it", stale)
            self.send_state.update(stale)
            again = {k: self._message(rnd, k, payloads[k]) for k in stale}
            replies.update(self._exchange(kind, again, rnd))
        for k, reply in replies.items():
            if reply is not None and not reply.has_error() and not is_stale(reply.content):
                self._keep_state(k, reply.content)
        return replies

    def _keep_state(self, k: int, content: RecordDict) -> None:
        sent = read_state(content)
        if sent is not None:
            self.states[k] = read_state_bytes(sent[0])
            self.digests[k] = sent[1]
            self.send_state.discard(k)

    # ---- turns and evaluations ------------------------------------------------------------
    def _outcome(self, k: int, reply: Message | None) -> ClientOutcome:
        if reply is None:
            return ClientOutcome(k).failed(
                f"no reply from node {self.nodes[k]} within {self.node_timeout:g} s"
            )
        if reply.has_error():
            return ClientOutcome(k).failed(f"node {self.nodes[k]}: {flower_reason(reply)}")
        if is_stale(reply.content):
            return ClientOutcome(k).failed(f"node {self.nodes[k]} could not restore its state")
        outcome = read_turn(reply.content, k)
        self._reports[k] = outcome.report
        if outcome.error is None and outcome.upload is not None:
            try:  # a node is not trusted to have checked its own upload
                check_upload(outcome.upload.state, self._info.schema)
            except UploadError as e:
                outcome.failed(failure_reason(e))
        return outcome

    def run_turns(self, rnd, todo, payloads, commit, check) -> None:
        replies = self._send(MessageType.TRAIN, rnd, {k: payloads.get(k) for k in todo})
        for k in todo:  # in sampling order, as the in-process loop commits them
            commit(self._outcome(k, replies[k]))
        check()

    def evaluate(self, rnd, ids, payloads) -> dict[int, Any]:
        replies = self._send(MessageType.EVALUATE, rnd, {k: payloads.get(k) for k in ids})
        result = {}
        for k in ids:
            reply = replies[k]
            if reply is None or reply.has_error() or is_stale(reply.content):
                why = (
                    "no reply"
                    if reply is None
                    else ("stale state" if not reply.has_error() else flower_reason(reply))
                )
                log(WARNING, "evaluation %d: client %d left out: %s", rnd + 1, k, why)
                continue
            result[k], self._reports[k] = read_eval(reply.content)
        return result

    # ---- state -----------------------------------------------------------------------------
    def client_states(self) -> list[dict[str, Any]]:
        return [self.states[k] for k in range(self.num_clients)]

    def load_client_states(self, states: list[dict[str, Any]]) -> None:
        """A resume: the checkpoint's states go to the nodes with their next message."""
        self.states = dict(enumerate(states))
        self.send_state = set(range(self.num_clients))

    def reports(self) -> dict[int, dict[str, Any]]:
        return dict(self._reports)


__all__ = ["FlowerExecutor", "check_node_count", "flower_reason", "map_clients"]
