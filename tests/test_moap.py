"""pFedMoAP: the gating network, expert selection, the learner and the federation around it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedclip.backbone import BackboneConfig
from fedclip.data import Dirichlet, Shapes
from fedclip.federation import Federation
from fedclip.learners import Batch, MixtureOfPrompts, OptimConfig, PromptGating, TextualPrompt
from fedclip.strategies import ClientResult, FedAvg, PFedMoAP, select_experts

from .conftest import fit_shipped_config_offline, small_config, write_cifar100_full
from .test_federation import _assert_same, _states


def _identity(gating: PromptGating) -> None:
    with torch.no_grad():
        for lin in (gating.q, gating.k, gating.v, gating.out):
            lin.weight.copy_(torch.eye(lin.weight.shape[0]))
            lin.bias.zero_()


# ---- the gating network ------------------------------------------------------------------
def test_gating_hand_computed_one_head():
    g = PromptGating(embed_dim=4, d_gating=2, heads=1, scale=10.0)
    assert (g.stride, g.width) == (2, 2)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(g.pool(x), torch.tensor([[1.0, 3.0]]))  # every 2nd feature
    _identity(g)
    query = torch.tensor([[1.0, 0.0]])  # (B=1, d=2)
    experts = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (C=1, E=2, d=2)
    out = g(query, experts)
    assert out.shape == (1, 1, 2)
    # scores = 10 * [1, 0]: softmax weights e^10 / (e^10 + 1) and 1 / (e^10 + 1)
    w0 = math.exp(10) / (math.exp(10) + 1)
    torch.testing.assert_close(out[0, 0], torch.tensor([w0, 1 - w0]))


def test_gating_hand_computed_two_heads_two_classes():
    g = PromptGating(embed_dim=2, d_gating=2, heads=2, scale=1.0)
    _identity(g)
    with torch.no_grad():
        g.v.bias.copy_(torch.tensor([0.5, -0.5]))
    query = torch.tensor([[1.0, 2.0], [0.0, 1.0]])  # (B=2, d=2)
    experts = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 2.0], [1.0, -1.0]]])  # (C=2, E=2, 2)
    out = g(query, experts)
    assert out.shape == (2, 2, 2)
    # head h sees coordinate h alone: weights softmax(q_h * k_h) over the 2 experts,
    # output coordinate h = sum_e w_e * (k_eh + bias_h)
    for b in range(2):
        for c in range(2):
            for h in range(2):
                q, k = query[b, h].item(), experts[c, :, h].tolist()
                z = [math.exp(q * ke) for ke in k]
                want = sum(zi / sum(z) * (ke + [0.5, -0.5][h]) for zi, ke in zip(z, k, strict=True))
                assert out[b, c, h].item() == pytest.approx(want, abs=1e-6)


def test_gating_against_a_loop_reference():
    torch.manual_seed(0)
    g = PromptGating(embed_dim=64, d_gating=16, heads=4, scale=10.0)  # stride 4, width 16
    q_in, kv = torch.randn(3, 16), torch.randn(5, 4, 16)  # B=3, C=5, E=4
    out = g(q_in, kv)
    dh = 4
    q = g.q(q_in).view(3, 4, dh)
    k, v = g.k(kv).view(5, 4, 4, dh), g.v(kv).view(5, 4, 4, dh)  # (C, E, h, dh)
    want = torch.empty(3, 5, 16)
    for b in range(3):
        for c in range(5):
            heads = []
            for h in range(4):
                w = torch.softmax(10.0 * k[c, :, h] @ q[b, h], dim=0)  # (E,)
                heads.append(w @ v[c, :, h])
            want[b, c] = g.out(torch.cat(heads))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_gating_width_checks():
    assert PromptGating(512, 128).width == 128  # CLIP ViT-B: every 4th feature
    assert PromptGating(768, 128).width == 128  # stride 6
    lin = PromptGating(64, 32, projection="linear", heads=8)
    assert lin.width == 32 and lin.pool(torch.randn(2, 64)).shape == (2, 32)
    with pytest.raises(ValueError, match="not divisible by 8 heads"):
        PromptGating(100, 128)
    with pytest.raises(ValueError, match="projection"):
        PromptGating(64, 32, projection="mean")


# ---- expert selection --------------------------------------------------------------------
def _pool(values: dict[int, float]) -> dict[int, dict[str, torch.Tensor]]:
    return {k: {"ctx": torch.full((2, 3), v)} for k, v in values.items()}


def test_knn_returns_client_ids_nearest_first():
    pool = _pool({0: 0.0, 1: 1.0, 2: -1.0, 3: 3.0, 7: 0.5})
    rng = np.random.default_rng(0)
    assert select_experts(pool, 0, 1, rng) == [7]
    assert select_experts(pool, 0, 2, rng) == [7, 1]
    assert select_experts(pool, 0, 3, rng) == [7, 1, 2]  # 1 and 2 tie: lower id first
    assert select_experts(pool, 3, 2, rng) == [1, 7]
    # Frobenius distance over every tensor of the state
    two = {
        k: {"a": torch.tensor([v]), "b": torch.tensor([0.0, w])}
        for k, v, w in [(0, 0.0, 0.0), (1, 3.0, 0.0), (2, 0.0, 2.0), (3, 1.0, 1.0)]
    }
    assert select_experts(two, 0, 2, rng) == [3, 2]  # sqrt(2) < 2 < 3


def test_knn_fewer_than_asked_takes_all():
    pool = _pool({0: 0.0, 4: 2.0, 9: 1.0})
    assert select_experts(pool, 0, 5, np.random.default_rng(0)) == [4, 9]
    assert select_experts(pool, 4, 2, np.random.default_rng(0)) == [0, 9]
    assert select_experts(pool, 5, 9, np.random.default_rng(0)) == [0, 4, 9]  # not in pool
    assert select_experts({}, 0, 3, np.random.default_rng(0)) == []
    assert select_experts(pool, 0, 0, np.random.default_rng(0)) == []


def test_no_own_prompt_falls_back_to_seeded_random():
    pool = _pool({k: float(k) for k in range(1, 10)})
    a = select_experts(pool, 0, 4, np.random.default_rng(5))
    b = select_experts(pool, 0, 4, np.random.default_rng(5))
    assert a == b and len(a) == 4 and len(set(a)) == 4 and set(a) <= set(range(1, 10))
    draws = {tuple(select_experts(pool, 0, 4, np.random.default_rng(s))) for s in range(10)}
    assert len(draws) > 1  # really random across seeds
    # 'random' ignores the client's own prompt
    pool[0] = {"ctx": torch.zeros(2, 3)}
    r = select_experts(pool, 0, 4, np.random.default_rng(5), method="random")
    assert 0 not in r and len(r) == 4


def test_strategy_payloads_pool_and_state():
    s = PFedMoAP(num_experts=3)
    s.initialize({"ctx": torch.zeros(2, 3)}, num_clients=5, seed=0)
    round0 = s.configure_round(0, [0, 3])
    for p in round0.values():  # round 0: nothing in the pool yet
        assert p.extras["expert_ids"] == [] and p.extras["experts"]["ctx"].shape == (0, 2, 3)
    results = {k: ClientResult(k, {"ctx": torch.full((2, 3), float(k))}, 10) for k in (0, 1, 3, 4)}
    state, metrics = s.aggregate(0, results)
    torch.testing.assert_close(state["ctx"], torch.full((2, 3), 2.0))
    assert metrics == {"aggregated_clients": 4.0, "pool_size": 4.0}
    p = s.configure_round(1, [0, 2])
    assert p[0].extras["expert_ids"] == [1, 3]  # the two nearest to client 0's own upload
    torch.testing.assert_close(p[0].extras["experts"]["ctx"][1], torch.full((2, 3), 3.0))
    assert len(p[2].extras["expert_ids"]) == 2  # no own upload yet: random, seeded
    assert p[2].extras["expert_ids"] == s.configure_round(1, [2])[2].extras["expert_ids"]
    torch.testing.assert_close(p[0].state["ctx"], state["ctx"])
    ev = s.configure_evaluate(1, [0, 2])
    assert ev[0].state is None and ev[2].state is not None  # own state vs the global one
    again = PFedMoAP(num_experts=3)
    again.initialize({"ctx": torch.zeros(2, 3)}, 5, 0)
    again.load_state_dict(s.state_dict())
    assert again.configure_round(1, [0])[0].extras["expert_ids"] == [1, 3]
    with pytest.raises(ValueError, match="num_experts"):
        PFedMoAP(num_experts=0)
    with pytest.raises(ValueError, match="MixtureOfPrompts"):
        s.check_learner(TextualPrompt())


# ---- the learner -------------------------------------------------------------------------
NAMES = ["red circle", "green square", "blue triangle"]


@pytest.fixture
def learner(tiny_vit):
    lr = MixtureOfPrompts(n_ctx=4, gating_heads=4)
    lr.setup(tiny_vit, NAMES, seed=0)
    return lr


def _batch(clip, n=5) -> Batch:
    gen = torch.Generator().manual_seed(1)
    f = torch.nn.functional.normalize(torch.randn(n, clip.embed_dim, generator=gen), dim=-1)
    return Batch(labels=torch.arange(n) % 3, index=torch.arange(n), features=f)


def test_learner_logits_formula(learner, tiny_vit):
    batch = _batch(tiny_vit)
    s = tiny_vit.logit_scale
    t_local = learner.text_features()
    local = s * batch.features @ t_local.t()
    # no experts (round 0): the local term alone, without lambda (the public code's logits;
    # lambda there would halve the temperature)
    torch.testing.assert_close(learner(batch), local)
    experts = torch.randn(2, 4, tiny_vit.text_width) * 0.02
    learner.receive({"experts": {"ctx": experts}, "expert_ids": [4, 2]})
    assert learner.num_experts == 2 and learner.expert_ids == [4, 2]
    t_exp = torch.stack(
        [
            learner.clip.encode_prompted_text(learner.prompt_embeddings(e), learner.tokens)
            for e in experts
        ]
    )  # (2, C, D)
    keys = torch.cat([t_local.unsqueeze(0), t_exp]).transpose(0, 1)  # (C, 3, D)
    g = learner.gating
    pooled = g.pool(batch.features)
    mix = g(pooled, g.pool(keys))  # (B, C, d)
    want = 0.5 * local + s * (pooled.unsqueeze(1) * mix).sum(-1)
    torch.testing.assert_close(learner(batch), want, atol=1e-5, rtol=1e-5)


def test_round0_multilabel_logits_have_no_lambda(tiny_vit):
    learner = MixtureOfPrompts(n_ctx=4, gating_heads=4, lambda_local=0.25)
    learner.set_task(True)
    learner.setup(tiny_vit, NAMES, seed=0)
    batch = _batch(tiny_vit)
    pos, neg = learner.class_text_features()  # (2, C, D)
    want = tiny_vit.logit_scale * (batch.features @ pos.t() - batch.features @ neg.t())
    torch.testing.assert_close(learner(batch), want, atol=1e-5, rtol=1e-5)
    experts = {k: torch.randn(2, 4, tiny_vit.text_width) * 0.02 for k in ("ctx", "ctx_neg")}
    learner.receive({"experts": experts, "expert_ids": [3, 5]})
    t_exp = learner.expert_text_features()  # (2, 2, C, D)
    g = learner.gating
    pooled = g.pool(batch.features)

    def mixture(local, exp):  # s * <pool(f), G> for one polarity
        keys = torch.cat([local.unsqueeze(0), exp]).transpose(0, 1)  # (C, 3, D)
        return tiny_vit.logit_scale * (pooled.unsqueeze(1) * g(pooled, g.pool(keys))).sum(-1)

    moe = mixture(pos, t_exp[:, 0]) - mixture(neg, t_exp[:, 1])
    torch.testing.assert_close(learner(batch), 0.25 * want + moe, atol=1e-5, rtol=1e-5)


def test_learner_trains_ctx_and_gating_uploads_ctx_only(learner, tiny_vit):
    learner.receive({"experts": {"ctx": torch.randn(3, 4, tiny_vit.text_width)}})
    batch = _batch(tiny_vit)
    learner.loss(learner(batch), batch).backward()
    grads = {n: p.grad for n, p in learner.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(n.startswith("gating.") for n in grads)
    assert list(learner.shared_state()) == ["ctx"]
    assert all(not p.requires_grad for p in tiny_vit.model.parameters())
    pairs = learner.configure_optimizers(OptimConfig(), 10, 3)
    (p_opt, p_sched), (g_opt, g_sched) = pairs
    assert p_opt.param_groups[0]["params"] == [learner.ctx]
    assert p_opt.param_groups[0]["lr"] == 0.002
    assert g_opt.param_groups[0]["lr"] == 0.01
    assert len(g_opt.param_groups[0]["params"]) == len(list(learner.gating.parameters()))
    for _ in range(5):
        for opt, sched in pairs:
            opt.step()
            sched.step()
    assert p_opt.param_groups[0]["lr"] < 0.002 and g_opt.param_groups[0]["lr"] == 0.01


def test_learner_rejects_bad_experts(learner, tiny_vit):
    with pytest.raises(ValueError, match="do not match"):
        learner.receive({"experts": {"ctx": torch.zeros(2, 5, tiny_vit.text_width)}})
    with pytest.raises(ValueError, match="expert ids"):
        learner.receive(
            {"experts": {"ctx": torch.zeros(2, 4, tiny_vit.text_width)}, "expert_ids": [1]}
        )
    with pytest.raises(ValueError, match="takes no extra downloads"):
        learner.receive({"something": 1})


def test_expert_state_round_trips(learner, tiny_vit):
    learner.receive(
        {"experts": {"ctx": torch.randn(2, 4, tiny_vit.text_width)}, "expert_ids": [8, 3]}
    )
    sd = learner.state_dict()
    other = MixtureOfPrompts(n_ctx=4, gating_heads=4)
    other.setup(tiny_vit, NAMES, seed=1)
    other.load_state_dict(sd)
    assert other.expert_ids == [8, 3]
    batch = _batch(tiny_vit)
    torch.testing.assert_close(other(batch), learner(batch))


def test_expert_text_encoded_once_per_round(tiny_vit):
    """Experts' text features are computed once per download, not at every step."""
    cfg = small_config(
        learner=MixtureOfPrompts(n_ctx=4, gating_heads=4),
        strategy=PFedMoAP(num_experts=3),
        num_clients=4,
        rounds=2,
        local_epochs=2,
    )
    fed = Federation(cfg, None, show_progress=False)
    fed.fit(stop_after=1)  # fills the pool
    payloads = fed.strategy.configure_round(1, [0])
    fed.clients[0].receive(payloads[0])
    n_exp = fed.clients[0].learner.num_experts
    assert n_exp == 2
    steps = cfg.federation.local_epochs * fed.data.steps_per_epoch(0)
    before = fed.clip.text_sequences_encoded
    fed.fit_client(0, 1)
    c = len(fed.classnames)
    assert fed.clip.text_sequences_encoded - before == steps * c + n_exp * c
    before = fed.clip.text_sequences_encoded
    fed.evaluate_client(0)  # the experts' features are still cached
    assert fed.clip.text_sequences_encoded - before == c


