"""PromptFolio's learner: the theta mix on hand-picked features, theta = 0 is the global
part, what travels, and FedAvg's weights under partial participation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedclip.data import Dirichlet
from fedclip.errors import ConfigError
from fedclip.federation import Federation
from fedclip.learners import Batch, PromptPortfolio
from fedclip.strategies import ClientResult, FedAvg

from .conftest import small_config

NAMES = ["red circle", "green square", "blue triangle"]


def _learner(clip, **kw) -> PromptPortfolio:
    lr = PromptPortfolio(n_ctx=4, **kw)
    lr.setup(clip, NAMES, seed=0)
    return lr


def _batch(clip, n=5) -> Batch:
    gen = torch.Generator().manual_seed(1)
    f = torch.nn.functional.normalize(torch.randn(n, clip.embed_dim, generator=gen), dim=-1)
    return Batch(labels=torch.arange(n) % 3, index=torch.arange(n), features=f)


def test_mix_on_hand_picked_features(tiny_vit, monkeypatch):
    lr = _learner(tiny_vit, theta=0.25)
    d = tiny_vit.embed_dim
    eye = torch.eye(d)
    # hand-picked unit class features: global = e_c, local = e_{c+3}, except class 2 whose
    # local feature equals its global one
    t_g = eye[[0, 1, 2]]
    t_l = eye[[3, 4, 2]]
    monkeypatch.setattr(lr, "encode_context", lambda ctx: t_g if ctx is lr.ctx else t_l)
    f = torch.zeros(2, d)
    f[0, 0], f[0, 3] = 0.6, 0.8  # image 0: global 0.6, local 0.8 on class 0
    f[1, 2] = 1.0  # image 1: class 2 only
    batch = Batch(labels=torch.tensor([0, 2]), index=torch.arange(2), features=f)
    s = float(tiny_vit.logit_scale)
    # t_0 = 0.75 e_0 + 0.25 e_3, t_1 = 0.75 e_1 + 0.25 e_4, t_2 = e_2 (not re-normalised)
    want = np.array(
        [
            [s * (0.75 * 0.6 + 0.25 * 0.8), 0.0, 0.0],
            [0.0, 0.0, s * 1.0],
        ]
    )
    np.testing.assert_allclose(lr(batch).detach().numpy(), want, rtol=1e-6, atol=1e-6)
    t = lr.text_features()
    # the mix is not re-normalised: |t_0| = sqrt(0.75^2 + 0.25^2)
    assert float(t[0].norm()) == pytest.approx((0.75**2 + 0.25**2) ** 0.5, rel=1e-6)
    assert float(t[2].norm()) == pytest.approx(1.0, rel=1e-6)
    with lr.global_part():  # g alone
        np.testing.assert_allclose(
            lr(batch).detach().numpy(), s * f.numpy() @ t_g.numpy().T, rtol=1e-6, atol=1e-6
        )


def test_forward_on_real_prompts_and_theta_zero_is_the_global_part(tiny_vit):
    lr = _learner(tiny_vit)
    assert not torch.equal(lr.ctx, lr.ctx_local)  # two independent draws
    batch = _batch(tiny_vit)
    clip = tiny_vit
    with torch.no_grad():
        tg = clip.encode_prompted_text(lr.prompt_embeddings(lr.ctx), lr.tokens, truncate=False)
        tl = clip.encode_prompted_text(
            lr.prompt_embeddings(lr.ctx_local), lr.tokens, truncate=False
        )
        f = batch.features.double().numpy()
        want = clip.logit_scale * f @ (0.6 * tg.double().numpy() + 0.4 * tl.double().numpy()).T
        np.testing.assert_allclose(lr(batch).numpy(), want, atol=1e-4)
        zero = _learner(tiny_vit, theta=0.0)  # same seed: same g (and l)
        torch.testing.assert_close(zero.ctx, lr.ctx)
        with lr.global_part():
            glob = lr(batch)
        torch.testing.assert_close(zero(batch), glob, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            glob, clip.logit_scale * batch.features @ tg.t(), atol=1e-5, rtol=1e-5
        )
        assert (lr(batch) - glob).abs().max() > 1e-3


def test_reference_path_equals_fast_path(tiny_vit):
    lr = _learner(tiny_vit)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        f = tiny_vit.encode_image(images)
        batch = Batch(labels=torch.tensor([0, 2]), index=torch.arange(2), features=f)
        torch.testing.assert_close(lr.reference_logits(images), lr(batch), atol=1e-5, rtol=1e-5)


def test_multilabel_negative_prompts_mixed_the_same_way(tiny_vit):
    lr = PromptPortfolio(n_ctx=4, theta=0.3)
    lr.set_task(True)
    lr.setup(tiny_vit, NAMES, seed=0)
    assert lr.shared_keys() == ["ctx", "ctx_neg"]
    assert lr.personal_keys() == ["ctx_local", "ctx_neg_local"]
    with torch.no_grad():
        neg = 0.7 * lr.encode_context(lr.ctx_neg) + 0.3 * lr.encode_context(lr.ctx_neg_local)
        torch.testing.assert_close(lr.negative_text_features(), neg)
        with lr.global_part():
            torch.testing.assert_close(lr.negative_text_features(), lr.encode_context(lr.ctx_neg))


def test_one_step_trains_both_uploads_global_only():
    fed = Federation(
        small_config(learner=PromptPortfolio(n_ctx=4), rounds=1), None, show_progress=False
    )
    learner = fed.clients[0].learner
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    fed.runtime.fit_client(0, 0)
    for name in ("ctx", "ctx_local"):
        assert not torch.equal(getattr(learner, name), before[name]), name
    assert set(fed.clients[0].upload()) == {"ctx"}


def test_fedavg_weights_the_right_clients_under_partial_participation():
    # clients 7 and 2 of 10 trained (results arrive in that order), with 30 and 10 samples
    gen = np.random.default_rng(0)
    g7, g2 = gen.normal(size=(4, 8)), gen.normal(size=(4, 8))
    strategy = FedAvg()
    strategy.global_state = {"ctx": torch.zeros(4, 8)}
    results = {
        7: ClientResult(7, {"ctx": torch.tensor(g7, dtype=torch.float32)}, 30),
        2: ClientResult(2, {"ctx": torch.tensor(g2, dtype=torch.float32)}, 10),
    }
    state, _ = strategy.aggregate(1, results)
    want = np.zeros((4, 8))
    for g, n in ((g7, 30), (g2, 10)):
        want += g * n / 40.0
    np.testing.assert_allclose(state["ctx"].numpy(), want, rtol=1e-6, atol=1e-6)


def test_fedavg_of_a_partial_round_in_a_federation(monkeypatch):
    fed = Federation(
        small_config(
            learner=PromptPortfolio(n_ctx=4),
            partitioner=Dirichlet(alpha=1.0, min_size=4),
            num_clients=4,
            fraction=0.5,
            rounds=1,
        ),
        None,
        show_progress=False,
    )
    seen = {}
    aggregate = fed.strategy.aggregate

    def spy(rnd, results):
        seen.update(
            {
                k: (r.state["ctx"].detach().double().clone(), r.num_samples)
                for k, r in results.items()
            }
        )
        return aggregate(rnd, results)

    monkeypatch.setattr(fed.strategy, "aggregate", spy)
    fed.fit()
    assert len(seen) == 2
    sizes = {fed.data.num_train(k) for k in range(4)}
    assert len(sizes) > 1  # unequal clients: a mis-weighting would show
    want = torch.zeros_like(next(iter(seen.values()))[0])
    for k, (ctx, n) in seen.items():
        assert n == fed.data.num_train(k)  # the weight is client k's own training size
        want += ctx * n
    want /= sum(n for _, n in seen.values())
    torch.testing.assert_close(fed.strategy.global_state["ctx"].double(), want)


@pytest.mark.parametrize("theta", [-0.1, 1.5, float("nan")])
def test_theta_outside_0_1_is_a_one_line_config_error(theta):
    with pytest.raises(ConfigError, match="theta") as e:
        PromptPortfolio(theta=theta)
    assert "\n" not in str(e.value)
