"""FedPGP: a shared global context plus a personal low-rank term, with a prompt-wise
contrastive loss.

Cui, Li, Wang, Shi, "Harmonizing Generalization and Personalization in Federated Prompt
Learning", ICML 2024. Each client holds a global context sigma (n_ctx x W, uploaded and
averaged) and personal factors U (n_ctx x r), V (r x W) that never leave it. Its
classifier is the CoOp text path under the personal context U V + sigma:

    t = text(U V + sigma),  t^sigma = text(sigma),  t^0 = text(anchor)  (all normalised)
    L = CE(s f t^T, y) + mu * mean_c CE([cos(t^0_c, t^sigma_c), cos(t^sigma_c, t_c)] / temp, 0)

The contrastive term pulls the global prompt towards the frozen anchor (pre-trained
knowledge: generalisation) and pushes it away from the personal prompt (personalisation).
The anchor is frozen: computed once per class set and cached.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedclip.backbone import FrozenCLIP
from fedclip.batch import Batch
from fedclip.errors import ConfigError
from fedclip.learners.textual import TextualPrompt
from fedclip.templates import POSITIONAL, check_template

PLACEHOLDER_ANCHOR = "placeholder"


def prompt_contrastive_loss(anchor: Tensor, glob: Tensor, personal: Tensor, temp: float) -> Tensor:
    """mean_c CE([cos(anchor_c, glob_c), cos(glob_c, personal_c)] / temp, target 0) over the
    C rows of three (C, D) feature matrices (the positive pair first)."""
    pos = F.cosine_similarity(anchor, glob, dim=-1)  # (C,)
    neg = F.cosine_similarity(glob, personal, dim=-1)  # (C,)
    logits = torch.stack([pos, neg], dim=1).float() / temp  # (C, 2)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)


class LowRankPersonalPrompt(TextualPrompt):
    """FedPGP's learner: a global context `ctx` (sigma, uploaded) plus a personal low-rank
    term `U` @ `V` (never uploaded); the logits use the context U V + sigma.

    All three are trained by one SGD (the run's `optim`). At initialisation all three are
    N(0, 0.02^2) from the run's seed (the same on every client), or sigma from `ctx_init`.

    Args:
        n_ctx: context tokens (16 in the paper).
        bottleneck: the rank r of U V (8 in the authors' script; their argparse default is 4).
        mu: weight of the contrastive loss (0.5 in the script; argparse default 1).
        temp: temperature of the contrastive logits (0.5).
        anchor: the frozen anchor t^0: 'placeholder' (the reference: the frozen text of the
            tokenised "X X ... X {class}." with no learned context) or a hand-written
            template with '{}' for the class name, e.g. "a photo of a {}.".
        ctx_init: phrase that initialises sigma (U, V stay random); null: N(0, 0.02^2).
        class_token_position: 'end', 'middle' or 'front' (as TextualPrompt).
    """

    # multi-label is refused: the contrastive anchor has no negative counterpart
    supports_multilabel = False
    global_description = "the global context sigma alone (no U V), on the pooled feature"

    def __init__(
        self,
        n_ctx: int = 16,
        bottleneck: int = 8,
        mu: float = 0.5,
        temp: float = 0.5,
        anchor: str = PLACEHOLDER_ANCHOR,
        ctx_init: str | None = None,
        class_token_position: Literal["end", "middle", "front"] = "end",
    ) -> None:
        super().__init__(n_ctx, ctx_init, False, class_token_position)
        if bottleneck < 1:
            raise ConfigError(f"learner.init_args.bottleneck={bottleneck}: must be >= 1")
        if not mu >= 0:
            raise ConfigError(f"learner.init_args.mu={mu}: must be >= 0")
        if not temp > 0:
            raise ConfigError(f"learner.init_args.temp={temp}: must be > 0")
        if anchor != PLACEHOLDER_ANCHOR:  # a template with '{}' for the class name
            check_template("LowRankPersonalPrompt", "anchor", anchor, [POSITIONAL], [POSITIONAL])
        self.bottleneck = bottleneck
        self.mu = float(mu)
        self.temp = float(temp)
        self.anchor = anchor
        # frozen anchor features (C, D) per class set, computed once each
        self._anchors: dict[tuple[str, ...], Tensor] = {}

    def setup(self, clip: FrozenCLIP, classnames: list[str], seed: int) -> None:
        super().setup(clip, classnames, seed)  # ctx = sigma (n_ctx, W)
        gen = torch.Generator().manual_seed(seed + 1000)
        u = torch.randn(self.n_ctx, self.bottleneck, generator=gen) * 0.02
        v = torch.randn(self.bottleneck, clip.text_width, generator=gen) * 0.02
        self.U = nn.Parameter(u.to(clip.device))
        self.V = nn.Parameter(v.to(clip.device))
        self._anchors = {}

    # ---- the three contexts ------------------------------------------------------------
    def personal_context(self) -> Tensor:
        """U V + sigma, (n_ctx, W)."""
        return self.U @ self.V + self.ctx

    def anchor_features(self) -> Tensor:
        """The frozen anchor t^0 (C, D) of the current class set (computed once per set)."""
        key = tuple(self.classnames)
        if key not in self._anchors:
            with torch.no_grad():
                self._anchors[key] = self._compute_anchor().detach()
        return self._anchors[key].to(self.ctx.device)

    def _compute_anchor(self) -> Tensor:
        if self.anchor == PLACEHOLDER_ANCHOR:
            # the placeholder tokens' own embeddings as the context: the sentence itself
            return self.encode_context(self._placeholder_context())
        names = [c.replace("_", " ") for c in self.classnames]
        return self.clip.encode_text([self.anchor.format(n) for n in names])

    def _placeholder_context(self) -> Tensor:
        """(n_ctx, W) input embeddings of the n_ctx 'X' tokens of the layout."""
        with torch.no_grad():
            return self.clip.token_embedding(self.tokens[0, self.ctx_pos[0]]).float()

    def text_features(self) -> Tensor:
        if self.using_global:
            return self.encode_context(self.ctx)
        return self.encode_context(self.personal_context())

    def training_loss(self, batch: Batch) -> Tensor:
        t = self.encode_context(self.personal_context())  # (C, D)
        logits = self.scores(self.image_features(batch), t)
        loss = self.loss(logits, batch)
        if self.mu == 0:
            return loss
        t_sigma = self.encode_context(self.ctx)
        return loss + self.mu * prompt_contrastive_loss(
            self.anchor_features(), t_sigma, t, self.temp
        )

    # ---- the reference path ------------------------------------------------------------
    def reference_logits(self, images: Tensor) -> Tensor | None:
        """The image encoder and the full-length prompts under U V + sigma at every step."""
        with torch.no_grad():
            f = self.clip.encode_image(images)
        return self.scores(f, self.reference_text(self.personal_context()))

    def reference_loss(self, images: Tensor, batch: Batch) -> Tensor | None:
        """CE plus the contrastive term with sigma's and the anchor's full-length prompts
        encoded at every step (the anchor is not cached)."""
        with torch.no_grad():
            f = self.clip.encode_image(images)
        t = self.reference_text(self.personal_context())
        loss = self.loss(self.scores(f, t), batch)
        t_sigma = self.reference_text(self.ctx)
        with torch.no_grad():
            if self.anchor == PLACEHOLDER_ANCHOR:
                t0 = self.reference_text(self._placeholder_context())
            else:
                t0 = self._compute_anchor()
        return loss + self.mu * prompt_contrastive_loss(t0, t_sigma, t, self.temp)

    # ---- what travels ------------------------------------------------------------------
    def shared_keys(self) -> list[str]:
        """sigma (`ctx`) only."""
        return ["ctx"]

    def personal_keys(self) -> list[str]:
        """The low-rank factors U and V never leave the client."""
        return ["U", "V"]

    def initial_state(self) -> str:
        if self.ctx_init:
            return f"sigma = '{self.ctx_init}' plus a random rank-{self.bottleneck} term"
        return f"random sigma plus a random rank-{self.bottleneck} term (not zero-shot)"
