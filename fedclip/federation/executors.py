"""Executors: where a round's client turns run. The round loop (`RoundLoop`) is the same
for all of them; an executor only runs turns and evaluations and holds the clients.

- `LocalExecutor`: every client in this process, one after another.
- `FabricExecutor`: the clients split among Lightning Fabric ranks each round (balanced by
  training samples); outcomes, evaluations and the trained clients' personal state are
  exchanged with one broadcast per rank, so every rank commits the same outcomes in the
  same order and holds every client's state. The result equals one process bit for bit.
- The Flower executor (`fedclip.flower.executor`) sends each turn to the client's node.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedclip.federation.records import ClientOutcome, to_cpu
from fedclip.federation.runtime import ClientRuntime, Stopped
from fedclip.strategies.base import Payload


@dataclass
class FederationInfo:
    """What the server side knows of the clients (no sample ever reaches it).

    initial: the common initial shared state; schema: {name: (shape, dtype)} of every
    tensor a client may upload; num_train / num_test: each client's sample counts;
    data_summary: `FederatedData.summary()` (counts per client and class); classnames: every
    class's name; multilabel / base_to_novel: the task."""

    num_clients: int
    initial: dict[str, Tensor]
    schema: dict[str, tuple[tuple[int, ...], torch.dtype]]
    num_train: list[int]
    num_test: list[int]
    data_summary: dict[str, Any]
    classnames: list[str]
    multilabel: bool
    base_to_novel: bool

    @property
    def metric(self) -> str:
        """The headline metric: 'acc', or 'map' for multi-label data."""
        return "map" if self.multilabel else "acc"


def runtime_info(runtime: ClientRuntime) -> FederationInfo:
    """The FederationInfo of a runtime that holds client 0 (in process)."""
    data = runtime.data
    learner = runtime.clients[min(runtime.clients)].learner
    return FederationInfo(
        num_clients=data.num_clients,
        initial={k: v.detach().cpu().clone() for k, v in learner.shared_state().items()},
        schema=learner.upload_schema(),
        num_train=[data.num_train(k) for k in range(data.num_clients)],
        num_test=[len(data.test_parts[k]) for k in range(data.num_clients)],
        data_summary=data.summary(),
        classnames=list(data.all_classnames),
        multilabel=bool(data.multilabel),
        base_to_novel=bool(data.cfg.base_to_novel),
    )


def assign_clients(clients: list[int], weights: dict[int, int], ranks: int) -> dict[int, int]:
    """Owner rank of every client: heaviest first to the least loaded rank (ties: lowest
    rank), so ranks finish a round at about the same time. Deterministic."""
    load = [0] * ranks
    owner = {}
    for k in sorted(clients, key=lambda c: (-weights[c], c)):
        r = min(range(ranks), key=lambda i: (load[i], i))
        owner[k] = r
        load[r] += max(weights[k], 1)
    return owner


class Executor(abc.ABC):
    """Runs client turns and evaluations for the round loop.

    rank / world_size: this process's place among the processes that run the same loop
    (only rank 0 writes); mid_round_stops: whether a stop request may interrupt a round
    between clients and optimiser steps (otherwise it is honoured at the round's end).
    """

    rank: int = 0
    world_size: int = 1
    mid_round_stops: bool = True

    @abc.abstractmethod
    def describe(self) -> FederationInfo:
        """The clients, as the server side may know them."""

    def device(self) -> str:
        """Where the clients' turns run, for summary.json (e.g. 'cpu', 'cuda:0 (...)')."""
        return "unknown"

    @abc.abstractmethod
    def run_turns(
        self,
        rnd: int,
        todo: list[int],
        payloads: dict[int, Payload],
        commit: Callable[[ClientOutcome], None],
        check: Callable[[], None],
    ) -> None:
        """Run the turns of clients `todo` (in sampling order) and `commit` each outcome
        in that order; `check()` raises when too many have failed. A stop request raises
        `Stopped` with the committed outcomes kept (the rest run on resume)."""

    @abc.abstractmethod
    def evaluate(self, rnd: int, ids: list[int], payloads: dict[int, Payload]) -> dict[int, Any]:
        """Every client in `ids` evaluated after taking its evaluation payload: {client:
        result}, a client that could not be evaluated left out."""

    @abc.abstractmethod
    def client_states(self) -> list[dict[str, Any]]:
        """Every client's personal state, in client order (checkpoints)."""

    @abc.abstractmethod
    def load_client_states(self, states: list[dict[str, Any]]) -> None:
        """Restore every client's personal state (resume)."""

    def reports(self) -> dict[int, dict[str, Any]]:
        """Each client's latest learner report (the summary's client rows)."""
        return {}

    def agreed_stop(self, requested: int | None) -> int | None:
        """The stop signal, as every process running the loop agrees on it."""
        return requested


