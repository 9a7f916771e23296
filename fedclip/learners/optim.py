"""The local optimiser of every client: SGD with a per-step schedule (a cosine per round, a
cosine over the run that a resume may stretch, or a constant LR)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from fedclip.errors import ConfigError


@dataclass
class OptimConfig:
    """Local optimiser of every client (each client owns its optimizer and scheduler state).

    Args:
        lr: SGD learning rate of the prompt parameters.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        scheduler: 'cosine' or 'constant'.
        cosine_span: 'round' restarts the cosine at every round, over that round's local
            steps (the reference); 'run' decays once over all rounds' local steps (a
            resume that changes federation.rounds stretches it from the step reached,
            with a warning: from the current LR down to 0 at the new last round).
    """

    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: Literal["cosine", "constant"] = "cosine"
    cosine_span: Literal["round", "run"] = "round"

    def __post_init__(self) -> None:
        # Checked when the config is built, not by torch at the first local step: by then
        # the run folder exists and every client fails alike.
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"optim.lr must be > 0 and finite, got {self.lr}")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"optim.{name} must be >= 0 and finite, got {value}")


class RunCosine:
    """The LR factor at local step t of `cosine_span: run`: a cosine from 1 to 0 over the
    run's `total` steps, 0 after it (never climbing back).

    A resumed run given more (or fewer) rounds is stretched from the step it reached
    (`stretch`): from the factor of that step, a cosine to 0 at the new total. Its state
    (a plain object's attributes) travels in the scheduler's state_dict, so checkpoints keep
    the stretch.
    """

    def __init__(self, total: int) -> None:
        self.total = max(1, int(total))
        self.start = 0  # the step the current cosine starts from
        self.start_factor = 1.0

    def __call__(self, step: int) -> float:
        span = max(1, self.total - self.start)
        u = min(max(step - self.start, 0), span) / span
        return self.start_factor * 0.5 * (1.0 + math.cos(math.pi * u))

    def stretch(self, step: int, total: int) -> None:
        """Go on from `step` with the factor reached there, down to 0 at step `total`."""
        total = max(int(total), int(step) + 1)
        if total != self.total:
            self.start_factor, self.start, self.total = self(step), int(step), total


def continue_schedule(sched: torch.optim.lr_scheduler.LRScheduler, total: int) -> bool:
    """Stretch a loaded `cosine_span: run` schedule to a run of `total` local steps (when
    the run's length changed on resume); True when it did."""
    lambdas = getattr(sched, "lr_lambdas", [])
    changed = False
    for f in lambdas:
        if isinstance(f, RunCosine) and f.total != max(1, int(total)):
            f.stretch(sched.last_epoch, total)
            changed = True
    if changed:  # the LR of the step reached, under the stretched schedule
        groups = sched.optimizer.param_groups
        for group, base, f in zip(groups, sched.base_lrs, lambdas, strict=True):
            group["lr"] = base * f(sched.last_epoch)
    return changed


def build_sgd(
    params: list[nn.Parameter],
    lr: float,
    momentum: float,
    weight_decay: float,
    scheduler: str,
    span_steps: int,
    cosine_span: str,
    restarts_every: int,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD plus a per-step scheduler. `restarts_every` is the client's local steps per round,
    `span_steps` its local steps over the whole run."""
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if scheduler == "constant":
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    elif cosine_span == "round":
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            opt, T_0=max(1, restarts_every)
        )
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, RunCosine(span_steps))
    return opt, sched


def optimizer_for(
    params: list[nn.Parameter], optim: OptimConfig, steps_per_round: int, rounds: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """`build_sgd` for `params` with the settings of `optim`, over a client's local steps."""
    return build_sgd(
        params,
        optim.lr,
        optim.momentum,
        optim.weight_decay,
        optim.scheduler,
        steps_per_round * rounds,
        optim.cosine_span,
        steps_per_round,
    )
