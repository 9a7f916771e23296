"""Independent vision-language prompts: a text context and visual prompt tokens, deep.

The baseline of Khattak et al., "MaPLe: Multi-modal Prompt Learning" (CVPR 2023), there
called IVLP (independent V-L prompting); FedTPG and PMFLT ship a federated "VLP"; PromptSRC
(ICCV 2023) trains the same prompts with regularisers. The text side is CoOp's context at
the input of the text tower plus deep text prompts that replace the context's hidden states
before text blocks 1 .. J_t-1; the vision side appends n_v visual prompt tokens to the
image's tokens (before the pre-norm by default) and replaces them before vision blocks
1 .. J_v-1. All of them are learned independently, all of them travel (FedAvg).

`VisionLanguagePrompt` is also the base of the coupled prompts (`fedclip.learners.maple`)
and of learners that add losses to these prompts: its hooks are `prompted_text_features()`,
`prompted_image_features(images)`, `text_context()`, `deep_text_prompts()`,
`vision_prompts()` and `deep_vision_prompts()`.

Needs a vision tower with tokens (open_clip ViT, timm ViT/EVA towers); ResNet and FastViT
towers are refused at setup in one line.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from fedclip.backbone import FrozenCLIP
from fedclip.batch import Batch, Input
from fedclip.errors import ConfigError
from fedclip.learners.textual import TextualPrompt

Variant = Literal["maple_repo", "fedtpg"]
ARGS = "learner.init_args"


class VisionLanguagePrompt(TextualPrompt):
    """IVLP: independent text and visual prompts, deep, all of them shared (FedAvg).

    Learned (all uploaded): `ctx` (n_ctx, W), the text context at the input; `deep_text`
    (J_t-1, n_ctx, W), the context rows' hidden states before text blocks 1 .. J_t-1;
    `visual` (n_vision, V), visual prompt tokens at the input (no position embedding);
    `deep_visual` (J_v-1, n_vision, V), their replacements before vision blocks 1 .. J_v-1.
    Deep and visual prompts start from N(0, 0.02^2); a tensor with no rows is not created.

    Args:
        n_ctx: text context tokens (n_t).
        ctx_init: phrase initialising the context when n_ctx <= 4, as the MaPLe repository
            does: the context starts as the phrase's first n_ctx token embeddings and the
            phrase's remaining words stay in every prompt as fixed tokens ("a photo of a",
            n_ctx 2: [SOS] ctx_1 ctx_2 "of" "a" {class} "." [EOT]); with n_ctx > 4 or null,
            the context is drawn from N(0, 0.02^2) and the prompt is the context alone.
        n_vision: visual prompt tokens (n_v); 0: the vision tower is not prompted.
        text_depth: J_t, the text blocks whose input holds learned context rows (1: the
            input alone); null: 12, or all the text blocks when the tower has fewer.
        vision_depth: J_v, likewise for the visual prompts; null: 12 or all vision blocks.
        variant: 'maple_repo' (the MaPLe repository's IVLP: the context gets the position
            embedding, visual prompts before the pre-norm) or 'fedtpg' (FedTPG/PMFLT's VLP:
            the context enters block 0 as a hidden state, without the position embedding,
            visual prompts after the pre-norm, random initialisation: ctx_init must be null).
        after_norm: visual prompts appended after the vision tower's pre-norm (ln_pre)
            instead of before it; null: the variant's (maple_repo false, fedtpg true).
    """

    inputs: ClassVar[frozenset[Input]] = frozenset({Input.IMAGES})
    supports_multilabel: ClassVar[bool] = False
    default_depth: ClassVar[int] = 12

    def __init__(
        self,
        n_ctx: int = 2,
        ctx_init: str | None = "a photo of a",
        n_vision: int = 2,
        text_depth: int | None = None,
        vision_depth: int | None = None,
        variant: Variant = "maple_repo",
        after_norm: bool | None = None,
    ) -> None:
        super().__init__(n_ctx=n_ctx, ctx_init=ctx_init)
        if variant not in {"maple_repo", "fedtpg"}:
            raise ConfigError(f"{ARGS}.variant={variant!r}: must be maple_repo or fedtpg")
        if variant == "fedtpg" and self.ctx_init:
            raise ConfigError(
                f"{ARGS}.ctx_init={ctx_init!r}: the fedtpg variant initialises the context at "
                "random (FedTPG's VLP); set ctx_init: null"
            )
        if n_vision < 0:
            raise ConfigError(f"{ARGS}.n_vision={n_vision}: must be >= 0")
        for key, depth in (("text_depth", text_depth), ("vision_depth", vision_depth)):
            if depth is not None and depth < 1:
                raise ConfigError(f"{ARGS}.{key}={depth}: must be >= 1")
        self.n_vision = n_vision
        self.text_depth = text_depth
        self.vision_depth = vision_depth
        self.variant = variant
        self.after_norm = (variant == "fedtpg") if after_norm is None else bool(after_norm)
        self._fixed: list[int] = []  # token ids of the phrase's words kept after the context

    # ---- set-up ------------------------------------------------------------------------
    def setup(self, clip: FrozenCLIP, classnames: list[str], seed: int) -> None:
        clip.check_visual_prompts()  # one line on towers without tokens (RN, FastViT)
        self._depths = self._resolve_depths(clip)  # (J_t, J_v)
        super().setup(clip, classnames, seed)  # ctx (phrase or random) and the layout
        gen = torch.Generator().manual_seed(seed + 2)  # the same prompts on every client
        n, w, jt = self.n_ctx, clip.text_width, self._depths[0]
        if jt > 1:
            self.deep_text = nn.Parameter(self._normal(gen, jt - 1, n, w))
        self._build_vision(clip, gen, seed)

    def _resolve_depths(self, clip: FrozenCLIP) -> tuple[int, int]:
        """(J_t, J_v): the configured depths, or the default capped at each tower's blocks."""
        return (
            self._depth(clip, "text_depth", self.text_depth, clip.text_layers),
            self._depth(clip, "vision_depth", self.vision_depth, clip.vision_layers),
        )

    def _depth(self, clip: FrozenCLIP, key: str, depth: int | None, *layers: int) -> int:
        if depth is None:
            return min(self.default_depth, *layers)
        if depth > min(layers):
            raise ConfigError(
                f"{ARGS}.{key}={depth}: {clip.name} has only {min(layers)} blocks in a tower "
                "this depth prompts"
            )
        return depth

    @staticmethod
    def _normal(gen: torch.Generator, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    def _build_vision(self, clip: FrozenCLIP, gen: torch.Generator, seed: int) -> None:
        """The vision side's parameters: independent tokens here."""
        p, v, jv = self.n_vision, clip.vision_width, self._depths[1]
        if p:
            self.visual = nn.Parameter(self._normal(gen, p, v))
            if jv > 1:
                self.deep_visual = nn.Parameter(self._normal(gen, jv - 1, p, v))

    def _initial_context(self, clip: FrozenCLIP, seed: int) -> Tensor:
        """The MaPLe repository's rule: the phrase's first n_ctx embeddings when n_ctx <= 4
        (the rest of the phrase stays as fixed words), else N(0, 0.02^2)."""
        self._fixed = []
        if not self.ctx_init or self.n_ctx > 4:
            gen = torch.Generator().manual_seed(seed)
            return (torch.randn(self.n_ctx, clip.text_width, generator=gen) * 0.02).to(clip.device)
        phrase = self._phrase_context(clip, self.ctx_init)  # (k, W)
        if phrase.shape[0] < self.n_ctx:
            raise ConfigError(
                f"{ARGS}.ctx_init={self.ctx_init!r}: {phrase.shape[0]} tokens, fewer than "
                f"n_ctx={self.n_ctx}"
            )
        ids = clip.tokenize([self.ctx_init.replace("_", " ")])[0]
        off = clip.layout.offset
        self._fixed = ids[off + self.n_ctx : off + phrase.shape[0]].tolist()
        return phrase[: self.n_ctx]

    def _layout(self, clip: FrozenCLIP, classnames: list[str], n_ctx: int) -> tuple[Tensor, Tensor]:
        """CoOp's layout with the phrase's fixed words right after the context:
        [SOS] ctx {fixed words} {class} . [EOT]. The fixed words belong to every class's
        suffix in the shared-prefix path, so the prefix ([SOS] + context) stays exactly the
        context rows the deep prompts replace."""
        k = len(self._fixed)
        tokens, ctx_pos = super()._layout(clip, classnames, n_ctx + k)
        if k:
            off = clip.layout.offset
            tokens = tokens.clone()
            tokens[:, off + n_ctx : off + n_ctx + k] = torch.tensor(self._fixed).to(tokens)
            ctx_pos = ctx_pos[:, :n_ctx].contiguous()
        return tokens, ctx_pos

    # ---- the prompts (hooks for subclasses) ----------------------------------------------
    def text_context(self) -> Tensor:
        """(n_ctx, W) what goes into the context rows of the input embeddings: the context,
        or (fedtpg) the context minus the position embedding of its rows, so that the
        tower's own position embedding leaves exactly the context as block 0's input."""
        if self.variant == "maple_repo":
            return self.ctx
        pos = self.clip.text.positional_embedding[self.ctx_pos[0]]  # (n_ctx, W)
        return self.ctx - pos.to(self.ctx.dtype)

    def deep_text_prompts(self) -> list[Tensor]:
        """J_t-1 tensors (n_ctx, W): the context rows before text blocks 1 .. J_t-1."""
        return list(self.deep_text.unbind(0)) if hasattr(self, "deep_text") else []

    def vision_prompts(self) -> Tensor | None:
        """(n_vision, V) visual prompt tokens at the input, or None (tower unprompted)."""
        return getattr(self, "visual", None)

    def deep_vision_prompts(self) -> list[Tensor]:
        """J_v-1 tensors (n_vision, V): the prompt rows before vision blocks 1 .. J_v-1."""
        return list(self.deep_visual.unbind(0)) if hasattr(self, "deep_visual") else []

    # ---- the two towers ------------------------------------------------------------------
    def prompted_text_features(self) -> Tensor:
        """Normalised class features (C, D) of the prompted text tower (shared prefix when
        exact: the prefix [SOS] + context stays class-independent at every layer)."""
        return self.encode_context(self.text_context(), deep=self.deep_text_prompts())

    def prompted_image_features(self, images: Tensor) -> Tensor:
        """Normalised image features (B, D) of the prompted vision tower."""
        prompts = self.vision_prompts()
        if prompts is None:
            return self.clip.encode_image(images)
        return self.clip.encode_image(
            images, prompts=prompts, deep=self.deep_vision_prompts(), after_norm=self.after_norm
        )

    def text_features(self) -> Tensor:
        return self.prompted_text_features()

    def image_features(self, batch: Batch) -> Tensor:
        return self.prompted_image_features(batch.images)

    def forward(self, batch: Batch) -> Tensor:
        return self.scores(self.image_features(batch), self.class_text_features())

    # ---- reference path, description, what travels ---------------------------------------
    def reference_logits(self, images: Tensor) -> Tensor:
        """The public code's way: the full 77-token prompts of every class through the deep
        prompted text tower at every step, the prompted vision tower."""
        t = self.reference_text(self.text_context(), deep=self.deep_text_prompts())
        return self.scores(self.prompted_image_features(images), t)

    def initial_state(self) -> str:
        if self.ctx_init and self.n_ctx <= 4:
            text = f"the context from '{self.ctx_init}'"
        else:
            text = "a random context"
        return f"{text} with random deep and visual prompts (not zero-shot)"

    def shared_keys(self) -> list[str]:
        """Every prompt: nothing is personal."""
        return [name for name, _ in self.named_parameters()]
