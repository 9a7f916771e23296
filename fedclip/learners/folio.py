"""PromptFolio: a fixed mix of a global and a local prompt.

Pan, Huang, Shi, "Federated Learning from Vision-Language Foundation Models: Theoretical
Analysis and Method", NeurIPS 2024. Each client holds a global context g (uploaded and
averaged by weighted FedAvg) and a local context l (never uploaded); their normalised
class features are mixed with a fixed coefficient theta and NOT re-normalised:

    t = (1 - theta) * normalise(text(g)) + theta * normalise(text(l)),  logits = s f t^T

theta = 0 is fully global, theta = 1 fully local. The loss is cross-entropy only. Because
the mix is not re-normalised, the effective logit scale shrinks where t^g and t^l
disagree: that is the method.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from fedclip.backbone import FrozenCLIP
from fedclip.errors import ConfigError
from fedclip.learners.textual import TextualPrompt


class PromptPortfolio(TextualPrompt):
    """PromptFolio's learner: a global context `ctx` (uploaded) and a local context
    `ctx_local` (personal), mixed as (1 - theta) t^g + theta t^l.

    Both are trained by one SGD (the run's `optim`). Multi-label: a negative global context
    `ctx_neg` (uploaded) and a negative local one `ctx_neg_local` (personal), mixed with
    the same theta.

    Args:
        n_ctx: context tokens of each prompt (8, the authors' argparse default).
        theta: the fixed mixing coefficient in [0, 1] (0.4, the authors' README).
        ctx_init: phrase that initialises both prompts; null: each drawn from N(0, 0.02^2)
            (different draws, the same on every client).
        class_token_position: 'end', 'middle' or 'front' (as TextualPrompt).
        neg_ctx_init: multi-label only: phrase for both negative contexts (as TextualPrompt).
    """

    global_description = "the global prompt g alone (theta = 0), on the pooled feature"

    def __init__(
        self,
        n_ctx: int = 8,
        theta: float = 0.4,
        ctx_init: str | None = None,
        class_token_position: Literal["end", "middle", "front"] = "end",
        neg_ctx_init: str | None = None,
    ) -> None:
        super().__init__(n_ctx, ctx_init, False, class_token_position, neg_ctx_init)
        if not (isinstance(theta, int | float) and math.isfinite(theta) and 0 <= theta <= 1):
            raise ConfigError(f"learner.init_args.theta={theta}: must be in [0, 1]")
        self.theta = float(theta)

    def setup(self, clip: FrozenCLIP, classnames: list[str], seed: int) -> None:
        super().setup(clip, classnames, seed)  # ctx (and ctx_neg): the global prompts
        self.ctx_local = nn.Parameter(self._local_init(clip, seed + 2, self.ctx))
        if self.multilabel:
            self.ctx_neg_local = nn.Parameter(self._local_init(clip, seed + 3, self.ctx_neg))

    def _local_init(self, clip: FrozenCLIP, seed: int, glob: Tensor) -> Tensor:
        """From a phrase, the same as the global prompt; random, an independent draw."""
        if self.ctx_init:
            return glob.detach().clone()
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(self.n_ctx, clip.text_width, generator=gen) * 0.02).to(clip.device)

    def mix(self, t_global: Tensor, t_local: Tensor) -> Tensor:
        """(1 - theta) t^g + theta t^l, not re-normalised."""
        return (1 - self.theta) * t_global + self.theta * t_local

    def _mixed(self, glob: Tensor, local: Tensor) -> Tensor:
        t_global = self.encode_context(glob)
        if self.using_global or self.theta == 0:
            return t_global
        return self.mix(t_global, self.encode_context(local))

    def text_features(self) -> Tensor:
        return self._mixed(self.ctx, self.ctx_local)

    def negative_text_features(self) -> Tensor:
        return self._mixed(self.ctx_neg, self.ctx_neg_local)

    def reference_logits(self, images: Tensor) -> Tensor | None:
        """The image encoder and both prompts' full-length sequences at every step."""
        if self.multilabel:
            return None
        with torch.no_grad():
            f = self.clip.encode_image(images)
        t = self.mix(self.reference_text(self.ctx), self.reference_text(self.ctx_local))
        return self.scores(f, t)

    def shared_keys(self) -> list[str]:
        """The global prompt (and the negative global prompt when multi-label)."""
        return ["ctx", "ctx_neg"] if self.multilabel else ["ctx"]

    def personal_keys(self) -> list[str]:
        """The local prompt(s) never leave the client."""
        return ["ctx_local", "ctx_neg_local"] if self.multilabel else ["ctx_local"]

    def initial_state(self) -> str:
        if self.ctx_init:
            return super().initial_state() + " (both prompts)"
        return f"random global and local prompts mixed with theta {self.theta} (not zero-shot)"
