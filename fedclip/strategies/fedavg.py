"""FedAvg, FedProx and local-only training."""

from __future__ import annotations

import torch
from torch import Tensor

from fedclip.strategies.base import ClientResult, Payload, Strategy


def weighted_average(states: list[dict[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    """sum_i w_i * state_i / sum_i w_i, key by key, accumulated in float64."""
    if not states:
        raise ValueError("weighted_average of no states")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {weights}")
    out = {}
    for key, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for state, w in zip(states, weights, strict=True):
            acc += state[key].detach().cpu().double() * (w / total)
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

    def configure_round(self, rnd: int, sampled: list[int]) -> dict[int, Payload]:
        return {k: Payload(state=self.global_state) for k in sampled}

    def aggregate(
        self, rnd: int, results: dict[int, ClientResult]
    ) -> tuple[dict[str, Tensor] | None, dict[str, float]]:
        if not results:
            return self.global_state, {"aggregated_clients": 0.0}
        ids = sorted(results)
        weights = [float(results[k].num_samples) if self.weighted else 1.0 for k in ids]
        self.global_state = weighted_average([results[k].state for k in ids], weights)
        return self.global_state, {"aggregated_clients": float(len(ids))}


class FedProx(FedAvg):
    """FedAvg plus a proximal term mu/2 * ||w - w_global||^2 in each client's local loss
    (Li et al., MLSys 2020).

    Args:
        mu: weight of the proximal term.
        weighted: as FedAvg.
    """

    def __init__(self, mu: float = 0.01, weighted: bool = True) -> None:
        super().__init__(weighted)
        if mu < 0:
            raise ValueError(f"FedProx: mu must be >= 0, got {mu}")
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
