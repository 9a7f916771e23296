"""A round's records: what one client's turn produced (`ClientOutcome`) and what the round
has gathered so far (`RoundRecord`). Plain containers appear only at the boundaries: a
`weights_only` checkpoint (`to_plain`/`from_plain`) and a Flower record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from fedclip.strategies.base import ClientResult, Payload


def failure_reason(error: BaseException) -> str:
    """One line naming a client's failure: 'ExceptionType: message' (at most 300 chars)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:300] if text else type(error).__name__


def to_cpu(obj: Any) -> Any:
    """Nested dicts/lists with every tensor moved to the CPU (what ranks exchange)."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside nested dicts/lists/Payloads."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Payload):
        return tensor_bytes(obj.state) + tensor_bytes(obj.extras)
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


@dataclass
class Upload:
    """What a client sends after training: its shared state and training-sample count."""

    state: dict[str, Tensor]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ClientOutcome:
    """One client's turn of a round.

    down/up: bytes downloaded and uploaded; loss: mean training loss (NaN when it did not
    train or failed); metrics: `client/K/...` values logged for the round; released: its
    (privatised) upload left the client, whether or not the server then accepts it (privacy
    accounting); upload: None when it uploads nothing or failed; error: why it failed (one
    line) and traceback: the failure's full traceback (None when it did not fail);
    report: the learner's `report()` after the turn (numbers and id lists).
    """

    client: int
    down: int = 0
    up: int = 0
    loss: float = float("nan")
    metrics: dict[str, float] = field(default_factory=dict)
    released: bool = False
    upload: Upload | None = None
    error: str | None = None
    traceback: str | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def failed(self, error: str, traceback: str | None = None) -> ClientOutcome:
        """This outcome as a failure: no upload, no loss, the reason kept."""
        self.upload = None
        self.up = 0
        self.loss = float("nan")
        self.error = error
        self.traceback = traceback
        return self


@dataclass
class RoundRecord:
    """Round `round` (0-based) so far: the sampled clients and the outcomes committed in
    sampling order. A round interrupted by a stop is checkpointed as it is and finished on
    resume (`done` are the clients already committed)."""

    round: int
    sampled: list[int]
    done: list[int] = field(default_factory=list)
    uploads: dict[int, Upload] = field(default_factory=dict)
    losses: dict[int, float] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    released: list[int] = field(default_factory=list)
    down: int = 0
    up: int = 0
    elapsed: float = 0.0

    def commit(self, outcome: ClientOutcome) -> None:
        """Record a client's outcome (a failure too: it counts, without an upload)."""
        k = outcome.client
        self.down += outcome.down
        self.up += outcome.up
        self.metrics.update(outcome.metrics)
        if outcome.released:
            self.released.append(k)
        if outcome.upload is not None:
            self.uploads[k] = outcome.upload
        self.losses[k] = outcome.loss
        self.done.append(k)
        if outcome.error is not None:
            self.failures.append({"round": self.round + 1, "client": k, "reason": outcome.error})

    def results(self) -> dict[int, ClientResult]:
        """The uploads as the strategy aggregates them, in client order."""
        return {
            k: ClientResult(k, u.state, u.num_samples, u.metrics)
            for k, u in sorted(self.uploads.items())
        }

    # ---- checkpoint boundary (plain containers only) ----------------------------------
    def to_plain(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "sampled": list(self.sampled),
            "done": list(self.done),
            "results": {
                k: {"state": u.state, "num_samples": u.num_samples, "metrics": dict(u.metrics)}
                for k, u in self.uploads.items()
            },
            "losses": dict(self.losses),
            "failures": list(self.failures),
            "metrics": dict(self.metrics),
            "released": list(self.released),
            "down": self.down,
            "up": self.up,
            "elapsed": self.elapsed,
        }

    @classmethod
    def from_plain(cls, plain: dict[str, Any]) -> RoundRecord:
        uploads = {
            int(k): Upload(r["state"], int(r["num_samples"]), dict(r["metrics"]))
            for k, r in plain["results"].items()
        }
        return cls(
            round=int(plain["round"]),
            sampled=[int(k) for k in plain["sampled"]],
            done=[int(k) for k in plain["done"]],
            uploads=uploads,
            losses={int(k): float(v) for k, v in plain["losses"].items()},
            failures=list(plain["failures"]),
            metrics=dict(plain["metrics"]),
            released=[int(k) for k in plain["released"]],
            down=int(plain["down"]),
            up=int(plain["up"]),
            elapsed=float(plain["elapsed"]),
        )
