"""KgCoOp: a CoOp context pulled towards the hand-crafted template's text features.

Yao, Zhang, Xu, "Visual-Language Prompt Tuning with Knowledge-guided Context
Optimization" (CVPR 2023). The learned context is CoOp's (one context shared by every
class, federated as PromptFL's); the training loss adds a knowledge-guided term that keeps
the learned class features close to the frozen features of a hand-crafted sentence:

    loss = CE(s * f @ t(ctx)^T, y) + w * (1 - mean_c cos(t_c(ctx), t^zs_c))

t^zs_c = normalised frozen text feature of `template` for class c (the anchor), encoded
once per class set and cached: it costs one (C, D) tensor, nothing per step. With w = 0
the learner is CoOp exactly. Multi-label: the anchor pulls the positive context only; the
negative context trains as CoOp's.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fedclip.backbone import FrozenCLIP
from fedclip.batch import Batch
from fedclip.errors import ConfigError
from fedclip.learners.textual import TextualPrompt
from fedclip.templates import POSITIONAL, check_template


class KnowledgeGuidedPrompt(TextualPrompt):
    """CoOp's context plus a pull of its class features towards a template's (KgCoOp).

    Trained and uploaded: the context (and the negative context of multi-label tasks),
    as PromptFL's; nothing is personal.

    Args:
        n_ctx: learned context tokens (with `ctx_init`, its own token count wins).
        ctx_init: phrase that initialises the context ("a photo of a", the reference);
            null draws it from N(0, 0.02^2).
        w: weight of the knowledge-guided term (8 in the paper's base-to-novel runs; 0 is
            CoOp).
        template: the hand-crafted sentence of the anchor, '{}' for the class name (the
            data set's CoOp template in the paper, e.g. "a photo of a {}, a type of pet.").
        class_token_position: 'end', 'middle' or 'front' (as TextualPrompt).
        neg_ctx_init: multi-label only (as TextualPrompt).
    """

    def __init__(
        self,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        w: float = 8.0,
        template: str = "a photo of a {}.",
        class_token_position: Literal["end", "middle", "front"] = "end",
        neg_ctx_init: str | None = None,
    ) -> None:
        super().__init__(n_ctx, ctx_init, False, class_token_position, neg_ctx_init)
        if not (float(w) == float(w) and 0 <= float(w) < float("inf")):
            raise ConfigError(f"learner.init_args.w={w}: must be >= 0 and finite")
        check_template("KnowledgeGuidedPrompt", "template", template, [POSITIONAL], [POSITIONAL])
        self.w = float(w)
        self.template = template
        self._anchors: dict[tuple[str, ...], Tensor] = {}

    def setup(self, clip: FrozenCLIP, classnames: list[str], seed: int) -> None:
        super().setup(clip, classnames, seed)
        self._anchors = {}

    # ---- the anchor ------------------------------------------------------------------------
    @torch.no_grad()
    def anchor_features(self) -> Tensor:
        """Normalised frozen text features (C, D) of `template` for the current classes,
        encoded once per class set."""
        key = tuple(self.classnames)
        if key not in self._anchors:
            names = [c.replace("_", " ") for c in self.classnames]
            feats = self.clip.encode_text([self.template.format(n) for n in names]).float()
            self._anchors[key] = feats / feats.norm(dim=-1, keepdim=True)
        return self._anchors[key]

    def knowledge_term(self, t: Tensor) -> Tensor:
        """w * (1 - mean_c cos(t_c, t^zs_c)) of class features t (C, D) (both normalised)."""
        anchor = self.anchor_features().to(t.device)
        cos = (t.float() * anchor).sum(-1)  # (C,)
        return self.w * (1.0 - cos.mean())

    # ---- training --------------------------------------------------------------------------
    def training_loss(self, batch: Batch) -> Tensor:
        if self.w == 0.0:  # CoOp, the same computation
            return super().training_loss(batch)
        t = self._class_features()  # (C, D), multi-label (2, C, D): encoded once
        logits = self.scores(self.image_features(batch), t)
        positive = t[0] if self.multilabel else t
        return self.loss(logits, batch) + self.knowledge_term(positive)

    def reference_loss(self, images: Tensor, batch: Batch) -> Tensor | None:
        """The reference way: the image encoder, every class's 77-token prompt and the
        anchor's sentences re-encoded at every step."""
        if self.multilabel:
            return None
        with torch.no_grad():
            f = self.clip.encode_image(images)
            names = [c.replace("_", " ") for c in self.classnames]
            tokens = self.clip.tokenize([self.template.format(n) for n in names])
            anchor = self.clip.encode_prompted_text(
                self.clip.token_embedding(tokens), tokens, truncate=False
            ).float()
        t = self.reference_text(self.ctx)
        cos = torch.nn.functional.cosine_similarity(t.float(), anchor, dim=-1, eps=1e-7)
        return self.loss(self.scores(f, t), batch) + self.w * (1.0 - cos.mean())
