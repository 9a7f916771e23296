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

import torch
import torch.nn.functional as F
from torch import Tensor


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
def template_features(clip, classnames: list[str], templates: tuple[str, ...]) -> Tensor:
    """normalise(mean over `templates` of the frozen text features) (C, D); the features
    are averaged before their normalisation, as the public code averages them."""
    names = [c.replace("_", " ") for c in classnames]
    total = None
    for template in templates:
        feats = clip.encode_text(
            [template.format(n) for n in names], normalize=False
        ).float()  # (C, D)
        total = feats if total is None else total + feats
    mean = total / len(templates)
    return mean / mean.norm(dim=-1, keepdim=True)
