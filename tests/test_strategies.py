"""Strategies: FedAvg against hand-computed means, local-only, FedProx (and its gradient)."""

from __future__ import annotations

import pytest
import torch

from fedclip.batch import Batch
from fedclip.client import ClientModule
from fedclip.learners import OptimConfig, TextualPrompt
from fedclip.strategies import ClientResult, FedAvg, FedProx, LocalOnly, weighted_average


def _result(k: int, value: list[float], n: int) -> ClientResult:
    return ClientResult(k, {"ctx": torch.tensor(value), "step": torch.tensor(float(k))}, n)


def test_fedavg_weighted_by_sample_counts():
    s = FedAvg()
    s.initialize({"ctx": torch.zeros(2), "step": torch.tensor(0.0)}, num_clients=3, seed=0)
    results = {0: _result(0, [1.0, 2.0], 10), 2: _result(2, [4.0, -1.0], 30)}
    state, metrics = s.aggregate(0, results)
    # (10 * [1, 2] + 30 * [4, -1]) / 40 = [3.25, -0.25]
    torch.testing.assert_close(state["ctx"], torch.tensor([3.25, -0.25]))
    torch.testing.assert_close(state["step"], torch.tensor(1.5))
    assert metrics["aggregated_clients"] == 2
    payloads = s.configure_round(1, [0, 1])
    assert set(payloads) == {0, 1} and payloads[1].state is s.global_state


def test_fedavg_unweighted():
    s = FedAvg(weighted=False)
    s.initialize({"ctx": torch.zeros(2), "step": torch.tensor(0.0)}, 3, 0)
    state, _ = s.aggregate(0, {0: _result(0, [1.0, 2.0], 10), 1: _result(1, [4.0, -1.0], 30)})
    torch.testing.assert_close(state["ctx"], torch.tensor([2.5, 0.5]))


def test_fedavg_keeps_state_when_nobody_returns():
    s = FedAvg()
    init = {"ctx": torch.ones(3)}
    s.initialize(init, 2, 0)
    state, metrics = s.aggregate(0, {})
    torch.testing.assert_close(state["ctx"], torch.ones(3))
    assert metrics["aggregated_clients"] == 0


def test_weighted_average_keeps_dtype_and_rejects_bad_weights():
    a = {"w": torch.tensor([1.0], dtype=torch.bfloat16)}
    b = {"w": torch.tensor([3.0], dtype=torch.bfloat16)}
    out = weighted_average([a, b], [1, 1])
    assert out["w"].dtype == torch.bfloat16 and float(out["w"]) == 2.0
    with pytest.raises(ValueError, match="sum to > 0"):
        weighted_average([a, b], [0, 0])


def test_local_only_sends_nothing():
    s = LocalOnly()
    s.initialize({"ctx": torch.zeros(2)}, 2, 0)
    assert not s.collects_uploads
    assert all(p.state is None for p in s.configure_round(0, [0, 1]).values())
    assert all(p.state is None for p in s.configure_evaluate(0, [0, 1]).values())
    assert s.aggregate(0, {})[0] is None


def test_fedprox_payload_and_argument_check():
    s = FedProx(mu=0.1)
    s.initialize({"ctx": torch.zeros(2)}, 2, 0)
    assert s.configure_round(0, [1])[1].extras == {"proximal_mu": 0.1}
    with pytest.raises(ValueError, match="mu must be >= 0"):
        FedProx(mu=-1)


@pytest.mark.parametrize("mu", [0.0, 0.7])
def test_fedprox_gradient_adds_mu_times_the_distance_to_the_global_state(tiny_vit, mu):
    """d/dw [loss + mu/2 ||w - w_global||^2] = d loss/dw + mu (w - w_global), on the client."""
    learner = TextualPrompt(n_ctx=4)
    learner.setup(tiny_vit, ["red circle", "green square", "blue triangle"], seed=0)
    client = ClientModule(0, learner, tiny_vit, OptimConfig(), 5, 1, 1)
    strategy = FedProx(mu=mu)
    strategy.initialize({k: v.detach().clone() for k, v in learner.shared_state().items()}, 1, 0)
    client.receive(strategy.configure_round(0, [0])[0])
    w_global = strategy.global_state["ctx"]
    with torch.no_grad():  # as after some local steps
        learner.ctx.add_(torch.randn(learner.ctx.shape, generator=torch.Generator().manual_seed(2)))
    gen = torch.Generator().manual_seed(1)
    f = torch.nn.functional.normalize(torch.randn(5, tiny_vit.embed_dim, generator=gen), dim=-1)
    batch = Batch(labels=torch.arange(5) % 3, index=torch.arange(5), features=f)
    (plain,) = torch.autograd.grad(learner.training_loss(batch), learner.ctx)
    (total,) = torch.autograd.grad(client.training_step(batch, 0), learner.ctx)
    prox = mu * (learner.ctx.detach() - w_global)
    torch.testing.assert_close(total, plain + prox, rtol=1e-5, atol=1e-6)
    if mu:  # the term is far above the tolerance: a missing or mis-scaled one would fail
        assert float(prox.abs().max()) > 0.5 and not torch.allclose(total, plain, atol=0.1)
