"""PrivateLowRankPrompt (DP-FPL) against hand computations: the power-step factorisation in
numpy float64, per-example clipping by an explicit loop of single-example backwards, the
rebuilt local gradient by its formula, the accountant against Opacus, and noise off."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedclip.batch import Batch
from fedclip.errors import ConfigError
from fedclip.learners import PrivateLowRankPrompt
from fedclip.learners.dpfpl import local_gradient, power_factorization

CLASSES = ["cat", "dog", "red car", "blue square"]


def np_gram_schmidt(m: np.ndarray) -> np.ndarray:
    """Classical Gram-Schmidt on the columns, float64."""
    q = np.zeros_like(m)
    for j in range(m.shape[1]):
        w = m[:, j] - q[:, :j] @ (q[:, :j].T @ m[:, j])
        q[:, j] = w / np.linalg.norm(w)
    return q


def make(tiny_vit, **kw) -> PrivateLowRankPrompt:
    args = {"n_ctx": 4, "rank": 2, **kw}
    learner = PrivateLowRankPrompt(**args)
    learner.setup(tiny_vit, CLASSES, seed=0)
    with torch.no_grad():  # a local prompt far from zero, so its factors matter
        learner.local_ctx.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return learner.train()


def batch(tiny_vit, b: int = 5) -> Batch:
    gen = torch.Generator().manual_seed(2)
    f = F.normalize(torch.randn(b, tiny_vit.embed_dim, generator=gen), dim=-1)
    labels = torch.randint(0, len(CLASSES), (b,), generator=gen)
    return Batch(labels=labels, index=torch.arange(b), features=f)


def test_power_step_matches_numpy_and_reconstructs_exactly():
    rng = np.random.default_rng(0)
    local, v0 = rng.normal(size=(16, 40)), rng.normal(size=(40, 8))
    u, v, r = power_factorization(torch.from_numpy(local), torch.from_numpy(v0))
    u_np = np_gram_schmidt(local @ v0)
    v_np = np_gram_schmidt(local.T @ u_np).T
    assert np.abs(u.numpy() - u_np).max() < 1e-10
    assert np.abs(v.numpy() - v_np).max() < 1e-10
    assert np.abs(u.numpy().T @ u.numpy() - np.eye(8)).max() < 1e-12
    assert np.abs(v.numpy() @ v.numpy().T - np.eye(8)).max() < 1e-12
    assert np.abs((u @ v + r).numpy() - local).max() < 1e-14
    # the residual is what the rank-8 part leaves: not zero for a full-rank L
    assert np.abs(r.numpy()).max() > 0.1


def test_context_is_global_plus_local_and_global_part_is_g(tiny_vit):
    learner = make(tiny_vit)
    u, v, r = learner.factors(torch.Generator().manual_seed(3))
    ctx = learner.context(u, v, r)
    assert torch.allclose(ctx, learner.ctx + learner.local_ctx, atol=1e-6)
    lowrank = make(tiny_vit, factorization="lowrank")
    assert torch.equal(lowrank.context(u, v, r), lowrank.ctx + u @ v)
    assert (lowrank.context(u, v, r) - ctx).abs().max() > 0.1  # the residual dropped
    with learner.global_part():
        assert learner.context(u, v, r) is learner.ctx


def test_local_gradient_formula_by_hand():
    rng = np.random.default_rng(1)
    u = np.linalg.qr(rng.normal(size=(6, 2)))[0]
    v = np.linalg.qr(rng.normal(size=(9, 2)))[0].T
    gu, gv = rng.normal(size=(6, 2)), rng.normal(size=(2, 9))
    t = [torch.from_numpy(a) for a in (u, v, gu, gv)]
    ref = local_gradient(*t, "reference").numpy()
    proj = local_gradient(*t, "projection").numpy()
    m1, m2 = gu @ v + u @ gv, u @ u.T @ gu @ v
    assert np.abs(ref - (m1 + m2)).max() < 1e-12
    assert np.abs(proj - (m1 - m2)).max() < 1e-12
    # 'projection' is the tangent-space projection P(X) = UU^T X + X V^T V - UU^T X V^T V of
    # the gradient X whose factor gradients are (X v^T, u^T X)
    x = rng.normal(size=(6, 9))
    px = local_gradient(*[torch.from_numpy(a) for a in (u, v, x @ v.T, u.T @ x)], "projection")
    exact = u @ u.T @ x + x @ v.T @ v - u @ u.T @ x @ v.T @ v
    assert np.abs(px.numpy() - exact).max() < 1e-12


@pytest.mark.parametrize("tangent", ["reference", "projection"])
def test_per_example_clipping_equals_a_loop_of_single_backwards(tiny_vit, tangent):
    learner = make(tiny_vit, tangent=tangent, factor_grad_scale=0.1)
    b = batch(tiny_vit)
    # by hand: each example's own backward at the same v0, clipped jointly, averaged
    torch.manual_seed(11)
    u0, v0, r = learner.factors()
    per = []
    for i in range(b.labels.shape[0]):
        u, v = u0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
        t = learner.encode_context(learner.ctx.detach() + u @ v + r)
        logits = tiny_vit.logit_scale * b.features[i : i + 1] @ t.t()
        loss = F.cross_entropy(logits.float(), b.labels[i : i + 1])
        gu, gv = torch.autograd.grad(loss, (u, v))
        per.append((gu.double().numpy(), gv.double().numpy()))
    norms = [math.sqrt((gu**2).sum() + (gv**2).sum()) for gu, gv in per]
    low = sorted(norms)
    clip_norm = (low[1] + low[2]) / 2  # three examples are clipped, two are not
    learner.clip_norm = clip_norm
    scale = [min(1.0, clip_norm / n) for n in norms]
    gu = np.mean([s * g[0] for s, g in zip(scale, per, strict=True)], axis=0) * 0.1
    gv = np.mean([s * g[1] for s, g in zip(scale, per, strict=True)], axis=0) * 0.1
    u, v = u0.double().numpy(), v0.double().numpy()
    sign = 1.0 if tangent == "reference" else -1.0
    expected = gu @ v + u @ gv + sign * (u @ u.T @ gu @ v)
    torch.manual_seed(11)
    _, g_local = learner.private_local_gradient(b)
    assert np.abs(g_local.double().numpy() - expected).max() < 1e-6
    assert learner.report()["factor_clipped"] == pytest.approx(3 / 5)


def test_noise_off_gives_the_plain_gradients(tiny_vit):
    learner = make(tiny_vit, noise_multiplier=0.0, clip_norm=1e9, factor_grad_scale=1.0)
    b = batch(tiny_vit)
    torch.manual_seed(5)
    loss = learner.training_loss(b)
    loss.backward()
    g_ctx, g_local = learner.ctx.grad.clone(), learner.local_ctx.grad.clone()
    # plain: one backward of the batch loss through fresh leaves u, v (same v0)
    torch.manual_seed(5)
    u0, v0, r = learner.factors()
    u, v = u0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
    ctx = learner.ctx.detach().clone().requires_grad_(True)
    t = learner.encode_context(ctx + u @ v + r)
    plain = F.cross_entropy((tiny_vit.logit_scale * b.features @ t.t()).float(), b.labels)
    gc, gu, gv = torch.autograd.grad(plain, (ctx, u, v))
    assert float(loss.detach()) == float(plain.detach())
    assert (g_ctx - gc).abs().max() < 1e-6
    expected = gu @ v0 + u0 @ gv + u0 @ (u0.t() @ gu @ v0)
    assert (g_local - expected).abs().max() < 1e-6


def test_full_variant_noise_off_is_the_gradient_of_l(tiny_vit):
    learner = make(tiny_vit, factorization="full", clip_norm=1e9)
    b = batch(tiny_vit)
    _, g_local = learner.private_local_gradient(b)
    local = learner.local_ctx.detach().clone().requires_grad_(True)
    t = learner.encode_context(learner.ctx.detach() + local)
    plain = F.cross_entropy((tiny_vit.logit_scale * b.features @ t.t()).float(), b.labels)
    (g,) = torch.autograd.grad(plain, local)
    assert (g_local - g).abs().max() < 1e-6


def test_noise_std_is_sigma_c_over_b(tiny_vit):
    learner = make(tiny_vit, noise_multiplier=2.0, clip_norm=3.0)
    torch.manual_seed(0)
    (out,) = learner.clip_and_noise([torch.zeros(4, 20000)])
    assert abs(float(out.std()) / (2.0 * 3.0 / 4) - 1) < 0.03
    ref = make(tiny_vit, noise="reference", reference_epsilon=0.4, delta=1e-5)
    ref.rounds = 100
    assert ref.sigma() == pytest.approx(math.sqrt(100 * math.log(1e5)) / 0.4, rel=1e-12)


def test_accountant_counts_every_step_as_opacus(tiny_vit):
    from opacus.accountants import RDPAccountant

    learner = make(tiny_vit, noise_multiplier=1.3, clip_norm=1.0)
    learner.num_train = 20
    b = batch(tiny_vit)
    for _ in range(3):
        learner.training_loss(b)
    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=1.3, sample_rate=5 / 20)
    report = learner.report()
    assert report["factor_steps"] == 3
    assert report["factor_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    # the history survives the state dict (checkpoints)
    other = make(tiny_vit)
    other.load_state_dict(learner.state_dict())
    assert other.factor_epsilon() == pytest.approx(report["factor_epsilon"], rel=1e-12)


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"factorization": "svd"}, "factorization"),
        ({"rank": 5}, "rank"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"noise": "laplace"}, "noise"),
        ({"tangent": "x"}, "tangent"),
        ({"sampling_rate": 1.5}, "sampling_rate"),
    ],
)
def test_bad_arguments_name_their_key(kw, key):
    with pytest.raises(ConfigError, match=f"learner.init_args.{key}="):
        PrivateLowRankPrompt(**{"n_ctx": 4, "rank": 2, **kw})


def test_reference_rounds_override_the_runs_rounds(tiny_vit):
    learner = make(tiny_vit, noise="reference", reference_epsilon=0.2, reference_rounds=100)
    learner.rounds = 500
    assert learner.sigma() == pytest.approx(math.sqrt(100 * math.log(1e5)) / 0.2, rel=1e-12)
