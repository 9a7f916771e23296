"""Strategy: the extension point for federation algorithms (Flower's shape, in process).

A strategy decides what each sampled client downloads (`configure_round`), how the uploads
are merged (`aggregate`) and what each client uses for evaluation (`configure_evaluate`).
Clients that fail in a round are simply absent from `results`; a round in which no client
returned anything leaves the global state unchanged. Every upload is checked by
`validate_upload` before it may reach `aggregate`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedclip.errors import UploadError


@dataclass
class Payload:
    """What one client downloads.

    state: a global shared state to load before training (None: keep the client's own).
    extras: learner-specific downloads handed to `PromptLearner.receive` (e.g. experts).
    global_state: evaluation only: the server's aggregate, which the global protocol
        evaluates (loaded for that pass alone, under `PromptLearner.global_part()`).
    models: evaluation only: further server-side models {name: shared state} evaluated
        like `global_state` (`eval/global_<name>`; e.g. a Gaussian average over rounds).
    """

    state: dict[str, Tensor] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    global_state: dict[str, Tensor] | None = None
    models: dict[str, dict[str, Tensor]] = field(default_factory=dict)


@dataclass
class ClientResult:
    """One client's upload: its `shared_state()`, its training-sample count and metrics."""

    client_id: int
    state: dict[str, Tensor]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


def check_upload(
    state: Any,
    schema: dict[str, tuple[tuple[int, ...], torch.dtype]],
    expected_keys: list[str] | None = None,
) -> dict[str, Tensor]:
    """Check one upload; raise UploadError naming the first problem.

    Every entry must be a tensor the schema ({name: (shape, dtype)}) knows, with its shape
    and dtype, holding only finite values; with `expected_keys` (what the sender declares it
    shares), none of them may be missing.
    """
    if not isinstance(state, dict):
        raise UploadError(f"the upload is a {type(state).__name__}, not a dict of tensors")
    for key, tensor in state.items():
        if key not in schema:
            raise UploadError(f"unknown tensor {key!r}")
        if not isinstance(tensor, Tensor):
            raise UploadError(f"{key!r} is a {type(tensor).__name__}, not a tensor")
        shape, dtype = schema[key]
        if tuple(tensor.shape) != tuple(shape):
            raise UploadError(f"{key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        if tensor.dtype != dtype:
            raise UploadError(f"{key!r} has dtype {tensor.dtype}, expected {dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UploadError(f"{key!r} holds NaN or inf")
    missing = sorted(set(expected_keys or ()) - set(state))
    if missing:
        raise UploadError(f"missing tensors {missing}")
    return state


class Strategy(abc.ABC):
    """Base of federation strategies; subclasses call super() where they extend.

    `collects_uploads` False means clients send nothing (local-only training).
    `releases_uploads` True means individual uploads leave the server (e.g. as other
    clients' experts), so only noise added by the clients themselves can protect them.
    `sends_extras` names the payload extras it sends; each must be accepted by the learner
    (`PromptLearner.accepts_extras`) or applied by the client runtime (a loss term such as
    FedProx's `proximal_mu`), which is checked when the config is built.
    `aggregate`'s returned global state is the truth: nothing outside a strategy writes its
    fields (wrappers such as `CentralDP` hold the strategy they wrap).
    """

    collects_uploads: ClassVar[bool] = True
    releases_uploads: ClassVar[bool] = False
    sends_extras: ClassVar[frozenset[str]] = frozenset()

    def __init__(self) -> None:
        self.global_state: dict[str, Tensor] | None = None
        self.schema: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.num_clients = 0
        self.seed = 0

    def initialize(
        self,
        initial_state: dict[str, Tensor],
        num_clients: int,
        seed: int,
        schema: dict[str, Tensor] | None = None,
    ) -> None:
        """Called once before round 0 with the common initial shared state.

        schema: every tensor a client may ever upload (e.g. all of the learner's parameters,
        including LoRA factors shared only later), as tensors or (shape, dtype) pairs, for
        `validate_upload`; default: the initial state's tensors.
        """
        self.global_state = {k: v.detach().cpu().clone() for k, v in initial_state.items()}
        self.schema = {
            k: (tuple(v.shape), v.dtype) if isinstance(v, Tensor) else (tuple(v[0]), v[1])
            for k, v in (schema or initial_state).items()
        }
        self.num_clients = num_clients
        self.seed = seed

    def validate_upload(
        self, state: Any, expected_keys: list[str] | None = None
    ) -> dict[str, Tensor]:
        """`check_upload` against this strategy's schema (every tensor a client may upload)."""
        return check_upload(state, self.schema, expected_keys)

    def uniform_mean(self) -> bool:
        """True when `aggregate` is the uniform mean of the uploads (what central DP's noise
        is calibrated to). Default: False."""
        return False

    def set_rounds(self, rounds: int) -> None:  # noqa: B027 (optional hook)
        """Told the federation's number of rounds before round 0 (for strategies whose
        schedule depends on it). Default: ignored."""

    def evaluation_models(self) -> dict[str, dict[str, Tensor]]:
        """Server-side models evaluated besides the global state, {name: shared state}
        (logged as `eval/global_<name>`); they never reach training. Default: none."""
        return {}

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

    def evaluation_payloads(self, rnd: int, client_ids: list[int]) -> dict[int, Payload]:
        """`configure_evaluate`'s payloads with the aggregate (`global_state`) attached for
        the global protocol (what every client evaluates as the global model), and the
        `evaluation_models`."""
        payloads = self.configure_evaluate(rnd, client_ids)
        models = self.evaluation_models()
        out = {}
        for k in client_ids:
            p = payloads.get(k) or Payload()
            glob = self.global_state
            out[k] = Payload(state=p.state, extras=p.extras, global_state=glob, models=models)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"global_state": self.global_state}

    def check_state(self, state: Any) -> None:
        """Raise ValueError naming the key when `state` (a checkpoint's) cannot be this
        strategy's `state_dict()`: the same keys; a global state that is None when this
        one's is, else the initial tensors and any others of the schema, each of its shape
        and dtype and finite. Subclasses with more state extend it."""
        from fedclip.statecheck import ANY, like

        like({k: ANY for k in self.state_dict()}, state, "strategy")
        glob = state["global_state"]
        if self.global_state is None or glob is None:
            if glob is not self.global_state:
                raise ValueError(f"strategy.global_state is {type(glob).__name__}, expected "
                                 f"{type(self.global_state).__name__}")  # fmt: skip
            return
        try:
            self.validate_upload(glob, list(self.global_state))
        except UploadError as e:
            raise ValueError(f"strategy.global_state: {e}") from None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_state = state["global_state"]
