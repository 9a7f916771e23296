"""Strategy: the extension point for federation algorithms (Flower's shape, in process).

A strategy decides what each sampled client downloads (`configure_round`), how the uploads
are merged (`aggregate`) and what each client uses for evaluation (`configure_evaluate`).
Clients that fail in a round are simply absent from `results`; a round in which no client
returned anything leaves the global state unchanged.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor


@dataclass
class Payload:
    """What one client downloads.

    state: a global shared state to load before training (None: keep the client's own).
    extras: learner-specific downloads handed to `PromptLearner.receive` (e.g. experts).
    """

    state: dict[str, Tensor] | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientResult:
    """One client's upload: its `shared_state()`, its training-sample count and metrics."""

    client_id: int
    state: dict[str, Tensor]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Strategy(abc.ABC):
    """Base of federation strategies; subclasses call super() where they extend.

    `collects_uploads` False means clients send nothing (local-only training).
    """

    collects_uploads: ClassVar[bool] = True

    def __init__(self) -> None:
        self.global_state: dict[str, Tensor] | None = None
        self.num_clients = 0
        self.seed = 0

    def initialize(self, initial_state: dict[str, Tensor], num_clients: int, seed: int) -> None:
        """Called once before round 0 with the common initial shared state."""
        self.global_state = {k: v.detach().cpu().clone() for k, v in initial_state.items()}
        self.num_clients = num_clients
        self.seed = seed

    def check_learner(self, learner: Any) -> None:  # noqa: B027 (optional hook)
        """Raise ValueError if this strategy cannot federate `learner` (called once, early)."""

    @abc.abstractmethod
    def configure_round(self, rnd: int, sampled: list[int]) -> dict[int, Payload]:
        """Payload of every sampled client for round `rnd`."""

    @abc.abstractmethod
    def aggregate(
        self, rnd: int, results: dict[int, ClientResult]
    ) -> tuple[dict[str, Tensor] | None, dict[str, float]]:
        """Merge the uploads of round `rnd`; returns (new global state or None, metrics)."""

    def configure_evaluate(self, rnd: int, client_ids: list[int]) -> dict[int, Payload]:
        """Payload each client evaluates with; default: the global state, when there is one."""
        return {k: Payload(state=self.global_state) for k in client_ids}

    def state_dict(self) -> dict[str, Any]:
        return {"global_state": self.global_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_state = state["global_state"]
