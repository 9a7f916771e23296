"""PromptSRC (Khattak et al., "Self-regulating Prompts", ICCV 2023): IVLP prompts with three
self-regularisers towards the frozen model.

L = CE(logits, y) + lambda_t L1(t, t^zs) + lambda_i L1(f, f^zs)
  + KL(softmax(z) || softmax(logits)) / (B C)   (sum-reduced, both temperatures 1)

t: the prompted class features (C, D); t^zs: the normalised mean of the frozen features of
the 60 ImageNet templates per class (once per class set); f: the prompted image features
(B, D); f^zs: the frozen unprompted features of the same images (cached when the images
are not augmented); z = s f^zs t^zs^T the zero-shot logits. L1 is the mean absolute
difference over all elements. The Gaussian prompt aggregation is the server's
(`fedclip.strategies.GaussianPromptAggregation`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fedclip.backbone import FrozenCLIP
from fedclip.batch import Batch, Input
from fedclip.errors import ConfigError
from fedclip.learners.multimodal import ARGS, Variant, VisionLanguagePrompt
from fedclip.templates import IMAGENET_TEMPLATES, POSITIONAL, check_templates


def self_regulating_terms(
    logits: Tensor, f: Tensor, t: Tensor, f_zs: Tensor, t_zs: Tensor, scale: Tensor | float
) -> dict[str, Tensor]:
    """PromptSRC's three regularisers (unweighted): {'text': L1(t, t^zs), 'image':
    L1(f, f^zs), 'logits': KL(softmax(z) || softmax(logits)) / (B C), z = s f^zs t^zs^T}."""
    f_zs, t_zs = f_zs.to(f.dtype), t_zs.to(t.dtype)
    z = scale * f_zs.float() @ t_zs.float().t()  # (B, C) zero-shot logits
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_q = F.log_softmax(z, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum() / logits.numel()
    return {
        "text": (t.float() - t_zs.float()).abs().mean(),
        "image": (f.float() - f_zs.float()).abs().mean(),
        "logits": kl,
    }


def self_regulated_loss(
    logits: Tensor,
    labels: Tensor,
    f: Tensor,
    t: Tensor,
    f_zs: Tensor,
    t_zs: Tensor,
    scale: Tensor | float,
    lambda_text: float = 25.0,
    lambda_image: float = 10.0,
) -> Tensor:
    """CE + lambda_t L1(t, t^zs) + lambda_i L1(f, f^zs) + the logit KL (see the module)."""
    terms = self_regulating_terms(logits, f, t, f_zs, t_zs, scale)
    ce = F.cross_entropy(logits.float(), labels)
    return ce + lambda_text * terms["text"] + lambda_image * terms["image"] + terms["logits"]


@torch.no_grad()
def template_features(
    clip, classnames: list[str], templates: tuple[str, ...], chunk: int = 1024
) -> Tensor:
    """normalise(mean over `templates` of the frozen text features) (C, D); the features
    are averaged before their normalisation, as the public code averages them. The T x C
    sentences are encoded `chunk` at a time."""
    names = [c.replace("_", " ") for c in classnames]
    sentences = [t.format(n) for t in templates for n in names]  # template-major
    feats = torch.cat(
        [clip.encode_text(sentences[i : i + chunk], normalize=False).float()
         for i in range(0, len(sentences), chunk)]
    )  # fmt: skip
    mean = feats.view(len(templates), len(names), -1).mean(0)  # (C, D)
    return mean / mean.norm(dim=-1, keepdim=True)


class SelfRegulatingPrompt(VisionLanguagePrompt):
    """PromptSRC's learner: IVLP prompts (4 + 4 tokens, depth 9 + 9 by default) trained
    with CE plus the three self-regularisers towards the frozen model (see the module).
    Everything learned is shared; pair it with `GaussianPromptAggregation` for the
    Gaussian-weighted model over rounds.

    Args:
        lambda_text: weight of L1(t, t^zs).
        lambda_image: weight of L1(f, f^zs).
        templates: the sentences averaged into t^zs (null: the 60 ImageNet templates).
        Others: as `VisionLanguagePrompt`.
    """

    # the images for the prompted pass, their frozen features as f^zs (cached unless the
    # images are augmented)
    inputs: ClassVar[frozenset[Input]] = frozenset({Input.IMAGES, Input.FEATURES})

    def __init__(
        self,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        n_vision: int = 4,
        text_depth: int | None = 9,
        vision_depth: int | None = 9,
        lambda_text: float = 25.0,
        lambda_image: float = 10.0,
        templates: list[str] | None = None,
        variant: Variant = "maple_repo",
        after_norm: bool | None = None,
    ) -> None:
        super().__init__(n_ctx, ctx_init, n_vision, text_depth, vision_depth, variant, after_norm)
        for key, value in (("lambda_text", lambda_text), ("lambda_image", lambda_image)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{ARGS}.{key}={value}: must be >= 0 and finite")
        self.templates = tuple(IMAGENET_TEMPLATES if templates is None else templates)
        check_templates(type(self).__name__, "templates", list(self.templates), [POSITIONAL],
                        [POSITIONAL])  # fmt: skip
        if not self.templates:
            raise ConfigError(f"{ARGS}.templates: needs at least one template")
        self.lambda_text = lambda_text
        self.lambda_image = lambda_image
        self._zero_shot: dict[tuple[str, ...], Tensor] = {}

    def setup(self, clip: FrozenCLIP, classnames: list[str], seed: int) -> None:
        super().setup(clip, classnames, seed)
        self._zero_shot.clear()
        self.zero_shot_text()  # the 60 x C frozen encodes now, not inside the first step

    def zero_shot_text(self) -> Tensor:
        """t^zs (C, D) of the current classes, computed once per class set."""
        key = tuple(self.classnames)
        if key not in self._zero_shot:
            self._zero_shot[key] = template_features(self.clip, self.classnames, self.templates)
        return self._zero_shot[key]

    def frozen_image_features(self, batch: Batch) -> Tensor:
        """f^zs (B, D): the batch's cached frozen features, or the frozen unprompted pass."""
        if batch.features is not None:
            return batch.features
        with torch.no_grad():
            return self.clip.encode_image(batch.images)

    def _loss(self, f: Tensor, t: Tensor, f_zs: Tensor, labels: Tensor) -> Tensor:
        logits = self.scores(f, t)
        return self_regulated_loss(
            logits, labels, f, t, f_zs, self.zero_shot_text(), self.clip.logit_scale,
            self.lambda_text, self.lambda_image,
        )  # fmt: skip

    def training_loss(self, batch: Batch) -> Tensor:
        f = self.prompted_image_features(batch.images)  # (B, D)
        t = self.prompted_text_features()  # (C, D)
        return self._loss(f, t, self.frozen_image_features(batch), batch.labels)

    def reference_loss(self, images: Tensor, batch: Batch) -> Tensor | None:
        """The public code's way: the 77-token prompts through the deep text tower and the
        frozen unprompted image pass at every step (t^zs precomputed, as there)."""
        t = self.reference_text(self.text_context(), deep=self.deep_text_prompts())
        with torch.no_grad():
            f_zs = self.clip.encode_image(images)
        return self._loss(self.prompted_image_features(images), t, f_zs, batch.labels)

    def initial_state(self) -> str:
        return super().initial_state() + "; regularised towards zero-shot CLIP"
