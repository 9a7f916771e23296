"""FedPGP's learner: the contrastive loss by hand, the anchor (once per class set), the
personal and global logits, what travels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedclip.errors import ConfigError
from fedclip.federation import Federation
from fedclip.learners import Batch, LowRankPersonalPrompt
from fedclip.learners.pgp import prompt_contrastive_loss

from .conftest import small_config

NAMES = ["red circle", "green square", "blue triangle"]


def _unit(*v: float) -> np.ndarray:
    a = np.array(v, dtype=np.float64)
    return a / np.linalg.norm(a)


def test_contrastive_loss_hand_computed():
    # C = 2 classes in 3-d: per class, logits [cos(t0, ts), cos(ts, t)] / temp, target 0
    t0 = [_unit(1, 0, 0), _unit(0, 1, 0)]
    ts = [_unit(1, 1, 0), _unit(0, 1, 1)]
    tp = [_unit(0, 0, 1), _unit(0, 1, 0)]
    temp = 0.5
    want = 0.0
    for a, g, p in zip(t0, ts, tp, strict=True):
        pos, neg = float(a @ g) / temp, float(g @ p) / temp
        want += -math.log(math.exp(pos) / (math.exp(pos) + math.exp(neg)))
    want /= 2
    # class 0: pos = cos 45deg / 0.5 = sqrt 2, neg = cos 90deg = 0: log(1 + e^-sqrt 2);
    # class 1: pos = neg = sqrt 2: log 2
    assert want == pytest.approx((math.log(1 + math.exp(-math.sqrt(2))) + math.log(2)) / 2)
    as_t = [torch.tensor(np.stack(x)) for x in (t0, ts, tp)]
    got = prompt_contrastive_loss(*as_t, temp=temp)
    assert float(got) == pytest.approx(want, abs=1e-6)
    # unnormalised inputs: cosine, not the dot product
    got = prompt_contrastive_loss(3 * as_t[0], 0.5 * as_t[1], 7 * as_t[2], temp=temp)
    assert float(got) == pytest.approx(want, abs=1e-6)
    # the positive pair dominating gives a small loss: log(1 + e^{(0 - 1) / 0.1})
    e = torch.eye(2, dtype=torch.float64)
    got = prompt_contrastive_loss(e[:1], e[:1], e[1:], temp=0.1)
    assert float(got) == pytest.approx(math.log(1 + math.exp(-10)), abs=1e-7)


@pytest.fixture
def learner(tiny_vit):
    lr = LowRankPersonalPrompt(n_ctx=4, bottleneck=2, mu=0.5, temp=0.5)
    lr.setup(tiny_vit, NAMES, seed=0)
    with torch.no_grad():  # a low-rank term large enough to matter
        lr.U.mul_(20.0)
        lr.V.mul_(20.0)
    return lr


def _batch(clip, n=5) -> Batch:
    gen = torch.Generator().manual_seed(1)
    f = torch.nn.functional.normalize(torch.randn(n, clip.embed_dim, generator=gen), dim=-1)
    return Batch(labels=torch.arange(n) % 3, index=torch.arange(n), features=f)


def test_parameters_shapes_and_seeded_init(learner, tiny_vit):
    assert tuple(learner.ctx.shape) == (4, tiny_vit.text_width)
    assert tuple(learner.U.shape) == (4, 2) and tuple(learner.V.shape) == (2, tiny_vit.text_width)
    again = LowRankPersonalPrompt(n_ctx=4, bottleneck=2)
    again.setup(tiny_vit, NAMES, seed=0)
    other = LowRankPersonalPrompt(n_ctx=4, bottleneck=2)
    other.setup(tiny_vit, NAMES, seed=1)
    assert torch.equal(again.U * 20, learner.U) and not torch.equal(again.U, other.U)
    for p in (again.ctx, again.U, again.V):  # N(0, 0.02^2)
        p = p.detach()
        assert 0.01 < float(p.std()) < 0.03 and abs(float(p.mean())) < 0.01


def test_training_loss_is_ce_plus_mu_contrastive_by_hand(learner, tiny_vit):
    batch = _batch(tiny_vit)
    clip = tiny_vit
    # independent features: full-length prompts (no shared prefix) under U V + sigma and sigma
    personal = (learner.U.double() @ learner.V.double() + learner.ctx.double()).float()
    t = clip.encode_prompted_text(
        learner.prompt_embeddings(personal), learner.tokens, truncate=False
    )
    ts = clip.encode_prompted_text(learner.prompt_embeddings(learner.ctx), learner.tokens)
    # the anchor: the literal placeholder sentence
    t0 = clip.encode_text([f"X X X X {n}." for n in NAMES])
    f, t, ts, t0 = (x.detach().double().numpy() for x in (batch.features, t, ts, t0))
    s = float(clip.logit_scale)
    logits = s * f @ t.T
    ce = np.mean(
        [
            np.log(np.exp(row).sum()) - row[y]
            for row, y in zip(logits, batch.labels.numpy(), strict=True)
        ]
    )
    con = 0.0
    for c in range(3):
        cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
        pos, neg = cos(t0[c], ts[c]) / 0.5, cos(ts[c], t[c]) / 0.5
        con += np.log(np.exp(pos) + np.exp(neg)) - pos
    want = ce + 0.5 * con / 3
    assert float(learner.training_loss(batch)) == pytest.approx(want, abs=1e-4)
    np.testing.assert_allclose(learner(batch).detach().double().numpy(), logits, atol=1e-4)


def test_anchor_encoded_once_per_class_set(learner, tiny_vit):
    batch = _batch(tiny_vit)
    count = lambda: tiny_vit.text_sequences_encoded  # noqa: E731
    n0 = count()
    learner.training_loss(batch)
    assert count() - n0 == 3 * 3  # t, t^sigma and the anchor: C sequences each
    n0 = count()
    learner.training_loss(batch)
    assert count() - n0 == 2 * 3  # the anchor is cached
    learner.set_classes(["a", "b"])
    n0 = count()
    learner.training_loss(
        Batch(labels=torch.tensor([0, 1]), index=torch.arange(2), features=batch.features[:2])
    )
    assert count() - n0 == 3 * 2
    learner.set_classes(NAMES)
    n0 = count()
    learner.training_loss(batch)
    assert count() - n0 == 2 * 3  # back to the first set: its anchor is still cached
    learner.invalidate_cache()  # prompts loaded from outside do not touch the frozen anchor
    n0 = count()
    learner.training_loss(batch)
    assert count() - n0 == 2 * 3


def test_template_anchor(tiny_vit):
    lr = LowRankPersonalPrompt(n_ctx=4, anchor="a photo of a {}.")
    lr.setup(tiny_vit, NAMES, seed=0)
    want = tiny_vit.encode_text([f"a photo of a {n}." for n in NAMES])
    torch.testing.assert_close(lr.anchor_features(), want)
    n0 = tiny_vit.text_sequences_encoded
    lr.anchor_features()
    assert tiny_vit.text_sequences_encoded == n0


def test_global_part_is_sigma_alone(learner, tiny_vit):
    batch = _batch(tiny_vit)
    learner.eval()
    s = tiny_vit.logit_scale
    with torch.no_grad():
        personal = learner(batch)
        with learner.global_part():
            glob = learner(batch)
        t_sigma = tiny_vit.encode_prompted_text(
            learner.prompt_embeddings(learner.ctx), learner.tokens
        )
    torch.testing.assert_close(glob, s * batch.features @ t_sigma.t(), atol=1e-5, rtol=1e-5)
    assert (personal - glob).abs().max() > 1e-3  # U V matters outside the global part
    with torch.no_grad():
        torch.testing.assert_close(learner(batch), personal)  # restored after


def test_reference_path_equals_fast_path(learner, tiny_vit):
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        f = tiny_vit.encode_image(images)
        batch = Batch(labels=torch.tensor([0, 2]), index=torch.arange(2), features=f)
        torch.testing.assert_close(
            learner.reference_logits(images), learner(batch), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            learner.reference_loss(images, batch),
            learner.training_loss(batch),
            atol=1e-5,
            rtol=1e-5,
        )


def test_one_step_trains_all_three_uploads_sigma_only():
    fed = Federation(
        small_config(learner=LowRankPersonalPrompt(n_ctx=4, bottleneck=2), rounds=1),
        None,
        show_progress=False,
    )
    learner = fed.clients[0].learner
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    fed.runtime.fit_client(0, 0)
    for name in ("ctx", "U", "V"):
        assert not torch.equal(getattr(learner, name), before[name]), name
    assert set(fed.clients[0].upload()) == {"ctx"}
    assert learner.personal_keys() == ["U", "V"]


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"bottleneck": 0}, "bottleneck"),
        ({"temp": 0.0}, "temp"),
        ({"mu": -1.0}, "mu"),
        ({"anchor": "a photo"}, "anchor"),
    ],
)
def test_bad_arguments_are_one_line_config_errors(kwargs, key):
    with pytest.raises(ConfigError) as e:
        LowRankPersonalPrompt(**kwargs)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_multilabel_is_refused_in_one_line():
    from fedclip.federation.settings import check_task

    with pytest.raises(ConfigError, match="LowRankPersonalPrompt"):
        check_task(LowRankPersonalPrompt(), multilabel=True, base_to_novel=False)
    with pytest.raises(ConfigError, match="LowRankPersonalPrompt") as e:
        LowRankPersonalPrompt().set_task(True)
    assert "\n" not in str(e.value)
