"""FrozenCLIP: one frozen open_clip model per process, with the hooks prompt learners need.

Every simulated client shares the same instance: the backbone is never copied and never
trained. Learners reach it through `tokenize`, `token_embedding`, `encode_prompted_text`
(exact truncation, METHODS.md section 0), `encode_image` (optionally with extra visual prompt
tokens), `encode_dense` (every image token in the joint space) and the frozen feature caches.
Visual prompts may be shallow or deep and go in before or after the pre-norm; deep text
prompts and one context per image (CoCoOp) go through the exact shared-prefix path where
the tower allows it.
The methods live in one mixin per path (text.py, vision.py, dense.py, cache.py); this module
holds the model, its sizes and the process-wide loader.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from fedclip.backbone.cache import FeatureCache
from fedclip.backbone.config import (
    BackboneConfig,
    check_model_name,
    make_tokenizer,
    open_model,
    quiet_random_init,
    resolve_pretrained,
)
from fedclip.backbone.dense import DensePath
from fedclip.backbone.text import TextPath, TextTower, TokenLayout
from fedclip.backbone.vision import VisionPath

log = logging.getLogger(__name__)

_LOADED: dict[tuple, FrozenCLIP] = {}


def load_backbone(cfg: BackboneConfig) -> FrozenCLIP:
    """Return the process-wide FrozenCLIP for `cfg`, building it on first use.

    Building never touches the caller's random state (it runs under a forked RNG seeded
    with 0), so a run draws the same random numbers whether the backbone was cached or not,
    and random-weight backbones (`pretrained: null`) are the same in every run.
    """
    key = (cfg.model, cfg.pretrained, cfg.force_quick_gelu)
    if key not in _LOADED:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _LOADED[key] = FrozenCLIP.from_config(cfg)
    return _LOADED[key]


class FrozenCLIP(TextPath, VisionPath, DensePath, FeatureCache, nn.Module):
    """A frozen open_clip model and the hooks prompt learners use.

    Build it with `load_backbone` (one instance per process). It is always in eval mode and
    none of its parameters require gradients; gradients still flow through it to prompts.
    """

    def __init__(self, model: nn.Module, tokenizer, preprocess_train, preprocess_val, name: str):
        super().__init__()
        model.eval().requires_grad_(False)
        self.model = model
        self.name = name
        self.tokenizer = tokenizer
        self.preprocess_train = preprocess_train
        self.preprocess_val = preprocess_val
        self.text = TextTower(model, name)
        self.layout = TokenLayout.probe(tokenizer)
        tower = self.text
        log.info(
            "%s: %s text tower, '%s' pooling, %d tokens: %s",
            name,
            "causal" if tower.causal else "bidirectional",
            tower.pool_type,
            int(tower.positional_embedding.shape[0]),
            "prompts are cut after the end token and share their prefix (exact)"
            if tower.shared_prefix
            else "prompts are cut after the end token (exact)"
            if tower.truncatable
            else "prompts run at full length (cutting them would not be exact)",
        )
        self.images_encoded = 0  # frozen image-encoder passes, counted per sample
        self.text_sequences_encoded = 0  # prompted text sequences run through the tower
        self._init_caches()

    @classmethod
    def from_config(cls, cfg: BackboneConfig) -> FrozenCLIP:
        check_model_name(cfg.model)
        with quiet_random_init():  # open_clip's notice while fedclip makes its own weights
            pretrained = resolve_pretrained(cfg)
        if pretrained is None:
            log.warning(
                "backbone %s has RANDOM weights (pretrained: null): its features are noise and "
                "its results say nothing about a real model; meant for tests (the offline "
                "demo uses pretrained: shapes, weights fedclip pre-trains on its Shapes data)",
                cfg.model,
            )
        tokenizer = make_tokenizer(cfg)  # before the model: a missing tokenizer fails fast
        with quiet_random_init():
            model, pre_train, pre_val = open_model(cfg, pretrained)
        return cls(model, tokenizer, pre_train, pre_val, cfg.model)

    def train(self, mode: bool = True) -> FrozenCLIP:
        # The backbone stays in eval mode whatever the caller asks (dropout, norms frozen).
        return super().train(False)

    # ---- sizes -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def embed_dim(self) -> int:
        """D, the joint embedding width (read once from a frozen text pass)."""
        if getattr(self, "_embed_dim", None) is None:
            self._embed_dim = int(self.encode_text(["a"]).shape[-1])
        return self._embed_dim

    @property
    def text_width(self) -> int:
        return int(self.text.token_embedding.weight.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.text.positional_embedding.shape[0])

    @property
    def logit_scale(self) -> Tensor:
        """s = exp(logit_scale) of the frozen model (a scalar tensor)."""
        return self.model.logit_scale.exp()

    @property
    def logit_bias(self) -> Tensor:
        """b of models trained with a sigmoid loss (SigLIP: logits s * cos + b), else 0.

        The same b is added to every class's logit, so it changes no softmax, cross-entropy,
        ranking or average precision; it makes the logits the model's own calibrated ones."""
        bias = getattr(self.model, "logit_bias", None)
        return bias if bias is not None else torch.zeros((), device=self.device)
