"""FedCLIP's attention adapter: the forward pass and the three losses by hand (float64),
the frozen text side cached, a fresh Adam per round, a BatchNorm backbone kept in eval
mode, multi-label logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedclip.errors import ConfigError
from fedclip.federation import Federation
from fedclip.learners import AttentionAdapter, Batch

from .conftest import small_config

NAMES = ["red circle", "green square", "blue triangle"]


def _build(clip, multilabel=False, **kw):
    learner = AttentionAdapter(**kw)
    learner.set_task(multilabel)
    learner.setup(clip, NAMES, seed=0)
    with torch.no_grad():  # an adapter far from uniform, so the test sees its effect
        for p in learner.adapter.parameters():
            p.mul_(30.0)
    return learner


def _batch(clip, labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(len(labels), clip.embed_dim, generator=g)
    return Batch(
        labels=labels, index=torch.arange(len(labels)), features=f / f.norm(dim=-1)[:, None]
    )


def _hand_features(learner, e: np.ndarray) -> np.ndarray:
    """normalise(softmax(W2 tanh(W1 e + b1) + b2) * e), one image and one unit at a time."""
    w1, b1 = (learner.adapter[0].weight.detach().double().numpy(),
              learner.adapter[0].bias.detach().double().numpy())  # fmt: skip
    w2, b2 = (learner.adapter[2].weight.detach().double().numpy(),
              learner.adapter[2].bias.detach().double().numpy())  # fmt: skip
    d = e.shape[1]
    out = np.zeros_like(e)
    for i in range(e.shape[0]):
        h = [math.tanh(sum(w1[j, k] * e[i, k] for k in range(d)) + b1[j]) for j in range(d)]
        z = [sum(w2[j, k] * h[k] for k in range(d)) + b2[j] for j in range(d)]
        m = max(z)
        ex = [math.exp(v - m) for v in z]
        a = [v / sum(ex) for v in ex]
        x = [a[j] * e[i, j] for j in range(d)]
        n = math.sqrt(sum(v * v for v in x))
        out[i] = [v / n for v in x]
    return out


def _ce(z: np.ndarray, y: list[int]) -> float:
    total = 0.0
    for i, yi in enumerate(y):
        m = max(z[i])
        total += -(z[i][yi] - m - math.log(sum(math.exp(v - m) for v in z[i])))
    return total / len(y)


def test_forward_hand_computed(tiny_vit):
    learner = _build(tiny_vit)
    batch = _batch(tiny_vit, torch.tensor([0, 1, 2, 1]))
    f = _hand_features(learner, batch.features.double().numpy())
    t = learner.text_features().double().numpy()
    s = float(tiny_vit.logit_scale)
    want = np.array([[s * float(f[i] @ t[c]) for c in range(3)] for i in range(4)])
    got = learner(batch).detach().double().numpy()
    assert np.abs(got - want).max() < 1e-3  # logits of scale ~s: 1e-5 relative
    a = learner.adapter(batch.features)  # the attention: a softmax over the D coordinates
    assert torch.allclose(a.sum(-1), torch.ones(4), atol=1e-6) and bool((a > 0).all())


def test_text_is_the_frozen_template_encoded_once(tiny_vit):
    learner = _build(tiny_vit, template="a picture of a {}")
    want = tiny_vit.encode_text([f"a picture of a {n}" for n in NAMES]).float()
    assert torch.allclose(learner.text_features(), want / want.norm(dim=-1, keepdim=True))
    batch = _batch(tiny_vit, torch.tensor([0, 1]))
    before = tiny_vit.text_sequences_encoded
    for loss in ("ce", "clip_contrastive"):
        learner.loss_kind = loss
        for _ in range(3):
            learner.training_loss(batch).backward()
    assert tiny_vit.text_sequences_encoded == before  # nothing re-encoded
    assert sum(p.numel() for p in learner.parameters()) == 2 * (64 * 64 + 64)
    assert learner.shared_keys() == [
        "adapter.0.weight", "adapter.0.bias", "adapter.2.weight", "adapter.2.bias"
    ]  # fmt: skip


@pytest.mark.parametrize("kind", ["ce", "clip_contrastive", "masked_contrastive"])
def test_losses_hand_computed(tiny_vit, kind):
    learner = _build(tiny_vit, loss=kind)
    y = [0, 1, 0, 2, 0]
    batch = _batch(tiny_vit, torch.tensor(y), seed=2)
    f = _hand_features(learner, batch.features.double().numpy())
    t = learner.text_features().double().numpy()
    s = float(tiny_vit.logit_scale)
    if kind == "ce":
        want = _ce([[s * float(f[i] @ t[c]) for c in range(3)] for i in range(5)], y)
    else:
        # image i against the class text of sample j
        z = [[s * float(f[i] @ t[y[j]]) for j in range(5)] for i in range(5)]
        zt = [[z[j][i] for j in range(5)] for i in range(5)]
        if kind == "masked_contrastive":  # same-label pairs i != j are not negatives
            for m in (z, zt):
                for i in range(5):
                    for j in range(5):
                        if i != j and y[i] == y[j]:
                            m[i][j] = -math.inf
        want = 0.5 * (_ce(z, list(range(5))) + _ce(zt, list(range(5))))
    got = learner.training_loss(batch)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-5)
    got.backward()
    assert learner.adapter[0].weight.grad.abs().sum() > 0


def test_contrastive_batch_of_one_is_a_zero_that_keeps_the_graph(tiny_vit):
    learner = _build(tiny_vit, loss="clip_contrastive")
    loss = learner.training_loss(_batch(tiny_vit, torch.tensor([1])))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert float(learner.adapter[0].weight.grad.abs().sum()) == 0.0


def test_multilabel_logits_positive_minus_negative(tiny_vit):
    learner = _build(tiny_vit, multilabel=True)
    batch = Batch(labels=torch.tensor([[1.0, 0.0, 1.0]]), index=torch.arange(1),
                  features=_batch(tiny_vit, torch.tensor([0])).features)  # fmt: skip
    f = _hand_features(learner, batch.features.double().numpy())[0]
    tp = learner.text_features().double().numpy()
    tn = learner.negative_text_features().double().numpy()
    s = float(tiny_vit.logit_scale)
    want = [s * float(f @ tp[c]) - s * float(f @ tn[c]) for c in range(3)]
    got = learner(batch)[0].detach().double().numpy()
    assert np.abs(got - np.array(want)).max() < 1e-3
    with pytest.raises(ConfigError, match="learner.init_args.loss=clip_contrastive"):
        AttentionAdapter(loss="clip_contrastive").set_task(True)


def test_reference_path_equals_forward(tiny_vit):
    learner = _build(tiny_vit)
    size = tiny_vit.preprocess_val.transforms[0].size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        batch = Batch(labels=torch.tensor([0, 1]), index=torch.arange(2),
                      features=tiny_vit.encode_image(images, normalize=False))  # fmt: skip
        assert torch.allclose(learner.reference_logits(images), learner(batch), atol=1e-4)


def test_fresh_adam_every_round_and_the_reference_settings(tiny_vit):
    fed = Federation(small_config(learner=AttentionAdapter(), rounds=1), None, show_progress=False)
    client = fed.clients[0]
    fed.runtime.fit_client(0, 0)
    (opt, _), = client.optimizer_pairs  # fmt: skip
    assert isinstance(opt, torch.optim.Adam)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        5e-5, (0.9, 0.98), 1e-6, 0.2
    )  # fmt: skip
    assert opt.state  # moments after the round's steps
    assert client.learner.end_of_round(1.0)
    client.rebuild_optimizers()
    (fresh, _), = client.optimizer_pairs  # fmt: skip
    assert fresh is not opt and not fresh.state
    assert not AttentionAdapter(fresh_optimizer=False).end_of_round(1.0)
    assert not AttentionAdapter(optimizer="run").end_of_round(1.0)


def test_batchnorm_backbone_stays_in_eval_mode_while_training(tiny_rn):
    # augmentation on: features computed from the images through the RN tower at every step
    cfg = small_config(learner=AttentionAdapter(lr=1e-2), model="fedclip-tiny-rn", augment=True)
    fed = Federation(cfg, None, show_progress=False)
    norms = [m for m in fed.clip.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    adapter = fed.clients[0].learner.adapter[0].weight.detach().clone()
    fed.clip.train()  # asked for training mode, as the reference's `totrain` does: refused
    fed.runtime.fit_client(0, 0)
    assert not fed.clip.model.training and not any(m.training for m in norms)
    for m, old in zip(norms, before, strict=True):
        for k, v in m.state_dict().items():
            assert torch.equal(v, old[k]), k  # running statistics and counters unmoved
    assert not torch.equal(fed.clients[0].learner.adapter[0].weight, adapter)  # it trained


def test_bad_values():
    for kw, key in [({"loss": "mse"}, "loss"), ({"lr": 0}, "lr"), ({"optimizer": "sgd"}, "optimizer"),
                    ({"template": "a picture"}, "template"), ({"betas": (0.9, 1.0)}, "betas")]:  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            AttentionAdapter(**kw)


def test_raw_features_reach_the_adapter_and_normalised_ones_the_others():
    """A learner declaring Input.RAW_FEATURES gets the frozen features before their
    normalisation from the same cache that gives the other learners normalised ones."""
    from fedclip.learners import TextualPrompt

    raw_fed = Federation(
        small_config(learner=AttentionAdapter(), rounds=1), None, show_progress=False
    )
    batch = next(raw_fed.data.batches(0, "train"))
    images = torch.stack([raw_fed.data.train_set[int(i)][0] for i in batch.index])
    clip = raw_fed.clip
    with torch.no_grad():
        want = clip.encode_image(images, normalize=False)
    torch.testing.assert_close(batch.features, want, atol=1e-5, rtol=1e-5)
    assert (batch.features.norm(dim=-1) - 1).abs().min() > 1e-3
    fed = Federation(
        small_config(learner=TextualPrompt(n_ctx=4), rounds=1), None, show_progress=False
    )
    plain = next(fed.data.batches(0, "train"))
    torch.testing.assert_close(plain.features, torch.nn.functional.normalize(want, dim=-1))
