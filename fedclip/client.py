"""ClientModule: one federated client as a LightningModule (frozen backbone + its learner).

Terms a strategy asks every client to add to its loss (FedProx's proximal term) arrive as
declared payload extras and are applied here generically (`RUNTIME_TERMS`): the client
never knows which strategy sent them, and learners never see them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from fedclip.backbone import FrozenCLIP
from fedclip.batch import Batch
from fedclip.learners.base import OptimConfig, PromptLearner, continue_schedule
from fedclip.metrics import client_metric
from fedclip.statecheck import check_optimizer_state, like
from fedclip.strategies.base import Payload


def proximal_term(mu: float, learner: PromptLearner) -> Callable[[], Tensor] | None:
    """mu/2 * ||w - w_download||^2 over the shared tensors the client just downloaded
    (Li et al., MLSys 2020); None when mu is 0."""
    mu = float(mu)
    if mu == 0.0:
        return None
    anchor = {k: v.detach().clone() for k, v in learner.shared_state().items()}

    def term() -> Tensor:
        params = dict(learner.named_parameters())
        return (
            0.5 * mu * sum(((params[k] - a) ** 2).sum() for k, a in anchor.items() if k in params)
        )

    return term


# Payload extras the client runtime applies itself: name -> builder of a loss term.
RUNTIME_TERMS: dict[str, Callable[[Any, PromptLearner], Callable[[], Tensor] | None]] = {
    "proximal_mu": proximal_term,
}


def runtime_terms() -> frozenset[str]:
    """The payload extras every client accepts whatever its learner."""
    return frozenset(RUNTIME_TERMS)


class ClientModule(L.LightningModule):
    """A client: its learner (personal + shared state) and its own optimizer/scheduler state.

    The frozen backbone is held by reference (shared by all clients, never in state_dict).
    """

    def __init__(
        self,
        client_id: int,
        learner: PromptLearner,
        clip: FrozenCLIP,
        optim: OptimConfig,
        num_train: int,
        steps_per_round: int,
        rounds: int,
    ) -> None:
        super().__init__()
        self.client_id = client_id
        self.learner = learner
        learner.num_train = num_train  # (the contract: e.g. per-sample privacy accounting)
        object.__setattr__(self, "_clip", clip)
        self.optim_cfg = optim
        self.num_train = num_train
        self.steps_per_round = steps_per_round
        self.rounds = rounds
        self.accuracy = client_metric(learner.num_classes)
        self.loss_terms: list[Callable[[], Tensor]] = []
        self.optimizer_pairs: list[tuple[torch.optim.Optimizer, Any]] | None = None

    # ---- federation hooks --------------------------------------------------------------
    def receive(self, payload: Payload | None) -> None:
        """Load a download: the global shared state, the runtime's loss terms and the
        learner's extras."""
        if payload is None:
            return
        if payload.state is not None:
            self.learner.load_shared_state({k: v.to(self.device) for k, v in payload.state.items()})
        extras = dict(payload.extras)
        terms = [RUNTIME_TERMS[name](extras.pop(name), self.learner) for name in list(extras)
                 if name in RUNTIME_TERMS]  # fmt: skip
        self.loss_terms = [t for t in terms if t is not None]
        self.learner.receive(extras)

    def wanted(self, payload: Payload | None) -> Payload | None:
        """The part of a download this client takes: of the state, only the tensors its
        learner shares now (e.g. just the LoRA factors once FedMVP switched to them)."""
        if payload is None or payload.state is None:
            return payload
        keys = set(self.learner.shared_keys())
        state = {k: v for k, v in payload.state.items() if k in keys}
        return Payload(state=state, extras=payload.extras)

    def upload(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.learner.shared_state().items()}

    # ---- LightningModule -----------------------------------------------------------------
    def forward(self, batch: Batch) -> Tensor:
        return self.learner(batch)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self.learner.training_loss(batch)
        for term in self.loss_terms:
            loss = loss + term()
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> Tensor:
        logits = self(batch)
        self.accuracy.update(logits.float(), batch.labels)
        return logits

    def configure_optimizers(self) -> list[tuple[torch.optim.Optimizer, Any]]:
        if self.optimizer_pairs is None:
            self.optimizer_pairs = self.learner.configure_optimizers(
                self.optim_cfg, self.steps_per_round, self.rounds
            )
        return self.optimizer_pairs

    def rebuild_optimizers(self) -> None:
        """New optimizers for a changed trainable set (momentum starts afresh: the tensors
        are new), with every schedule continued from the step the old one had reached."""
        old = self.optimizer_pairs or []
        position = max((sched.last_epoch for _, sched in old), default=0)
        stretched = next(  # a run cosine stretched on resume goes on stretched
            (f for _, sched in old for f in getattr(sched, "lr_lambdas", [])), None
        )
        self.optimizer_pairs = None
        pairs = self.configure_optimizers()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
            for _, sched in pairs:
                if stretched is not None:
                    for f in getattr(sched, "lr_lambdas", []):
                        f.__dict__.update(stretched.__dict__)
                for _ in range(position - sched.last_epoch):
                    sched.step()

    # ---- personal state for checkpoints ----------------------------------------------------
    def client_state(self) -> dict[str, Any]:
        pairs = self.optimizer_pairs or []
        return {
            "learner": {
                k: v.detach().cpu() if isinstance(v, Tensor) else v
                for k, v in self.learner.state_dict().items()
            },
            "optimizers": [o.state_dict() for o, _ in pairs],
            "schedulers": [s.state_dict() for _, s in pairs],
        }

    def load_client_state(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state["learner"])
        if state["optimizers"]:
            pairs = self.configure_optimizers()
            key = f"clients[{self.client_id}]"
            if len(state["optimizers"]) != len(pairs):
                raise ValueError(
                    f"{key}.optimizers has {len(state['optimizers'])} entries, the learner "
                    f"has {len(pairs)} optimizers"
                )
            for i, ((opt, sched), o_sd, s_sd) in enumerate(
                zip(pairs, state["optimizers"], state["schedulers"], strict=True)
            ):
                check_optimizer_state(opt, o_sd, f"{key}.optimizers[{i}]")
                like(sched.state_dict(), s_sd, f"{key}.schedulers[{i}]")
                opt.load_state_dict(o_sd)
                sched.load_state_dict(s_sd)
                # federation.rounds may change on resume: a run cosine is stretched to it
                continue_schedule(sched, self.steps_per_round * self.rounds)
