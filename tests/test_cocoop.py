"""CoCoOp's learner against hand computations: the meta-net in numpy, the per-image logits
from open_clip's own text modules in float64 (each image's C prompts one by one), chunking
that changes nothing, the reference path, and what travels."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedclip.errors import ConfigError
from fedclip.learners import Batch, ConditionalPrompt
from fedclip.learners import cocoop as cocoop_module

NAMES = ["red circle", "green square", "blue triangle", "yellow star"]


def _learner(clip, **kw) -> ConditionalPrompt:
    lr = ConditionalPrompt(**kw)
    lr.setup(clip, NAMES, seed=0)
    with torch.no_grad():  # a meta-net whose shift is not negligible next to the context
        for p in lr.meta_net.parameters():
            p.mul_(3.0)
    return lr


def _features(clip, n=3, seed=1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, clip.embed_dim, generator=gen), dim=-1)


def _batch(f: torch.Tensor) -> Batch:
    n = f.shape[0]
    return Batch(labels=torch.arange(n) % len(NAMES), index=torch.arange(n), features=f)


def _meta_numpy(lr: ConditionalPrompt, f: torch.Tensor) -> np.ndarray:
    """pi(f) = W2 relu(W1 f + b1) + b2, float64, explicit loops over images."""
    w1 = lr.meta_net.linear1.weight.detach().double().numpy()
    b1 = lr.meta_net.linear1.bias.detach().double().numpy()
    w2 = lr.meta_net.linear2.weight.detach().double().numpy()
    b2 = lr.meta_net.linear2.bias.detach().double().numpy()
    out = []
    for x in f.double().numpy():
        h = np.maximum(w1 @ x + b1, 0.0)
        out.append(w2 @ h + b2)
    return np.stack(out)


def _hand_logits(clip, lr: ConditionalPrompt, f: torch.Tensor) -> np.ndarray:
    """open_clip's own modules in float64: for each image b, the full-length sentences
    'X X X X {name}.' with the placeholder rows replaced by ctx + pi(f_b), positional
    embedding, the whole transformer with its causal mask, ln_final, the EOT row, the
    projection; then s <f_b, t_bc>. One image and one class at a time."""
    model = copy.deepcopy(clip.model).double()
    shift = torch.from_numpy(_meta_numpy(lr, f))  # (B, W)
    ctx = lr.ctx.detach().double()
    tokens = clip.tokenize([f"X X X X {n}." for n in NAMES])  # (C, 77)
    s = float(clip.logit_scale)
    out = np.zeros((f.shape[0], len(NAMES)))
    with torch.no_grad():
        for b in range(f.shape[0]):
            for c in range(len(NAMES)):
                ids = tokens[c : c + 1]
                x = model.token_embedding(ids)  # (1, 77, W)
                x[0, 1:5] = ctx + shift[b]
                x = x + model.positional_embedding
                x = model.transformer(x, attn_mask=model.attn_mask)
                x = model.ln_final(x)[0, int(ids.argmax())] @ model.text_projection
                t = (x / x.norm()).numpy()
                fb = f[b].double().numpy()
                out[b, c] = s * float(fb @ t)
    return out


def test_meta_net_against_numpy_and_default_init(tiny_vit):
    lr = ConditionalPrompt()
    lr.setup(tiny_vit, NAMES, seed=0)
    d, w = tiny_vit.embed_dim, tiny_vit.text_width
    assert lr.n_ctx == 4
    assert lr.meta_net.linear1.weight.shape == (d // 16, d)
    assert lr.meta_net.linear2.weight.shape == (w, d // 16)
    # PyTorch's default init drawn under the setup seed: bound 1/sqrt(fan_in)
    assert float(lr.meta_net.linear1.weight.detach().abs().max()) <= 1 / d**0.5
    again = ConditionalPrompt()
    again.setup(tiny_vit, NAMES, seed=0)
    other = ConditionalPrompt()
    other.setup(tiny_vit, NAMES, seed=1)
    for (n, p), q, r in zip(
        lr.meta_net.named_parameters(), again.meta_net.parameters(), other.meta_net.parameters(),
        strict=True,
    ):  # fmt: skip
        assert torch.equal(p, q), n
        assert not torch.equal(p, r), n
    f = _features(tiny_vit)
    got = lr.contexts(f).detach().double().numpy()  # (B, n, W)
    want = lr.ctx.detach().double().numpy()[None] + _meta_numpy(lr, f)[:, None, :]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_phrase_init_is_the_phrase_embedding(tiny_vit):
    lr = ConditionalPrompt()
    lr.setup(tiny_vit, NAMES, seed=0)
    ids = tiny_vit.tokenize(["a photo of a"])
    with torch.no_grad():
        want = tiny_vit.token_embedding(ids)[0, 1:5]
    assert torch.equal(lr.ctx.detach(), want)
    rand = ConditionalPrompt(n_ctx=3, ctx_init=None)
    rand.setup(tiny_vit, NAMES, seed=0)
    assert rand.ctx.shape == (3, tiny_vit.text_width)
    assert 0.01 < float(rand.ctx.detach().std()) < 0.03


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_logits_against_open_clip_one_prompt_at_a_time(tiny_vit, shared_prefix):
    lr = _learner(tiny_vit)
    lr.shared_prefix = shared_prefix  # the shared-prefix path and the batched path
    f = _features(tiny_vit)
    want = _hand_logits(tiny_vit, lr, f)
    shift = (lr.contexts(f) - lr.ctx).detach()
    assert float(shift.abs().mean()) > 0.1 * float(lr.ctx.abs().mean())  # it does shift
    with torch.no_grad():
        got = lr(_batch(f)).double().numpy()
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-5)
    # the images' class rankings differ because the contexts do
    per_image = [lr.image_text_features(f[b : b + 1])[0] for b in range(3)]
    assert not torch.allclose(per_image[0], per_image[1], atol=1e-4)


def test_zero_shift_is_zero_shot_clip(tiny_vit):
    """With the meta-net's output layer at zero, the logits are zero-shot CLIP's with
    'a photo of a {class}.' (open_clip's encode_text)."""
    lr = ConditionalPrompt()
    lr.setup(tiny_vit, NAMES, seed=0)
    with torch.no_grad():
        lr.meta_net.linear2.weight.zero_()
        lr.meta_net.linear2.bias.zero_()
        f = _features(tiny_vit)
        t = tiny_vit.model.encode_text(tiny_vit.tokenize([f"a photo of a {n}." for n in NAMES]))
        want = tiny_vit.logit_scale * f @ torch.nn.functional.normalize(t, dim=-1).t()
        torch.testing.assert_close(lr(_batch(f)), want, atol=2e-5, rtol=0)


def test_chunking_changes_nothing(tiny_vit, monkeypatch):
    f = _features(tiny_vit, n=5)
    with torch.no_grad():
        whole = _learner(tiny_vit, chunk=5)(_batch(f))
        for chunk in (1, 2, 3):
            torch.testing.assert_close(
                _learner(tiny_vit, chunk=chunk)(_batch(f)), whole, atol=1e-5, rtol=0
            )
    lr = _learner(tiny_vit)
    tokens = lr.tokens.shape[1]
    suffix = tokens - 1 - lr.n_ctx  # SOS + context run once per image
    per_image = len(NAMES) * suffix * tiny_vit.text_width * 4
    assert lr.chunk_size() == max(1, cocoop_module.CHUNK_BUDGET // per_image)
    monkeypatch.setattr(cocoop_module, "CHUNK_BUDGET", 2 * per_image + 1)
    assert lr.chunk_size() == 2
    lr.shared_prefix = False  # the batched path runs whole sequences
    monkeypatch.setattr(cocoop_module, "CHUNK_BUDGET", 2 * len(NAMES) * tokens * 64 * 4)
    assert lr.chunk_size() == 2
    with torch.no_grad():
        torch.testing.assert_close(lr(_batch(f)), whole, atol=1e-5, rtol=0)


def test_reference_path_equals_forward(tiny_vit):
    lr = _learner(tiny_vit)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        f = tiny_vit.encode_image(images)
        torch.testing.assert_close(lr.reference_logits(images), lr(_batch(f)), atol=1e-5, rtol=0)
    ref = lr.reference_loss(images, _batch(f))
    fast = lr.training_loss(_batch(f))
    torch.testing.assert_close(ref, fast, atol=1e-5, rtol=0)


def test_everything_trains_and_travels(tiny_vit):
    lr = _learner(tiny_vit)
    lr.train()
    lr.training_loss(_batch(_features(tiny_vit))).backward()
    names = {n for n, p in lr.named_parameters() if p.requires_grad}
    assert set(lr.shared_keys()) == names == {
        "ctx", "meta_net.linear1.weight", "meta_net.linear1.bias",
        "meta_net.linear2.weight", "meta_net.linear2.bias",
    }  # fmt: skip
    assert lr.personal_keys() == []
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lr.parameters())
    assert all(p.grad is None for p in tiny_vit.model.parameters())


def test_other_classes_and_refusals(tiny_vit):
    lr = _learner(tiny_vit)
    f = _features(tiny_vit)
    with torch.no_grad():
        before = lr(_batch(f))
        lr.set_classes(NAMES[:2] + ["purple hexagon"])
        assert lr(_batch(f)).shape == (3, 3)
        lr.set_classes(NAMES)
        torch.testing.assert_close(lr(_batch(f)), before)
    with pytest.raises(ConfigError, match="ConditionalPrompt does not support multi-label"):
        ConditionalPrompt().set_task(True)
    for bad in ({"chunk": 0}, {"meta_hidden": 0}):
        with pytest.raises(ConfigError, match=f"learner.init_args.{next(iter(bad))}="):
            ConditionalPrompt(**bad)
    with pytest.raises(NotImplementedError, match="depend on the image"):
        lr.text_features()