class LocalExecutor(Executor):
    """Every client in this process, one after another."""

    def __init__(self, runtime: ClientRuntime) -> None:
        self.runtime = runtime

    def device(self) -> str:
        from fedclip.provenance import device_name

        return device_name(self.runtime.fabric.device)
        self._reports: dict[int, dict[str, Any]] = {}

    def describe(self) -> FederationInfo:
        return runtime_info(self.runtime)

    def run_turns(self, rnd, todo, payloads, commit, check) -> None:
        for k in todo:
            if self.runtime.stop_requested():
                raise Stopped
            outcome = self.runtime.turn(k, rnd, payloads.get(k))
            commit(outcome)
            if outcome.error is not None:
                check()

    def take_all(self, ids: list[int], payloads: dict[int, Payload]) -> None:
        for k in ids:
            self.runtime.take(k, payloads.get(k))

    def evaluate(self, rnd, ids, payloads) -> dict[int, Any]:
        self.take_all(ids, payloads)
        return {k: self.runtime.evaluate_one(k) for k in ids}

    def client_states(self) -> list[dict[str, Any]]:
        return [self.runtime.client_state(k) for k in sorted(self.runtime.clients)]

    def load_client_states(self, states: list[dict[str, Any]]) -> None:
        for k, state in zip(sorted(self.runtime.clients), states, strict=True):
            self.runtime.clients[k].load_client_state(state)

    def reports(self) -> dict[int, dict[str, Any]]:
        return {k: c.learner.report() for k, c in self.runtime.clients.items()}


class FabricExecutor(LocalExecutor):
    """The clients split among Fabric ranks; every rank ends with every outcome and every
    client's state. Stops are agreed at round ends."""

    mid_round_stops = False

    def __init__(self, runtime: ClientRuntime) -> None:
        super().__init__(runtime)
        fabric = runtime.fabric
        self.fabric = fabric
        self.rank, self.world_size = fabric.global_rank, fabric.world_size

    def _gather(self, mine: dict[int, Any]) -> dict[int, Any]:
        """Every rank's {client: value} merged, on every rank (one broadcast per rank)."""
        merged: dict[int, Any] = {}
        for src in range(self.world_size):
            merged.update(self.fabric.broadcast(to_cpu(mine) if src == self.rank else None, src))
        return merged

    def run_turns(self, rnd, todo, payloads, commit, check) -> None:
        weights = {k: self.runtime.data.num_train(k) for k in todo}
        owner = assign_clients(todo, weights, self.world_size)
        mine: dict[int, tuple[ClientOutcome, dict[str, Any] | None]] = {}
        for k in todo:
            if owner[k] == self.rank:
                outcome = self.runtime.turn(k, rnd, payloads.get(k))
                # what it downloaded and learnt, for the other ranks' copies
                state = self.runtime.client_state(k) if outcome.error is None else None
                mine[k] = (outcome, state)
        outcomes = self._gather(mine)
        for k in todo:  # in sampling order on every rank: identical round records
            outcome, state = outcomes[k]
            if state is not None and owner[k] != self.rank:
                self.runtime.load_client(k, state)
            commit(outcome)
        check()

    def evaluate(self, rnd, ids, payloads) -> dict[int, Any]:
        self.take_all(ids, payloads)  # on every rank: every rank keeps every client's state
        weights = {k: len(self.runtime.data.test_parts[k]) for k in ids}
        owner = assign_clients(ids, weights, self.world_size)
        out = {k: self.runtime.evaluate_one(k) for k in ids if owner[k] == self.rank}
        out = self._gather(out)
        return {k: out[k] for k in ids}

    def agreed_stop(self, requested: int | None) -> int | None:
        flag = torch.tensor(requested or 0, device=self.fabric.device)
        return int(self.fabric.all_reduce(flag, reduce_op="max")) or None