# ---- the federation ----------------------------------------------------------------------
def _moap_config(**over):
    return small_config(
        learner=over.pop("learner", MixtureOfPrompts(n_ctx=4, gating_heads=4)),
        strategy=over.pop("strategy", PFedMoAP(num_experts=3)),
        **over,
    )


def test_partial_participation_from_round_zero():
    fed = Federation(
        _moap_config(num_clients=10, fraction=0.1, rounds=4), None, show_progress=False
    )
    hist = fed.fit()
    ctx_bytes = fed.strategy.global_state["ctx"].numel() * 4
    pool_sizes = []
    for r in hist[1:]:
        assert r["traffic/sampled_clients"] == 1.0
        assert r["traffic/up_bytes"] == ctx_bytes
        pool_sizes.append(r["server/pool_size"])
        assert math.isfinite(r["eval/acc_mean"])
        assert all(math.isfinite(r[f"client/{k}/acc"]) for k in range(10))
    assert pool_sizes == sorted(pool_sizes) and pool_sizes[0] == 1.0
    # one client in round 0 downloads the global context and no experts
    assert hist[1]["traffic/down_bytes"] == ctx_bytes


def test_traffic_counts_global_plus_experts():
    fed = Federation(_moap_config(num_clients=4, rounds=3), None, show_progress=False)
    hist = fed.fit()
    ctx_bytes = fed.strategy.global_state["ctx"].numel() * 4
    assert hist[1]["traffic/down_bytes"] == 4 * ctx_bytes  # round 0: global only
    # later rounds: every client gets the global context + E-1 = 2 experts
    assert hist[2]["traffic/down_bytes"] == 4 * 3 * ctx_bytes
    assert hist[2]["traffic/up_bytes"] == 4 * ctx_bytes
    for c in fed.clients:
        assert c.learner.num_experts == 2 and c.client_id not in c.learner.expert_ids


