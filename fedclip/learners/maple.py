"""Coupled vision-language prompts: the visual prompts are linear maps of the text prompts.

Khattak, Rasheed, Maaz, Khan, Khan, "MaPLe: Multi-modal Prompt Learning" (CVPR 2023),
federated as in FLiP (FedAvg of every prompt-learner tensor). The text side is that of
`VisionLanguagePrompt` (a context at the input, deep text prompts P_j before text blocks
1 .. J-1); the vision side has no prompts of its own: its input prompts are proj0(ctx) and
its deep prompts before vision blocks 1 .. J-1 are F_j(P_j), with proj0 and the couplings
F_j linear maps W -> V (the F_j start as copies of one freshly initialised layer).
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from torch import Tensor, nn

from fedclip.backbone import FrozenCLIP
from fedclip.learners.multimodal import VisionLanguagePrompt


class CoupledPrompt(VisionLanguagePrompt):
    """MaPLe: a deep text prompt whose every layer is coupled to the vision tower.

    Learned (all uploaded): `ctx` (n_ctx, W); `deep_text` (J-1, n_ctx, W), N(0, 0.02^2);
    `proj0` Linear(W, V) (PyTorch's default init); `couplings` J-1 Linear(W, V), all equal
    at the start. Visual prompts: proj0(ctx) at the input (before the pre-norm), F_j(P_j)
    before vision block j. At ViT-B/16's defaults (n 2, J 9) about 3.56 M values travel per
    round, almost all of them in the nine linears.

    Args:
        n_ctx: context tokens, text and vision alike.
        ctx_init: as VisionLanguagePrompt's (the MaPLe repository's rule: with n_ctx 2,
            "a photo of a" initialises the context from "a photo" and "of a" stays fixed in
            every prompt).
        prompt_depth: J, the blocks of both towers whose input holds prompts; null: 9, or
            fewer when a tower has fewer blocks.
    """

    default_depth: ClassVar[int] = 9

    def __init__(
        self, n_ctx: int = 2, ctx_init: str | None = "a photo of a", prompt_depth: int | None = None
    ) -> None:
        super().__init__(
            n_ctx=n_ctx,
            ctx_init=ctx_init,
            n_vision=n_ctx,
            text_depth=prompt_depth,
            vision_depth=prompt_depth,
        )
        self.prompt_depth = prompt_depth

    def _resolve_depths(self, clip: FrozenCLIP) -> tuple[int, int]:
        """One depth J for both towers: the default is capped at the shorter tower."""
        j = self._depth(
            clip, "prompt_depth", self.prompt_depth, clip.text_layers, clip.vision_layers
        )
        return j, j

    def _build_vision(self, clip: FrozenCLIP, gen: torch.Generator, seed: int) -> None:
        w, v, j = clip.text_width, clip.vision_width, self._depths[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 3)  # the same linears on every client
            self.proj0 = nn.Linear(w, v)
            one = nn.Linear(w, v)
        self.couplings = nn.ModuleList(copy.deepcopy(one) for _ in range(j - 1))
        self.proj0.to(clip.device)
        self.couplings.to(clip.device)

    def vision_prompts(self) -> Tensor:
        """proj0(ctx): (n_ctx, V)."""
        return self.proj0(self.ctx)

    def deep_vision_prompts(self) -> list[Tensor]:
        """F_j(P_j), j = 1 .. J-1: (n_ctx, V) each."""
        return [f(p) for f, p in zip(self.couplings, self.deep_text_prompts(), strict=True)]

    def initial_state(self) -> str:
        return super().initial_state().replace("visual prompts", "coupled visual prompts")
