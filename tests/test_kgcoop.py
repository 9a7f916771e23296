"""KgCoOp's learner: the knowledge-guided term by hand (float64), w = 0 is CoOp exactly,
the anchor encoded once per class set, the reference path, multi-label."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedclip.errors import ConfigError
from fedclip.learners import Batch, KnowledgeGuidedPrompt, TextualPrompt, ZeroShot

NAMES = ["red circle", "green square", "blue triangle"]
OTHER = ["yellow star", "purple heart"]


def _build(clip, cls=KnowledgeGuidedPrompt, multilabel=False, **kw):
    learner = cls(**kw)
    learner.set_task(multilabel)
    learner.setup(clip, NAMES, seed=0)
    return learner


def _batch(clip, b=5, multilabel=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(b, clip.embed_dim, generator=g)
    f = f / f.norm(dim=-1, keepdim=True)
    if multilabel:
        labels = (torch.rand(b, len(NAMES), generator=g) > 0.5).float()
    else:
        labels = torch.randint(0, len(NAMES), (b,), generator=g)
    return Batch(labels=labels, index=torch.arange(b), features=f)


def test_knowledge_term_hand_computed_on_fixed_features(tiny_vit):
    learner = _build(tiny_vit, w=8.0)
    anchor = learner.anchor_features().double().numpy()
    rng = np.random.default_rng(3)
    t = rng.standard_normal(anchor.shape)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    cosines = []
    for c in range(t.shape[0]):  # explicit cosine per class
        dot = sum(t[c, d] * anchor[c, d] for d in range(t.shape[1]))
        na = math.sqrt(sum(x * x for x in anchor[c]))
        nt = math.sqrt(sum(x * x for x in t[c]))
        cosines.append(dot / (na * nt))
    want = 8.0 * (1.0 - sum(cosines) / len(cosines))
    got = learner.knowledge_term(torch.tensor(t, dtype=torch.float32))
    assert float(got) == pytest.approx(want, abs=1e-5)
    # the anchor's own features give no pull; the term is 0 <= . <= 2 w
    assert float(learner.knowledge_term(learner.anchor_features())) == pytest.approx(0, abs=1e-6)
    assert float(learner.knowledge_term(-learner.anchor_features())) == pytest.approx(16, abs=1e-5)


def test_anchor_is_the_templates_zero_shot_features(tiny_vit):
    learner = _build(tiny_vit, template="a blurry photo of a {}.")
    zs = ZeroShot(templates=["a blurry photo of a {}."])
    zs.setup(tiny_vit, NAMES, seed=0)
    assert torch.allclose(learner.anchor_features(), zs.text_features().float(), atol=1e-6)


def test_training_loss_is_cross_entropy_plus_the_term_by_hand(tiny_vit):
    learner = _build(tiny_vit, w=3.0)
    batch = _batch(tiny_vit)
    loss = learner.training_loss(batch)
    with torch.no_grad():
        t = learner.text_features().double().numpy()
    a = learner.anchor_features().double().numpy()
    f, y = batch.features.double().numpy(), batch.labels.numpy()
    s = float(tiny_vit.logit_scale)
    ce = 0.0
    for i in range(len(y)):
        z = [s * float(f[i] @ t[c]) for c in range(len(NAMES))]
        m = max(z)
        ce += -(z[y[i]] - m - math.log(sum(math.exp(v - m) for v in z)))
    ce /= len(y)
    term = 3.0 * (1 - np.mean([float(t[c] @ a[c]) for c in range(len(NAMES))]))
    assert loss.item() == pytest.approx(ce + term, abs=1e-4)
    loss.backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0


def test_w_zero_is_coop_exactly(tiny_vit):
    kg = _build(tiny_vit, w=0.0)
    coop = _build(tiny_vit, cls=TextualPrompt, n_ctx=4, ctx_init="a photo of a")
    assert torch.equal(kg.ctx, coop.ctx) and torch.equal(kg.tokens, coop.tokens)
    batch = _batch(tiny_vit)
    lk, lc = kg.training_loss(batch), coop.training_loss(batch)
    assert torch.equal(lk, lc)
    lk.backward()
    lc.backward()
    assert torch.equal(kg.ctx.grad, coop.ctx.grad)
    assert torch.equal(kg(batch), coop(batch))
    assert kg.shared_keys() == coop.shared_keys() == ["ctx"]
    # with w > 0 the loss differs (an anchor other than the initial context's sentence)
    pulled = _build(tiny_vit, w=8.0, template="a blurry photo of a {}.")
    assert float(pulled.training_loss(batch) - lc) > 1e-4


def test_anchor_encoded_once_per_class_set(tiny_vit):
    kg = _build(tiny_vit, w=8.0)
    batch = _batch(tiny_vit)
    counts = []
    for _ in range(3):
        before = tiny_vit.text_sequences_encoded
        kg.training_loss(batch).backward()
        counts.append(tiny_vit.text_sequences_encoded - before)
    c = len(NAMES)
    assert counts == [2 * c, c, c]  # the anchor's C sentences at the first step only
    kg.set_classes(OTHER)
    before = tiny_vit.text_sequences_encoded
    kg.training_loss(Batch(labels=torch.tensor([0, 1]), index=torch.arange(2),
                           features=batch.features[:2])).backward()  # fmt: skip
    assert tiny_vit.text_sequences_encoded - before == 2 * len(OTHER)
    kg.set_classes(NAMES)  # back: cached, only the prompts are encoded
    before = tiny_vit.text_sequences_encoded
    kg.training_loss(batch).backward()
    assert tiny_vit.text_sequences_encoded - before == c


def test_reference_path_equals_the_fast_path(tiny_vit):
    kg = _build(tiny_vit, w=8.0)
    g = torch.Generator().manual_seed(1)
    size = tiny_vit.preprocess_val.transforms[0].size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(3, 3, size, size, generator=g)
    with torch.no_grad():
        f = tiny_vit.encode_image(images)
    batch = Batch(labels=torch.tensor([0, 2, 1]), index=torch.arange(3), features=f)
    assert torch.allclose(kg.reference_logits(images), kg(batch), atol=1e-4)
    assert float(kg.reference_loss(images, batch)) == pytest.approx(
        float(kg.training_loss(batch)), abs=1e-4
    )


def test_multilabel_pulls_only_the_positive_context(tiny_vit):
    kg = _build(tiny_vit, multilabel=True, w=8.0, template="a blurry photo of a {}.")
    coop = _build(tiny_vit, multilabel=True, w=0.0)
    assert kg.shared_keys() == ["ctx", "ctx_neg"]
    batch = _batch(tiny_vit, multilabel=True)
    lk, lc = kg.training_loss(batch), coop.training_loss(batch)
    with torch.no_grad():
        term = kg.knowledge_term(kg.text_features())
    assert float(lk - lc) == pytest.approx(float(term), abs=1e-5)
    lk.backward()
    lc.backward()
    assert torch.allclose(kg.ctx_neg.grad, coop.ctx_neg.grad, atol=1e-7)  # as CoOp's
    assert not torch.allclose(kg.ctx.grad, coop.ctx.grad)


def test_random_init_and_bad_values(tiny_vit):
    kg = _build(tiny_vit, ctx_init=None, n_ctx=3)
    assert kg.ctx.shape == (3, tiny_vit.text_width)
    assert kg.initial_state() == "random context (not zero-shot)"
    assert float(kg.ctx.std()) == pytest.approx(0.02, rel=0.2)
    with pytest.raises(ConfigError, match="w=-1"):
        KnowledgeGuidedPrompt(w=-1)
    with pytest.raises(ConfigError, match="template"):
        KnowledgeGuidedPrompt(template="a photo")
