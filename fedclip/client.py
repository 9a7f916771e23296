"""ClientModule: one federated client as a LightningModule (frozen backbone + its learner)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from fedclip.backbone import FrozenCLIP
from fedclip.learners.base import Batch, OptimConfig, PromptLearner
from fedclip.metrics import client_metric
from fedclip.strategies.base import Payload

# Payload extras the client consumes itself instead of handing them to the learner.
CLIENT_EXTRAS = {"proximal_mu"}


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
        object.__setattr__(self, "_clip", clip)
        self.optim_cfg = optim
        self.num_train = num_train
        self.steps_per_round = steps_per_round
        self.rounds = rounds
        self.accuracy = client_metric(learner.num_classes)
        self.proximal_mu = 0.0
        self._anchor: dict[str, Tensor] | None = None
        self.optimizer_pairs: list[tuple[torch.optim.Optimizer, Any]] | None = None

    # ---- federation hooks --------------------------------------------------------------
    def receive(self, payload: Payload | None) -> None:
        """Load a download: the global shared state and any extras."""
        if payload is None:
            return
        if payload.state is not None:
            self.learner.load_shared_state({k: v.to(self.device) for k, v in payload.state.items()})
        extras = dict(payload.extras)
        self.proximal_mu = float(extras.pop("proximal_mu", 0.0))
        self._anchor = (
            {k: v.detach().clone() for k, v in self.learner.shared_state().items()}
            if self.proximal_mu > 0
            else None
        )
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
        if self._anchor is not None:
            params = dict(self.learner.named_parameters())
            prox = sum(((params[k] - a) ** 2).sum() for k, a in self._anchor.items() if k in params)
            loss = loss + 0.5 * self.proximal_mu * prox
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
            for (opt, sched), o_sd, s_sd in zip(
                pairs, state["optimizers"], state["schedulers"], strict=True
            ):
                opt.load_state_dict(o_sd)
                sched.load_state_dict(s_sd)
