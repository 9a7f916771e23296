"""CoCoOp: a context conditioned on the image by a small meta-network.

Zhou, Yang, Loy, Liu, "Conditional Prompt Learning for Vision-Language Models" (CVPR 2022);
federated as in FLiP (`-palg CoCoOp`): FedAvg of everything, nothing personal.

A shared context ctx (n_ctx, W) and a meta-net pi = Linear(D, D/16) -> ReLU -> Linear(D/16, W)
fed the NORMALISED frozen image feature f_b. Image b's context is ctx + pi(f_b) (the same
vector added to every context token); its C class prompts go through the CoOp text path:

    t_{b,c} = text(SOS, ctx + pi(f_b), name_c, '.', EOT)   (normalised, (B, C, D))
    logit[b, c] = s <f_b, t_{b,c}> (+ the logit bias of sigmoid models); loss CE

Nothing text-side can be cached across images: every step encodes B x C sequences. With the
shared-prefix path (TextualPrompt.encode_contexts) each image's [SOS, context] runs once and
only the C class suffixes run per image; images are processed `chunk` at a time.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedclip.backbone import FrozenCLIP
from fedclip.errors import ConfigError
from fedclip.learners.base import Batch
from fedclip.learners.textual import TextualPrompt

# activations of one piece of the per-image text path stay under this (fp32 bytes)
CHUNK_BUDGET = 1 << 30


class ConditionalPrompt(TextualPrompt):
    """A learned context shifted per image by a meta-net on the image feature (CoCoOp).

    Trained and uploaded (FedAvg): the context and the meta-net; nothing personal (the
    global part is the model itself). Multi-label data sets are refused.

    Args:
        n_ctx: learned context tokens (with `ctx_init`, its own token count wins).
        ctx_init: phrase whose token embeddings initialise the context ("a photo of a");
            null draws it from N(0, 0.02^2).
        meta_hidden: hidden width of the meta-net; null: D // 16 (32 for ViT-B/16, 64 for
            RN50, 4 for the tiny backbones).
        chunk: images per piece of the per-image text path (B x C sequences in all); null:
            as many as keep chunk x C x S x W fp32 activations (S: the sequence length the
            text path runs) under 1 GiB. Only memory changes with it, never the result.
    """

    supports_multilabel = False

    def __init__(
        self,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        meta_hidden: int | None = None,
        chunk: int | None = None,
    ) -> None:
        super().__init__(n_ctx, ctx_init, False, "end")
        if meta_hidden is not None and meta_hidden < 1:
            raise ConfigError(f"learner.init_args.meta_hidden={meta_hidden}: must be >= 1")
        if chunk is not None and chunk < 1:
            raise ConfigError(f"learner.init_args.chunk={chunk}: must be >= 1")
        self.meta_hidden = meta_hidden
        self.chunk = chunk

    def setup(self, clip: FrozenCLIP, classnames: list[str], seed: int) -> None:
        super().setup(clip, classnames, seed)
        d, w = clip.embed_dim, clip.text_width
        hidden = self.meta_hidden if self.meta_hidden is not None else d // 16
        if hidden < 1:
            raise ConfigError(
                f"learner.init_args.meta_hidden: {clip.name}'s feature width {d} gives "
                f"D // 16 = 0; set meta_hidden"
            )
        # PyTorch's default init, the same on every client, without touching the caller's
        # random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            meta = nn.Sequential(
                OrderedDict(
                    [
                        ("linear1", nn.Linear(d, hidden)),
                        ("relu", nn.ReLU()),
                        ("linear2", nn.Linear(hidden, w)),
                    ]
                )
            )
        self.meta_net = meta.to(clip.device)

    # ---- computation -------------------------------------------------------------------
    def contexts(self, f: Tensor) -> Tensor:
        """Per-image contexts (B, n_ctx, W): ctx + pi(f_b) on every token; f (B, D) the
        normalised image features."""
        shift = self.meta_net(f.to(self.ctx.dtype))  # (B, W)
        return self.ctx.unsqueeze(0) + shift.unsqueeze(1)

    def chunk_size(self) -> int:
        """Images per piece of the per-image text path (`chunk`, or from the budget)."""
        if self.chunk is not None:
            return self.chunk
        tokens, _ = self.context_layout(self.ctx)
        length = tokens.shape[1]
        if self.uses_shared_prefix():  # only the class suffixes run per image
            length -= self.clip.layout.offset + self.n_ctx
        per_image = self.num_classes * max(length, 1) * self.clip.text_width * 4
        return max(1, CHUNK_BUDGET // per_image)

    def image_text_features(self, f: Tensor) -> Tensor:
        """Normalised class features of every image (B, C, D) under its own context."""
        return self.encode_contexts(self.contexts(f), chunk=self.chunk_size())

    def conditional_scores(self, f: Tensor, t: Tensor) -> Tensor:
        """s <f_b, t_{b,c}> + b: f (B, D), t (B, C, D) -> (B, C)."""
        f = f.to(t.dtype)
        logits = torch.einsum("bd,bcd->bc", f, t)
        return self.clip.logit_scale * logits + self.clip.logit_bias.to(f.dtype)

    def forward(self, batch: Batch) -> Tensor:
        f = self.image_features(batch)  # (B, D), normalised
        return self.conditional_scores(f, self.image_text_features(f))

    def text_features(self) -> Tensor:
        raise NotImplementedError(
            "ConditionalPrompt: class features depend on the image (image_text_features(f))"
        )

    # ---- the reference path (benchmarks) -----------------------------------------------
    def reference_image_text(self, ctxs: Tensor) -> Tensor:
        """(B, C, D) the reference way: B x C full-length prompts (77 tokens on CLIP) in one
        batch, no truncation, no shared prefix."""
        tokens, _ = self.context_layout(self.ctx)
        length = self.clip.tokenize(["x"]).shape[1]
        full = F.pad(tokens, (0, length - tokens.shape[1]), value=self.clip.layout.pad)
        embeds = torch.cat([self.prompt_embeddings(c, full) for c in ctxs])  # (B*C, 77, W)
        b, c = ctxs.shape[0], full.shape[0]
        t = self.clip.encode_prompted_text(embeds, full.repeat(b, 1), truncate=False)
        return t.view(b, c, -1)

    def reference_logits(self, images: Tensor) -> Tensor | None:
        """The image encoder and B x C full-length prompts at every step."""
        with torch.no_grad():
            f = self.clip.encode_image(images)
        return self.conditional_scores(f, self.reference_image_text(self.contexts(f)))

    # ---- what travels ------------------------------------------------------------------
    def shared_keys(self) -> list[str]:
        """The context and the meta-net (FedAvg of both)."""
        return ["ctx", *(f"meta_net.{n}" for n, _ in self.meta_net.named_parameters())]

    def initial_state(self) -> str:
        start = f"'{self.ctx_init} {{class}}.'" if self.ctx_init else "a random context"
        return f"{start} shifted per image by a random meta-net (not zero-shot)"
