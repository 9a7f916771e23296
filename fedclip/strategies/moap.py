"""pFedMoAP's server: FedAvg of the contexts plus a pool of every client's latest context,
from which each sampled client gets its own experts (Luo et al., ICLR 2025)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from fedclip.errors import ConfigError, UploadError
from fedclip.strategies.base import ClientResult, Payload
from fedclip.strategies.fedavg import FedAvg


def _flat(state: dict[str, Tensor]) -> Tensor:
    return torch.cat([state[k].detach().reshape(-1).double() for k in sorted(state)])


def select_experts(
    pool: dict[int, dict[str, Tensor]],
    client: int,
    count: int,
    rng: np.random.Generator,
    method: Literal["knn", "random"] = "knn",
) -> list[int]:
    """Client ids of the `count` experts for `client`, never the client itself.

    'knn': the clients whose pooled state is nearest (Frobenius norm over all tensors) to
    the client's own last upload, nearest first, equal distances in id order. When the
    client has no upload in the pool yet, or with 'random', a seeded random choice (sorted
    ids). When the pool holds `count` or fewer other clients, all of them (sorted ids).
    """
    others = sorted(j for j in pool if j != client)
    if count <= 0:
        return []
    if len(others) <= count:
        return others
    if method == "knn" and client in pool:
        own = _flat(pool[client])
        dist = [float(torch.linalg.vector_norm(_flat(pool[j]) - own)) for j in others]
        order = sorted(range(len(others)), key=lambda i: (dist[i], others[i]))
        return [others[i] for i in order[:count]]
    return sorted(int(j) for j in rng.choice(others, size=count, replace=False))


class PFedMoAP(FedAvg):
    """pFedMoAP (Luo et al., "Mixture of Experts Made Personalized: Federated Prompt
    Learning for Vision-Language Models", ICLR 2025); use it with
    `fedclip.learners.MixtureOfPrompts`.

    Every sampled client downloads the FedAvg global context (its new local context) and the
    contexts of up to num_experts - 1 other clients from the server's pool of each client's
    latest upload. The uploads are averaged like FedAvg and replace their senders' pool
    entries. For evaluation, a client that has trained keeps its own personal state (gating,
    last local context, experts); one that has never been sampled evaluates the global
    context alone, as it would start from it.

    Args:
        num_experts: E, experts per client including the local prompt (E - 1 downloaded).
        selection: 'knn' (nearest contexts to the client's own last upload, Frobenius
            norm) or 'random'; clients with no upload yet always get a seeded random choice.
        weighted: weight the FedAvg of the contexts by training-sample count.
    """

    releases_uploads = True  # the pool's contexts are sent to other clients as experts

    sends_extras = frozenset({"experts", "expert_ids"})

    def __init__(
        self,
        num_experts: int = 10,
        selection: Literal["knn", "random"] = "knn",
        weighted: bool = True,
    ) -> None:
        super().__init__(weighted)
        if num_experts < 1:
            raise ConfigError(f"PFedMoAP: num_experts must be >= 1, got {num_experts}")
        if selection not in {"knn", "random"}:
            raise ConfigError(f"PFedMoAP: selection must be 'knn' or 'random', got {selection!r}")
        self.num_experts = num_experts
        self.selection = selection
        self.pool: dict[int, dict[str, Tensor]] = {}

    def check_learner(self, learner: Any) -> None:
        if not hasattr(learner, "expert_text_features"):
            raise ConfigError(
                f"PFedMoAP needs a learner that takes experts (fedclip.learners."
                f"MixtureOfPrompts), got {type(learner).__name__}"
            )

    def _rng(self, rnd: int, client: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, rnd, client]))

    def experts_for(self, rnd: int, client: int) -> list[int]:
        return select_experts(
            self.pool, client, self.num_experts - 1, self._rng(rnd, client), self.selection
        )

    def configure_round(self, rnd: int, sampled: list[int]) -> dict[int, Payload]:
        out = {}
        for k in sampled:
            ids = self.experts_for(rnd, k)
            experts = {
                key: torch.stack([self.pool[j][key] for j in ids])
                if ids
                else ref.new_empty((0, *ref.shape))
                for key, ref in self.global_state.items()
            }
            out[k] = Payload(
                state=self.global_state, extras={"experts": experts, "expert_ids": ids}
            )
        return out

    def aggregate(
        self, rnd: int, results: dict[int, ClientResult]
    ) -> tuple[dict[str, Tensor] | None, dict[str, float]]:
        state, metrics = super().aggregate(rnd, results)
        for k, r in results.items():
            self.pool[k] = {n: t.detach().cpu().clone() for n, t in r.state.items()}
        metrics["pool_size"] = float(len(self.pool))
        return state, metrics

    def configure_evaluate(self, rnd: int, client_ids: list[int]) -> dict[int, Payload]:
        return {
            k: Payload() if k in self.pool else Payload(state=self.global_state) for k in client_ids
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pool": self.pool}

    def check_state(self, state: Any) -> None:
        """The base rules, and a pool of {client id: an upload of that client}."""
        super().check_state(state)
        pool = state["pool"]
        if not isinstance(pool, dict):
            raise ValueError(f"strategy.pool is a {type(pool).__name__}, expected a dict")
        for k, upload in pool.items():
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_clients:
                raise ValueError(f"strategy.pool has the key {k!r}, expected a client id")
            try:
                self.validate_upload(upload)
            except UploadError as e:
                raise ValueError(f"strategy.pool.{k}: {e}") from None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.pool = {int(k): v for k, v in state["pool"].items()}
