"""Gaussian prompt aggregation (PromptSRC, Khattak et al., ICCV 2023) over rounds, at the server.

PromptSRC keeps, besides the trained prompts, a running sum of the prompts of every epoch e
weighted by w_e = N(e; mu, sigma^2) / sum_e' N(e'; mu, sigma^2), and ends with that sum.
Federated here: after round r's FedAvg the server adds w_r times the aggregate to an
accumulator. The accumulator never feeds back into training (the global model stays the
plain FedAvg: FLiP's federated PromptSRC loads the running sum into the global model after
every round, which multiplies the first round's prompts by about 1e-50); it is evaluated
as an extra model ("gpa": `eval/global_gpa`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fedclip.errors import ConfigError
from fedclip.strategies.base import ClientResult
from fedclip.strategies.fedavg import FedAvg


def gaussian_weights(rounds: int, mu: float, sigma: float) -> list[float]:
    """w_r = N(r; mu, sigma^2) for r = 1 .. rounds, normalised to sum 1 (float64)."""
    dens = [math.exp(-0.5 * ((r - mu) / sigma) ** 2) for r in range(1, rounds + 1)]
    total = math.fsum(dens)
    return [d / total for d in dens]


class GaussianPromptAggregation(FedAvg):
    """FedAvg plus a server-side Gaussian-weighted average of the global models over rounds.

    The evaluated GPA model after round r is sum_{s<=r} w_s x_s / sum_{s<=r} w_s (x_s: the
    FedAvg result of round s), which after the last round is PromptSRC's GPA model
    sum_s w_s x_s; training never sees it.

    Args:
        mu: the Gaussian's mean in rounds (1-based); null: 0.75 R (R the number of rounds;
            the official 15 for 20 epochs).
        sigma: its standard deviation in rounds; null: max(1, 0.05 R).
        weighted: as FedAvg.
    """

    def __init__(
        self, mu: float | None = None, sigma: float | None = None, weighted: bool = True
    ) -> None:
        super().__init__(weighted)
        if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
            raise ConfigError(f"strategy.init_args.sigma={sigma}: must be > 0 and finite")
        if mu is not None and not math.isfinite(mu):
            raise ConfigError(f"strategy.init_args.mu={mu}: must be finite")
        self.mu, self.sigma = mu, sigma
        self.rounds: int | None = None
        self.gpa_sum: dict[str, Tensor] | None = None  # float64, sum_s w_s x_s
        self.gpa_weight = 0.0  # sum_s w_s over the rounds accumulated
        self.gpa_rounds = 0  # rounds accumulated

    def set_rounds(self, rounds: int) -> None:
        self.rounds = int(rounds)

    def uniform_mean(self) -> bool:
        """False: central DP cannot wrap it (the accumulator would see the aggregate
        before the noise)."""
        return False

    def gaussian(self) -> tuple[float, float]:
        """(mu, sigma) for this federation's number of rounds."""
        if self.rounds is None:
            raise RuntimeError("GaussianPromptAggregation: set_rounds() was not called")
        r = self.rounds
        mu = 0.75 * r if self.mu is None else float(self.mu)
        sigma = max(1.0, 0.05 * r) if self.sigma is None else float(self.sigma)
        return mu, sigma

    def weights(self) -> list[float]:
        return gaussian_weights(self.rounds or 0, *self.gaussian())

    def aggregate(
        self, rnd: int, results: dict[int, ClientResult]
    ) -> tuple[dict[str, Tensor] | None, dict[str, float]]:
        state, metrics = super().aggregate(rnd, results)
        if state is not None and rnd < (self.rounds or 0):
            w = self.weights()[rnd]
            acc = self.gpa_sum or {}
            self.gpa_sum = {
                k: acc.get(k, torch.zeros(v.shape, dtype=torch.float64)) + w * v.double()
                for k, v in state.items()
            }
            self.gpa_weight += w
            self.gpa_rounds = rnd + 1
            metrics = {**metrics, "server/gpa_weight": w}
        return state, metrics

    def evaluation_models(self) -> dict[str, dict[str, Tensor]]:
        """{'gpa': the Gaussian-weighted average of the global models so far} (none before
        the first aggregation)."""
        if not self.gpa_sum or self.gpa_weight <= 0 or self.global_state is None:
            return {}
        ref = self.global_state
        return {"gpa": {k: (v / self.gpa_weight).to(ref[k].dtype) for k, v in self.gpa_sum.items()}}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "gpa_sum": self.gpa_sum,
            "gpa_weight": self.gpa_weight,
            "gpa_rounds": self.gpa_rounds,
        }

    def check_state(self, state: Any) -> None:
        super().check_state(state)
        acc = state["gpa_sum"]
        if acc is not None:
            schema = self.schema
            for k, v in acc.items() if isinstance(acc, dict) else [("?", acc)]:
                ok = isinstance(v, Tensor) and k in schema and tuple(v.shape) == schema[k][0]
                if not ok or v.dtype != torch.float64:
                    raise ValueError(f"strategy.gpa_sum.{k}: not a float64 tensor of the schema")
        if not isinstance(state["gpa_weight"], float) or not isinstance(state["gpa_rounds"], int):
            raise ValueError("strategy.gpa_weight / gpa_rounds: expected a float and an int")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.gpa_sum = state["gpa_sum"]
        self.gpa_weight = float(state["gpa_weight"])
        self.gpa_rounds = int(state["gpa_rounds"])
