"""FedPHA's learner (ProjectedLocalPrompt): the SVD projection against numpy, the loss terms
by hand, the end token of every context length, and heterogeneous local lengths through a
federation, a resume and an export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedclip.cli import main
from fedclip.errors import ConfigError
from fedclip.export import export_prompts, load_learner, load_prompts
from fedclip.federation import Federation
from fedclip.learners import Batch, ProjectedLocalPrompt, TextualPrompt
from fedclip.learners.pha import project_local, pull_push, weak_cutoff
from fedclip.strategies import FedAvg

from .conftest import small_config, tiny_yaml
from .test_conformance import state_equal, without_time

NAMES = ["red circle", "blue", "green triangle"]


def _learner(clip, client_id=None, **kw) -> ProjectedLocalPrompt:
    learner = ProjectedLocalPrompt(**kw)
    learner.client_id = client_id
    learner.setup(clip, NAMES, seed=0)
    return learner


def _oracle(clip, ctx: torch.Tensor) -> torch.Tensor:
    """Class features of `ctx` by plain CoOp (TextualPrompt) with a context of its length."""
    coop = TextualPrompt(n_ctx=ctx.shape[0])
    coop.setup(clip, NAMES, seed=0)
    with torch.no_grad():
        coop.ctx.copy_(ctx)
        return coop.text_features()


# ---- the projection --------------------------------------------------------------------
def test_weak_cutoff_is_the_floor():
    assert weak_cutoff(16, 0.8) == 3  # the paper's 13 weakest of 16 directions
    assert weak_cutoff(5, 0.8) == 1  # 5 x 0.2 is 1 (float rounding gives 0.999...)
    assert (weak_cutoff(4, 0.8), weak_cutoff(10, 0.5), weak_cutoff(7, 1.0)) == (0, 5, 0)


@pytest.mark.parametrize("projection", ["weak", "complement"])
def test_projection_against_numpy_svd(tiny_vit, projection):
    learner = _learner(tiny_vit, n_ctx=6, n_local=3, projection=projection)
    gen = torch.Generator().manual_seed(5)
    g, local = torch.randn(6, 64, generator=gen), torch.randn(3, 64, generator=gen)
    with torch.no_grad():
        learner.ctx.copy_(g)
        learner.ctx_local.copy_(local)
    g64, l64 = g.double().numpy(), local.double().numpy()
    _, _, vt = np.linalg.svd(g64, full_matrices=True)  # (64, 64), rows: right singular vectors
    if projection == "weak":
        v2 = vt[1:6].T  # cutoff floor(6 x 0.2) = 1: the 5 weakest of the row space
        want = l64 @ v2 @ v2.T
    else:
        null = vt[6:].T  # (64, 58): the orthogonal complement of G's row space
        want = l64 @ null @ null.T
        assert np.abs(want @ g64.T).max() < 1e-12
    got = learner.projected_local().double().detach().numpy()
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(project_local(g, local, projection, 0.8).numpy(), want, atol=2e-5)


def test_detach_projection_stops_the_svd_gradient(tiny_vit):
    for detach, expect_grad in ((False, True), (True, False)):
        learner = _learner(tiny_vit, n_ctx=6, n_local=4, detach_projection=detach)
        pull = project_local(
            learner.ctx.detach() if detach else learner.ctx, learner.ctx_local
        ).sum()
        pull.backward()
        assert learner.ctx_local.grad is not None
        g = learner.ctx.grad
        assert (g is not None and float(g.abs().max()) > 0) == expect_grad


# ---- the loss --------------------------------------------------------------------------
def test_pull_push_on_hand_picked_features():
    t_l = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t_g = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    t_p = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    pull, push = pull_push(t_l, t_g, t_p, alpha=1.0)
    assert float(pull) == pytest.approx((0.2**2 + 0.6**2) / 4)  # mean over C x D
    # ||t_l - t_g|| = sqrt(0.8) for class 0, 0 for class 1
    assert float(push) == pytest.approx(((1 - 0.8**0.5) + 1.0) / 2)
    _, push = pull_push(t_l, t_g, t_p, alpha=0.5)
    assert float(push) == pytest.approx(0.5 / 2)  # class 0 is past the margin


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_loss_terms_against_plain_coop_and_numpy(tiny_vit):
    kw = dict(n_ctx=6, n_local=3, alpha=3.0, pull_weight=2.0, push_weight=0.5)
    learner = _learner(tiny_vit, **kw)
    gen = torch.Generator().manual_seed(1)
    f = torch.nn.functional.normalize(torch.randn(5, tiny_vit.embed_dim, generator=gen), dim=-1)
    labels = torch.tensor([0, 1, 2, 1, 0])
    batch = Batch(labels=labels, index=torch.arange(5), features=f)
    with torch.no_grad():
        terms = {k: float(v) for k, v in learner.loss_terms(batch).items()}
        total = float(learner.training_loss(batch))

    g, local = learner.ctx.detach(), learner.ctx_local.detach()
    _, _, vt = np.linalg.svd(g.double().numpy(), full_matrices=False)
    v2 = vt[1:].T
    p = torch.from_numpy(local.double().numpy() @ v2 @ v2.T).float()
    t_l, t_g, t_p = (_oracle(tiny_vit, c).double().numpy() for c in (local, g, p))
    s, fn, y = float(tiny_vit.logit_scale), f.double().numpy(), labels.numpy()
    ce = [float(-_log_softmax(s * fn @ t.T)[np.arange(5), y].mean()) for t in (t_l, t_g)]
    pull = float(((t_l - t_p) ** 2).mean())
    push = float(np.maximum(3.0 - np.linalg.norm(t_l - t_g, axis=1), 0).mean())
    assert push > 0
    want = {"ce_local": ce[0], "ce_global": ce[1], "pull": pull, "push": push}
    for k, v in want.items():
        assert terms[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert total == pytest.approx(ce[0] + ce[1] + 2.0 * pull + 0.5 * push, rel=1e-4)
    # predictions: the local prompt alone; the global part: G alone
    learner.eval()
    with torch.no_grad():
        logits = learner(batch).double().numpy()
        np.testing.assert_allclose(logits, s * fn @ t_l.T, rtol=1e-4, atol=1e-4)
        with learner.global_part():
            np.testing.assert_allclose(
                learner(batch).double().numpy(), s * fn @ t_g.T, rtol=1e-4, atol=1e-4
            )


# ---- one tokenisation per length ---------------------------------------------------------
def _by_hand(clip, tokens: torch.Tensor, ctx: torch.Tensor, pool_at: torch.Tensor) -> torch.Tensor:
    """77-token sequences with rows 1..n replaced by ctx, through the tower, read at pool_at."""
    tower = clip.text
    with torch.no_grad():
        x = tower.token_embedding(tokens).clone()
        x[:, 1 : 1 + ctx.shape[0]] = ctx
        x = x + tower.positional_embedding
        x = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask))
        x = x[torch.arange(len(tokens)), pool_at]
        proj = tower.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return torch.nn.functional.normalize(x, dim=-1)


def test_a_short_local_prompt_is_pooled_at_its_own_end_token(tiny_vit):
    learner = _learner(tiny_vit, n_ctx=8, n_local=3)
    short = tiny_vit.tokenize([f"X X X {n}." for n in NAMES])  # (C, 77)
    long = tiny_vit.tokenize([f"{' '.join(['X'] * 8)} {n}." for n in NAMES])
    eot_short, eot_long = short.argmax(-1), long.argmax(-1)
    assert torch.equal(eot_long - eot_short, torch.full((3,), 5))
    assert torch.equal(learner.local_tokens.argmax(-1), eot_short)
    assert torch.equal(learner.tokens.argmax(-1), eot_long)
    local = learner.ctx_local.detach()
    want = _by_hand(tiny_vit, short, local, eot_short)
    with torch.no_grad():
        got = learner.text_features()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(learner.reference_text(local), want, atol=1e-5, rtol=1e-5)
    # the public HE code's reading: the short prompt in the longest layout (suffix cut after
    # 8 placeholders, zero-padded), pooled at the longest prompt's end token: not the same
    with torch.no_grad():
        emb = tiny_vit.text.token_embedding(long)
        seq = torch.cat([emb[:, :1], local.expand(3, -1, -1), emb[:, 9:]], dim=1)
        seq = torch.cat([seq, torch.zeros(3, 77 - seq.shape[1], seq.shape[2])], dim=1)
        x = seq + tiny_vit.text.positional_embedding
        x = tiny_vit.text.ln_final(tiny_vit.text.transformer(x, attn_mask=tiny_vit.text.attn_mask))
        wrong = torch.nn.functional.normalize(
            x[torch.arange(3), eot_long] @ tiny_vit.text.text_projection, dim=-1
        )
    assert float((wrong - want).abs().max()) > 1e-2


def test_lengths_per_client_and_errors(tiny_vit):
    lengths = [_learner(tiny_vit, k, n_ctx=4, local_lengths=[4, 6]).ctx_local.shape[0]
               for k in (0, 1, 2, None)]  # fmt: skip
    assert lengths == [4, 6, 4, 4]
    assert _learner(tiny_vit, 3, n_ctx=4, n_local=5).ctx_local.shape == (5, 64)
    # clients of one length start identical; G never depends on the client
    a, b = _learner(tiny_vit, 0, local_lengths=[4, 6]), _learner(tiny_vit, 2, local_lengths=[4, 6])
    assert torch.equal(a.ctx_local, b.ctx_local) and torch.equal(a.ctx, b.ctx)
    for kw, key in (
        ({"local_lengths": []}, "local_lengths"),
        ({"local_lengths": [4, 0]}, "local_lengths"),
        ({"n_local": 0}, "n_local"),
        ({"ratio": 0.0}, "ratio"),
        ({"alpha": -1.0}, "alpha"),
        ({"projection": "null"}, "projection"),
    ):
        with pytest.raises(ConfigError, match=f"learner.init_args.{key}"):
            ProjectedLocalPrompt(**kw)
    with pytest.raises(ConfigError, match="local_lengths"):
        _learner(tiny_vit, 0, n_ctx=4, local_lengths=[80])


# ---- heterogeneous lengths in a federation ---------------------------------------------
def _hetero(**over):
    learner = ProjectedLocalPrompt(n_ctx=5, local_lengths=[4, 6])
    return small_config(learner=learner, strategy=FedAvg(), num_clients=3, **over)


def test_heterogeneous_lengths_run_resume_and_upload_only_g(tmp_path):
    whole = Federation(_hetero(rounds=2), None, show_progress=False)
    whole.fit()
    first = Federation(_hetero(rounds=2), tmp_path / "run", show_progress=False)
    first.fit(stop_after=1)
    second = Federation(_hetero(rounds=2), tmp_path / "run", show_progress=False)
    second.fit(resume=True)
    assert without_time(second.history) == without_time(whole.history)
    for k, (a, b) in enumerate(zip(second.clients, whole.clients, strict=True)):
        state_equal(a.client_state(), b.client_state())
        assert a.learner.ctx_local.shape == ((4, 64) if k != 1 else (6, 64))
        upload = a.upload()
        assert set(upload) == {"ctx"} and upload["ctx"].shape == (5, 64)
    state_equal(second.strategy.global_state, whole.strategy.global_state)
    assert whole.history[-1]["client/1/local_length"] == 6


def test_export_rebuilds_each_clients_length(tmp_path):
    cfg = tmp_path / "pha.yaml"
    learner = {"class_path": "fedclip.learners.ProjectedLocalPrompt",
               "init_args": {"n_ctx": 5, "local_lengths": [4, 6]}}  # fmt: skip
    cfg.write_text(tiny_yaml({"learner": learner, "data.num_clients": 3,
                              "federation": {"rounds": 1, "eval_at_start": False}}))  # fmt: skip
    args = ["fit", "--config", str(cfg), "--output_dir", str(tmp_path / "runs"),
            "--run_name", "pha", "--progress", "false"]  # fmt: skip
    assert main(args) == 0
    path = export_prompts(tmp_path / "runs" / "pha")
    tensors, _ = load_prompts(path)
    assert tuple(tensors["global/ctx"].shape) == (5, 64)
    for k, n in ((0, 4), (1, 6), (2, 4)):
        rebuilt = load_learner(path, client=k)
        assert rebuilt.ctx_local.shape == (n, 64)
        assert torch.equal(rebuilt.ctx_local, tensors[f"client/{k}/ctx_local"])
    assert load_learner(path).ctx.shape == (5, 64)
