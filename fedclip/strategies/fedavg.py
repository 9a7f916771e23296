"""FedAvg, FedProx and local-only training."""

from __future__ import annotations

import torch
from torch import Tensor

from fedclip.errors import ConfigError
from fedclip.strategies.base import ClientResult, Payload, Strategy


def weighted_average(states: list[dict[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    """sum_i w_i * state_i / sum_i w_i, key by key, accumulated in float64.

    States may hold different keys (clients in different phases upload different tensors):
    each key is averaged over the states that hold it, with their weights renormalised.
    """
    if not states:
        raise ValueError("weighted_average of no states")
    if any(w < 0 for w in weights) or float(sum(weights)) <= 0:
        raise ValueError(f"weights must be >= 0 and sum to > 0, got {weights}")
    out = {}
    keys = list(dict.fromkeys(k for state in states for k in state))
    for key in keys:
        holders = [(s[key], w) for s, w in zip(states, weights, strict=True) if key in s]
        total = float(sum(w for _, w in holders))
        if total <= 0:  # only zero-weight holders: average them evenly
            holders, total = [(t, 1.0) for t, _ in holders], float(len(holders))
        ref = holders[0][0]
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for tensor, w in holders:
            acc += tensor.detach().cpu().double() * (w / total)
        out[key] = acc.to(ref.dtype)
    return out


class FedAvg(Strategy):
    """Federated averaging of the uploaded shared states (McMahan et al., AISTATS 2017).

    With the textual learner this is PromptFL (Guo et al., IEEE TMC 2023).

    Args:
        weighted: weight each upload by the client's training-sample count (the paper);
            false averages uploads uniformly.
    """

    def __init__(self, weighted: bool = True) -> None:
        super().__init__()
        self.weighted = weighted

    def uniform_mean(self) -> bool:
        return not self.weighted

    def configure_round(self, rnd: int, sampled: list[int]) -> dict[int, Payload]:
        return {k: Payload(state=self.global_state) for k in sampled}

    def aggregate(
        self, rnd: int, results: dict[int, ClientResult]
    ) -> tuple[dict[str, Tensor] | None, dict[str, float]]:
        if not results:
            return self.global_state, {"aggregated_clients": 0.0}
        ids = sorted(results)
        weights = [float(results[k].num_samples) if self.weighted else 1.0 for k in ids]
        # tensors nobody uploaded this round keep their global values
        merged = weighted_average([results[k].state for k in ids], weights)
        self.global_state = {**(self.global_state or {}), **merged}
        return self.global_state, {"aggregated_clients": float(len(ids))}


class FedProx(FedAvg):
    """FedAvg plus a proximal term mu/2 * ||w - w_global||^2 in each client's local loss
    (Li et al., MLSys 2020).

    Args:
        mu: weight of the proximal term.
        weighted: as FedAvg.
    """

    sends_extras = frozenset({"proximal_mu"})

    def __init__(self, mu: float = 0.01, weighted: bool = True) -> None:
        super().__init__(weighted)
        if mu < 0:
            raise ConfigError(f"FedProx: mu must be >= 0, got {mu}")
        self.mu = mu

    def configure_round(self, rnd: int, sampled: list[int]) -> dict[int, Payload]:
        return {
            k: Payload(state=self.global_state, extras={"proximal_mu": self.mu}) for k in sampled
        }


class LocalOnly(Strategy):
    """No aggregation: every client trains and evaluates its own prompts (CoOp per client).

    Nothing is downloaded after the common initialisation and nothing is uploaded.
    """

    collects_uploads = False

    def configure_round(self, rnd: int, sampled: list[int]) -> dict[int, Payload]:
        return {k: Payload() for k in sampled}

    def aggregate(
        self, rnd: int, results: dict[int, ClientResult]
    ) -> tuple[dict[str, Tensor] | None, dict[str, float]]:
        return None, {"aggregated_clients": 0.0}

    def configure_evaluate(self, rnd: int, client_ids: list[int]) -> dict[int, Payload]:
        return {k: Payload() for k in client_ids}
