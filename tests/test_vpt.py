"""VPT shallow and deep: the prompted tower against a hand loop over open_clip's blocks, the
initialisations, the frozen text side, the reference path and multi-label."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedclip.batch import Batch
from fedclip.errors import BackboneError, ConfigError
from fedclip.learners import VisualPromptTuning
from fedclip.learners.vpt import init_prompts


def _learner(clip, names=("circle", "square", "red triangle"), multilabel=False, **kw):
    learner = VisualPromptTuning(num_prompts=3, **kw)
    learner.set_task(multilabel)
    learner.setup(clip, list(names), seed=0)
    return learner


def _images(n=2, side=64):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def hand_tower(clip, images, prompts, deep):
    """open_clip's ViT run block by block: tokens + position, the P prompts appended, ln_pre,
    then before block i (1 .. len(deep)) the prompt rows set to deep[i-1]; the CLS output
    through ln_post and the projection."""
    v = clip.model.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)  # (B, N, V)
    cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], 1) + v.positional_embedding
    p = prompts.shape[0]
    x = torch.cat([x, prompts.expand(x.shape[0], -1, -1)], 1)
    x = v.ln_pre(x)
    for i, block in enumerate(v.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[:, :-p], deep[i - 1].expand(x.shape[0], -1, -1)], 1)
        x = block(x)
    f = v.ln_post(x[:, 0]) @ v.proj
    return F.normalize(f, dim=-1)


@pytest.mark.parametrize("deep", [False, True])
def test_prompted_tower_equals_a_hand_loop_over_the_blocks(tiny_vit, deep):
    learner = _learner(tiny_vit, deep=deep)
    with torch.no_grad():  # prompts far from zero, so a missed replacement shows
        learner.prompts.normal_(0, 1.0)
        if deep:
            learner.deep_prompts.normal_(0, 1.0)
    images = _images()
    rows = list(learner.deep_prompts) if deep else []
    assert len(rows) == (len(tiny_vit.model.visual.transformer.resblocks) - 1 if deep else 0)
    expected = hand_tower(tiny_vit, images, learner.prompts.detach(), [r.detach() for r in rows])
    got = learner.prompted_features(images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if deep:  # the replacement matters: without it the features differ
        other = hand_tower(tiny_vit, images, learner.prompts.detach(), [])
        assert (got - other).abs().max() > 1e-3


def test_initialisations_and_depth_checks(tiny_vit):
    v, patch = tiny_vit.vision_width, 16
    a = math.sqrt(6 / (3 * patch * patch + v))
    u = init_prompts((4000, v), "uniform", patch, seed=0)
    assert float(u.abs().max()) <= a and float(u.abs().max()) > 0.99 * a
    assert abs(float(u.std()) - a / math.sqrt(3)) < 0.01 * a
    n = init_prompts((4000, v), "normal", patch, seed=0)
    assert abs(float(n.std()) - 0.02) < 0.001
    assert torch.equal(n, init_prompts((4000, v), "normal", patch, seed=0))
    learner = _learner(tiny_vit, deep=True, init="uniform")
    assert learner.shared_keys() == ["prompts", "deep_prompts"]
    assert float(learner.deep_prompts.detach().abs().max()) <= a
    assert _learner(tiny_vit).shared_keys() == ["prompts"]
    with pytest.raises(ConfigError, match=r"learner.init_args.depth=3: .* has 2 blocks"):
        _learner(tiny_vit, deep=True, depth=3)
    with pytest.raises(ConfigError, match="init"):
        VisualPromptTuning(init="xavier")


def test_refused_on_a_resnet_tower_in_one_line(tiny_rn):
    with pytest.raises(BackboneError) as e:
        _learner(tiny_rn)
    assert "\n" not in str(e.value)


def test_frozen_text_side_is_the_template_and_computed_once_per_class_set(tiny_vit):
    learner = _learner(tiny_vit, deep=True)
    names = ["circle", "square", "red triangle"]
    expected = tiny_vit.encode_text([f"a photo of a {n}." for n in names]).float()
    torch.testing.assert_close(learner.text_features(), expected)
    before = tiny_vit.text_sequences_encoded
    learner.set_classes(["star", "moon"])
    learner.set_classes(names)
    learner.set_classes(["star", "moon"])
    learner.text_features()
    assert tiny_vit.text_sequences_encoded - before == 2  # "star", "moon" once
    assert not any(t.requires_grad for t in learner._text.values())


def test_forward_equals_the_reference_path_and_trains_only_the_prompts(tiny_vit):
    learner = _learner(tiny_vit, deep=True)
    images = _images(3)
    batch = Batch(labels=torch.tensor([0, 1, 2]), index=torch.arange(3), images=images)
    logits = learner(batch)
    torch.testing.assert_close(learner.reference_logits(images), logits, atol=1e-4, rtol=1e-4)
    # by hand: s * f t^T with the hand tower and the template features
    f = hand_tower(tiny_vit, images, learner.prompts.detach(), list(learner.deep_prompts.detach()))
    t = learner.text_features()
    torch.testing.assert_close(logits, tiny_vit.logit_scale * f @ t.t(), atol=1e-4, rtol=1e-4)
    learner.training_loss(batch).backward()
    assert learner.prompts.grad.abs().sum() > 0 and learner.deep_prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_vit.parameters())


def test_multilabel_is_the_positive_minus_the_negative_template(tiny_vit):
    learner = _learner(tiny_vit, multilabel=True)
    images = _images(2)
    batch = Batch(labels=torch.zeros(2, 3), index=torch.arange(2), images=images)
    learner.eval()
    with torch.no_grad():
        logits = learner(batch)
    names = ["circle", "square", "red triangle"]
    pos = tiny_vit.encode_text([f"a photo of a {n}." for n in names])
    neg = tiny_vit.encode_text([f"a photo without a {n}." for n in names])
    f = hand_tower(tiny_vit, images, learner.prompts.detach(), [])
    s = tiny_vit.logit_scale
    torch.testing.assert_close(logits, s * f @ pos.t() - s * f @ neg.t(), atol=1e-4, rtol=1e-4)
