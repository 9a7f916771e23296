"""FedOTP's transport plans and learner, against float64 plain-domain loops written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedclip.batch import Batch
from fedclip.errors import ConfigError
from fedclip.learners import TransportPrompts
from fedclip.learners.transport import cot_plan, sinkhorn_plan


def plain_plan(sim: np.ndarray, eps: float, mass: float, capped: bool, iters: int) -> np.ndarray:
    """One (M, Np) problem, float64, plain domain, explicit loops over entries."""
    m, n = sim.shape
    k = np.exp(-(1.0 - sim) / eps)
    u, v = np.ones(m), np.ones(n)
    for _ in range(iters):
        for i in range(m):
            u[i] = (1.0 / m) / sum(k[i, j] * v[j] for j in range(n))
            if capped:
                u[i] = min(u[i], 1.0)
        for j in range(n):
            v[j] = (mass / n) / sum(k[i, j] * u[i] for i in range(m))
    return np.array([[u[i] * k[i, j] * v[j] for j in range(n)] for i in range(m)])


def random_sim(shape, low=-0.2, high=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(*shape, generator=g)


@pytest.mark.parametrize("eps", [0.1, 0.05])
def test_cot_marginals_and_fixed_point(eps):
    sim = random_sim((3, 2, 7, 2))
    plan = cot_plan(sim, eps=eps, rho=0.8, max_iter=400, tol=1e-7)
    assert plan.shape == sim.shape and plan.dtype == torch.float32
    torch.testing.assert_close(plan.sum(-2), torch.full((3, 2, 2), 0.4), atol=1e-6, rtol=0)
    assert (plan.sum(-1) <= 1 / 7 + 1e-6).all()  # patch marginals <= a
    torch.testing.assert_close(plan.sum((-1, -2)), torch.full((3, 2), 0.8), atol=1e-6, rtol=0)
    for b in range(3):
        for c in range(2):
            want = plain_plan(sim[b, c].double().numpy(), eps, 0.8, True, 400)
            np.testing.assert_allclose(plan[b, c].numpy(), want, atol=2e-6, rtol=0)


def test_sinkhorn_marginals_and_fixed_point():
    sim = random_sim((2, 5, 3), seed=1)
    plan = sinkhorn_plan(sim, eps=0.1, max_iter=400, tol=1e-7)
    torch.testing.assert_close(plan.sum(-1), torch.full((2, 5), 0.2), atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.sum(-2), torch.full((2, 3), 1 / 3), atol=1e-6, rtol=0)
    for b in range(2):
        want = plain_plan(sim[b].double().numpy(), 0.1, 1.0, False, 400)
        np.testing.assert_allclose(plan[b].numpy(), want, atol=2e-6, rtol=0)


def test_tiny_kernel_is_finite_and_matches_float64():
    """eps 0.01 with cosines 0.1-0.3: exp(-70..-90) is 0 in float16 (and the plain float32
    iteration overflows v); the log-domain plan is finite and equals float64's."""
    sim = random_sim((2, 3, 6, 2), low=0.1, high=0.3, seed=2)
    assert float(torch.exp(-(1 - sim.half()) / 0.01).max()) == 0.0  # the fp16 failure
    plan = cot_plan(sim, eps=0.01, rho=0.8, max_iter=300, tol=0.0)
    assert torch.isfinite(plan).all()
    for b in range(2):
        for c in range(3):
            want = plain_plan(sim[b, c].double().numpy(), 0.01, 0.8, True, 300)
            np.testing.assert_allclose(plan[b, c].numpy(), want, atol=1e-5, rtol=0)


def test_relative_tolerance_stops_early_and_zero_runs_max_iter():
    sim = random_sim((4, 9, 2), seed=3)
    loose = cot_plan(sim, eps=0.1, max_iter=200, tol=1e-2)
    exact = plain_plan(sim[0].double().numpy(), 0.1, 0.8, True, 200)
    fixed = cot_plan(sim, eps=0.1, max_iter=200, tol=0.0)
    np.testing.assert_allclose(fixed[0].numpy(), exact, atol=1e-6, rtol=0)
    assert float((loose - fixed).abs().max()) > 1e-7  # stopped before convergence
    np.testing.assert_allclose(loose[0].numpy(), exact, atol=5e-3, rtol=0)


def test_bad_settings_name_their_key():
    for kwargs, key in [
        ({"eps": 0.0}, "eps=0.0"),
        ({"rho": 1.5}, "rho=1.5"),
        ({"solver": "emd"}, "solver='emd'"),
        ({"global_eval": "mean"}, "global_eval='mean'"),
        ({"max_iter": 0}, "max_iter=0"),
    ]:
        with pytest.raises(ConfigError, match=f"learner.init_args.{key}"):
            TransportPrompts(**kwargs)


@pytest.fixture
def learner(tiny_vit):
    names = ["red circle", "blue square", "green triangle"]
    lrn = TransportPrompts(n_ctx=4, eps=0.05, max_iter=300, tol=0.0)
    lrn.setup(tiny_vit, names, seed=0)
    return lrn


def test_logits_by_hand(learner, tiny_vit):
    """logit[b, c] = s * sum T* sim, with T* the float64 plain-domain COT plan of each
    (image, class) and both prompts' 77-token text features; the global part is CoOp's."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = tiny_vit.encode_dense(x)
        batch = Batch(labels=torch.tensor([0, 1]), index=torch.arange(2), tokens=tokens)
        logits = learner(batch)
        t = [learner.reference_text(p).double().numpy() for p in (learner.ctx, learner.ctx_local)]
        z = tokens.double().numpy()
        s = float(tiny_vit.logit_scale)
        for b in range(2):
            for c in range(3):
                sim = np.stack([z[b, 1:] @ t[0][c], z[b, 1:] @ t[1][c]], axis=1)  # (M, 2)
                plan = plain_plan(sim, 0.05, 0.8, True, 300)
                want = s * float((plan * sim).sum())
                assert math.isclose(float(logits[b, c]), want, abs_tol=1e-4), (b, c)
        with learner.global_part():
            glob = learner(batch)
        want = s * z[:, 0] @ t[0].T
        np.testing.assert_allclose(glob.double().numpy(), want, atol=1e-4, rtol=0)
        torch.testing.assert_close(learner.reference_logits(x), logits, atol=1e-3, rtol=0)


def test_prompts_differ_and_only_the_global_one_travels(learner):
    assert learner.shared_keys() == ["ctx"] and learner.personal_keys() == ["ctx_local"]
    assert not torch.equal(learner.ctx, learner.ctx_local)
    assert abs(float(learner.ctx_local.detach().std()) - 0.02) < 0.005
    batch = Batch(
        labels=torch.tensor([0, 2]),
        index=torch.arange(2),
        tokens=torch.nn.functional.normalize(torch.randn(2, 17, 64), dim=-1),
    )
    learner.training_loss(batch).backward()
    assert learner.ctx.grad.abs().sum() > 0 and learner.ctx_local.grad.abs().sum() > 0
    learner.global_eval = "ot"
    learner.zero_grad()
    with learner.global_part():
        learner.training_loss(batch).backward()
    assert learner.ctx.grad.abs().sum() > 0 and learner.ctx_local.grad is None