def test_unsampled_clients_keep_their_personal_state():
    fed = Federation(_moap_config(num_clients=4, fraction=0.5, rounds=3), None, show_progress=False)
    fed.fit(stop_after=1)
    trained = set(fed.strategy.pool)
    assert len(trained) == 2
    snap = {k: fed.clients[k].client_state()["learner"] for k in range(4)}
    fed.evaluate(1)
    for k in range(4):
        after = fed.clients[k].client_state()["learner"]
        if k in trained:  # evaluated with its own last local context, untouched
            _assert_same(snap[k], after)
        else:  # never trained: evaluated with the global context
            torch.testing.assert_close(after["ctx"], fed.strategy.global_state["ctx"])


def test_checkpoint_resume_keeps_gating_and_pool(tmp_path):
    def cfg():
        return _moap_config(num_clients=4, fraction=0.5, rounds=3)

    full = Federation(cfg(), tmp_path / "a", show_progress=False)
    full.fit()
    part = Federation(cfg(), tmp_path / "b", show_progress=False)
    part.fit(stop_after=2)
    resumed = Federation(cfg(), tmp_path / "b", show_progress=False)
    resumed.load(resumed.checkpoint_path)
    for k in range(4):  # gating, local context and experts come back from the checkpoint
        _assert_same(part.clients[k].client_state(), resumed.clients[k].client_state())
        assert resumed.clients[k].learner.expert_ids == part.clients[k].learner.expert_ids
    _assert_same(part.strategy.pool, resumed.strategy.pool)
    resumed = Federation(cfg(), tmp_path / "b", show_progress=False)
    resumed.fit(resume=True)
    _assert_same(full.strategy.state_dict(), resumed.strategy.state_dict())
    _assert_same(_states(full), _states(resumed))
    assert any(c.learner.num_experts for c in resumed.clients)


