"""Visual prompt tuning on CLIP: learned tokens in the frozen vision tower, frozen text side.

Jia et al., "Visual Prompt Tuning", ECCV 2022, in CLIP as the MaPLe repository's VPT
baseline (Khattak et al., CVPR 2023): P prompt tokens (P, V) appended to the image's tokens
before the pre-norm (shallow), and, deep, (J-1) further sets replacing them before blocks
1 .. J-1. The classifier is the frozen text feature of "a photo of a {class}." per class,
computed once per class set.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from fedclip.backbone import FrozenCLIP
from fedclip.batch import Batch, Input
from fedclip.errors import ConfigError
from fedclip.learners.base import PromptLearner
from fedclip.templates import POSITIONAL, check_template


def patch_size(clip: FrozenCLIP) -> int:
    """The side of the vision tower's square patches (open_clip or timm ViT)."""
    visual = clip.model.visual
    trunk = getattr(visual, "trunk", None)
    size = trunk.patch_embed.patch_size if trunk is not None else visual.patch_size
    return int(size[0] if isinstance(size, tuple | list) else size)


def init_prompts(shape: tuple[int, ...], init: str, patch: int, seed: int) -> Tensor:
    """Prompt tokens of `shape` (..., V), deterministic in `seed`: 'normal' N(0, 0.02^2)
    (the CLIP-side convention), 'uniform' U(-a, a) with a = sqrt(6 / (3 patch^2 + V)), the
    original VPT's xavier-style range for a patch embedding of fan-in 3 patch^2."""
    gen = torch.Generator().manual_seed(seed)
    if init == "normal":
        return torch.randn(shape, generator=gen) * 0.02
    a = math.sqrt(6.0 / (3 * patch * patch + shape[-1]))
    return (torch.rand(shape, generator=gen) * 2 - 1) * a


class VisualPromptTuning(PromptLearner):
    """VPT: visual prompt tokens learned in the frozen image encoder, classified against the
    frozen text features of a template. Everything learned is shared (FedAvg of the tokens).

    Args:
        num_prompts: P, prompt tokens per layer.
        deep: also replace the prompt rows before blocks 1 .. depth-1 (VPT-deep).
        depth: J, the number of prompted layers when deep (null: every block of the
            tower); must not exceed the tower's block count.
        init: 'normal' N(0, 0.02^2) (the MaPLe repository's VPT) or 'uniform', the
            original's U(-a, a), a = sqrt(6 / (3 patch^2 + V)).
        template: the frozen classifier's sentence, '{}' for the class name.
        negative_template: multi-label only: the frozen negative sentence; a class's logit
            is s cos(f, t+) - s cos(f, t-).
    """

    inputs = frozenset({Input.IMAGES})

    def __init__(
        self,
        num_prompts: int = 8,
        deep: bool = False,
        depth: int | None = None,
        init: Literal["normal", "uniform"] = "normal",
        template: str = "a photo of a {}.",
        negative_template: str = "a photo without a {}.",
    ) -> None:
        super().__init__()
        if num_prompts < 1:
            raise ConfigError(f"learner.init_args.num_prompts={num_prompts}: must be >= 1")
        if depth is not None and depth < 1:
            raise ConfigError(f"learner.init_args.depth={depth}: must be >= 1 or null")
        if init not in {"normal", "uniform"}:
            raise ConfigError(f"learner.init_args.init={init!r}: must be 'normal' or 'uniform'")
        for arg, value in (("template", template), ("negative_template", negative_template)):
            check_template(type(self).__name__, arg, value, [POSITIONAL], [POSITIONAL])
        self.num_prompts = num_prompts
        self.deep = deep
        self.depth = depth
        self.init = init
        self.template = template
        self.negative_template = negative_template
        self._text: dict[tuple[str, ...], Tensor] = {}

    # ---- set-up ------------------------------------------------------------------------
    def prompted_layers(self, clip: FrozenCLIP) -> int:
        """J: 1 when shallow, `depth` (default all blocks) when deep; refused in one line
        when the tower has fewer blocks."""
        if not self.deep:
            return 1
        blocks = int(clip.vision_layers)
        if self.depth is not None and self.depth > blocks:
            raise ConfigError(
                f"learner.init_args.depth={self.depth}: {clip.name}'s vision tower has "
                f"{blocks} blocks"
            )
        return blocks if self.depth is None else self.depth

    def setup(self, clip: FrozenCLIP, classnames: list[str], seed: int) -> None:
        super().setup(clip, classnames, seed)
        clip.check_visual_prompts()  # one line for towers without tokens (RN, FastViT)
        v, patch, p = clip.vision_width, patch_size(clip), self.num_prompts
        self.layers = self.prompted_layers(clip)
        device = clip.device
        self.prompts = nn.Parameter(init_prompts((p, v), self.init, patch, seed).to(device))
        if self.layers > 1:
            deep = init_prompts((self.layers - 1, p, v), self.init, patch, seed + 1)
            self.deep_prompts = nn.Parameter(deep.to(device))
        self._text.clear()
        self.text_features()  # the frozen classifier of the training classes, now

    def _classes_changed(self) -> None:
        self.text_features()

    # ---- the frozen text side ------------------------------------------------------------
    @torch.no_grad()
    def _frozen(self, template: str) -> Tensor:
        key = (template, *self.classnames)
        if key not in self._text:
            names = [c.replace("_", " ") for c in self.classnames]
            feats = self.clip.encode_text([template.format(n) for n in names])
            self._text[key] = feats.float()
        return self._text[key]

    def text_features(self) -> Tensor:
        """Frozen normalised features (C, D) of `template`, once per class set."""
        return self._frozen(self.template)

    def negative_text_features(self) -> Tensor:
        return self._frozen(self.negative_template)

    # ---- the prompted image ------------------------------------------------------------
    def deep_list(self) -> list[Tensor] | None:
        """The J-1 replacements (P, V) for blocks 1 .. J-1 (None when shallow)."""
        return list(self.deep_prompts.unbind(0)) if self.layers > 1 else None

    def prompted_features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, D) normalised features under the prompts."""
        return self.clip.encode_image(images, prompts=self.prompts, deep=self.deep_list())

    def forward(self, batch: Batch) -> Tensor:
        return self.scores(self.prompted_features(batch.images), self.class_text_features())

    # ---- the reference path (benchmarks) ----------------------------------------------
    def reference_logits(self, images: Tensor) -> Tensor | None:
        """The frozen text re-encoded at the tokenizer's full length at every step (the
        public code's way), the prompted image pass as in `forward` (single-label)."""
        if self.multilabel:
            return None
        names = [c.replace("_", " ") for c in self.classnames]
        tokens = self.clip.tokenize([self.template.format(n) for n in names])  # (C, 77)
        with torch.no_grad():
            embeds = self.clip.token_embedding(tokens)
            t = self.clip.encode_prompted_text(embeds, tokens, truncate=False)
        return self.scores(self.prompted_features(images), t.float())

    # ---- what travels ------------------------------------------------------------------
    def shared_keys(self) -> list[str]:
        """Every prompt token (nothing is personal)."""
        return ["prompts", "deep_prompts"] if self.layers > 1 else ["prompts"]

    def initial_state(self) -> str:
        kind = f"deep ({self.depth or 'all'} layers)" if self.deep else "shallow"
        return (
            f"{self.num_prompts} random {kind} visual prompts ({self.init}) with the frozen "
            f"'{self.template.replace('{}', '{class}')}' classifier (not zero-shot)"
        )
