"""Server-side differential privacy as a strategy wrapper (Flower's shape:
`CentralDP(FedAvg(weighted=False))`).

The clients clip their updates (the client runtime does that whenever privacy is on); the
wrapped strategy averages them; this wrapper adds Gaussian noise of std sigma * C / m to the
mean of the m accepted uploads, and the noised state is the new global state. The round
loop builds it from the `privacy:` block (`mode: central`), so configs need no change.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fedclip.errors import ConfigError
from fedclip.privacy import DifferentialPrivacy, PrivacyConfig, check_strategy
from fedclip.strategies.base import ClientResult, Payload, Strategy


class CentralDP(Strategy):
    """Gaussian noise on the aggregate of `strategy` (McMahan et al., ICLR 2018: DP-FedAvg).

    Args:
        strategy: the wrapped strategy; its aggregate must be the uniform mean of the
            uploads (`Strategy.uniform_mean`) and it must not pass uploads on to clients.
        privacy: clip norm, noise multiplier and seeding (mode must be 'central').
    """

    def __init__(self, strategy: Strategy, privacy: PrivacyConfig) -> None:
        super().__init__()
        if privacy.mode != "central":
            raise ConfigError(f"CentralDP needs privacy.mode 'central', got {privacy.mode!r}")
        check_strategy(privacy, strategy)  # uploads collected, not released, a uniform mean
        self.inner = strategy
        self.privacy_cfg = privacy
        self._noise: DifferentialPrivacy | None = None
        self.sends_extras = type(strategy).sends_extras  # type: ignore[misc]

    # the wrapped strategy's state is the state
    @property
    def global_state(self) -> dict[str, Tensor] | None:  # type: ignore[override]
        return self.inner.global_state

    @global_state.setter
    def global_state(self, value: dict[str, Tensor] | None) -> None:
        if "inner" in self.__dict__:
            self.inner.global_state = value

    @property
    def schema(self):  # type: ignore[override]
        return self.inner.schema

    @schema.setter
    def schema(self, value) -> None:
        if "inner" in self.__dict__:
            self.inner.schema = value

    def __getattr__(self, name: str) -> Any:  # e.g. `weighted` of the wrapped FedAvg
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def initialize(self, initial_state, num_clients, seed, schema=None) -> None:
        self.inner.initialize(initial_state, num_clients, seed, schema=schema)
        self.num_clients, self.seed = num_clients, seed
        self._noise = DifferentialPrivacy(self.privacy_cfg, num_clients, seed)

    def check_learner(self, learner: Any) -> None:
        self.inner.check_learner(learner)

    def set_rounds(self, rounds: int) -> None:
        self.inner.set_rounds(rounds)

    def evaluation_models(self) -> dict[str, dict[str, Tensor]]:
        return self.inner.evaluation_models()

    def configure_round(self, rnd: int, sampled: list[int]) -> dict[int, Payload]:
        return self.inner.configure_round(rnd, sampled)

    def configure_evaluate(self, rnd: int, client_ids: list[int]) -> dict[int, Payload]:
        return self.inner.configure_evaluate(rnd, client_ids)

    def aggregate(
        self, rnd: int, results: dict[int, ClientResult]
    ) -> tuple[dict[str, Tensor] | None, dict[str, float]]:
        state, metrics = self.inner.aggregate(rnd, results)
        if not results or state is None or self._noise is None:
            return state, metrics
        keys = sorted({n for r in results.values() for n in r.state})
        noised = self._noise.noise_aggregate(state, keys, len(results), rnd)
        self.inner.global_state = noised  # the wrapper owns what it wraps
        return noised, metrics

    def uniform_mean(self) -> bool:
        return self.inner.uniform_mean()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def check_state(self, state: Any) -> None:
        self.inner.check_state(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def with_privacy(strategy: Strategy, privacy: PrivacyConfig) -> Strategy:
    """The strategy a run uses: wrapped in `CentralDP` for `privacy.mode: central`."""
    if privacy.mode == "central" and not isinstance(strategy, CentralDP):
        return CentralDP(strategy, privacy)
    return strategy