def test_fedavg_strategy_with_mixture_learner_runs_local_term_only():
    fed = Federation(_moap_config(strategy=FedAvg(), rounds=1), None, show_progress=False)
    fed.fit()
    assert all(c.learner.num_experts == 0 for c in fed.clients)


def test_pfedmoap_refuses_a_learner_without_experts():
    with pytest.raises(ValueError, match="MixtureOfPrompts"):
        Federation(small_config(strategy=PFedMoAP()), None, show_progress=False)


def test_personalisation_beats_fedavg_under_strong_label_skew(shapes_cache):
    """Same data (Dirichlet 0.1 over 10 clients), rounds, epochs and steps: pFedMoAP's
    per-client mixtures fit each client's label distribution, one global prompt cannot."""

    def run(learner, strategy) -> float:
        cfg = small_config(
            learner=learner,
            strategy=strategy,
            num_clients=10,
            rounds=4,
            local_epochs=2,
            lr=0.002,
            partitioner=Dirichlet(0.1, min_size=10),
        )
        cfg.backbone = BackboneConfig(model="fedclip-tiny-vit", pretrained="shapes")
        cfg.data.dataset = Shapes(num_classes=20, train_per_class=40, test_per_class=20)
        cfg.data.batch_size = 32
        return Federation(cfg, None, show_progress=False).fit()[-1]["eval/acc_mean"]

    fedavg = run(TextualPrompt(n_ctx=4, ctx_init="a photo of a"), FedAvg())
    moap = run(MixtureOfPrompts(n_ctx=4, ctx_init="a photo of a"), PFedMoAP(num_experts=5))
    assert moap > fedavg + 0.1, (moap, fedavg)


def test_pfedmoap_cifar100_config_runs_one_round(tmp_path, skip_md5):
    write_cifar100_full(tmp_path / "data")
    summary = fit_shipped_config_offline(
        "pfedmoap_cifar100.yaml", tmp_path, "--data.dataset.init_args.download=false"
    )
    assert len(summary["clients"]) == 100
    assert sum(c["train"] for c in summary["clients"]) == 600  # the partition covers all
    assert summary["config"]["strategy"] == "PFedMoAP"
    ctx_bytes = 16 * 64 * 4  # n_ctx 16 x text width 64, fp32
    assert summary["traffic"] == {"up_bytes": 10 * ctx_bytes, "down_bytes": 10 * ctx_bytes}
    assert math.isfinite(summary["eval"]["eval/acc_mean"])
