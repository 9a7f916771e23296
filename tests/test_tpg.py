"""FedTPG's learner (fedclip.learners.tpg) against hand computations: the generator in
float64 numpy (LayerNorm, multi-head attention and GEGLU written out), the class-name
features cached per class list, the text path against a tower run block by block."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedclip.errors import ConfigError
from fedclip.learners import GeneratedPrompt, TextPromptGenerator

# ---- the generator by hand (numpy, float64) ---------------------------------------------


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def geglu(x):
    half = x.shape[-1] // 2
    return x[..., :half] * gelu(x[..., half:])


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def mha(attn: torch.nn.MultiheadAttention, q, k, v):
    """Multi-head attention with the module's weights, written out: queries q (Lq, W),
    keys k and values v (Lk, kdim)."""
    w, h = attn.embed_dim, attn.num_heads
    if attn._qkv_same_embed_dim:
        wq, wk, wv = np.split(np_(attn.in_proj_weight), 3)
    else:
        wq, wk, wv = np_(attn.q_proj_weight), np_(attn.k_proj_weight), np_(attn.v_proj_weight)
    bq, bk, bv = np.split(np_(attn.in_proj_bias), 3)
    qp, kp, vp = q @ wq.T + bq, k @ wk.T + bk, v @ wv.T + bv
    dh = w // h
    out = np.zeros((q.shape[0], w))
    for i in range(h):
        s = slice(i * dh, (i + 1) * dh)
        a = softmax(qp[:, s] @ kp[:, s].T / math.sqrt(dh))
        out[:, s] = a @ vp[:, s]
    return out @ np_(attn.out_proj.weight).T + np_(attn.out_proj.bias)


def feed_forward(ff, x):
    ln, lin1, _, lin2 = ff
    h = layer_norm(x, np_(ln.weight), np_(ln.bias))
    h = geglu(h @ np_(lin1.weight).T + np_(lin1.bias))
    return h @ np_(lin2.weight).T + np_(lin2.bias)


def hand_generator(g: TextPromptGenerator, names: np.ndarray) -> np.ndarray:
    q = layer_norm(np_(g.soft_prompt), np_(g.norm_q.weight), np_(g.norm_q.bias))
    kv = layer_norm(names, np_(g.norm_kv.weight), np_(g.norm_kv.bias))
    x = mha(g.cross_attn, q, kv, kv)  # no residual from the queries
    x = x + feed_forward(g.cross_ff, x)
    for block in g.blocks:
        h = layer_norm(x, np_(block.norm.weight), np_(block.norm.bias))
        x = x + mha(block.attn, h, h, h)
        x = x + feed_forward(block.ff, x)
    return x.reshape(g.d_ctx, g.n_ctx, -1)


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter redrawn (LayerNorm weights and all biases away from 1 and 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


@pytest.mark.parametrize("kv_dim,depth", [(8, 0), (6, 2)])
def test_generator_equals_the_hand_computation(kv_dim, depth):
    g = TextPromptGenerator(n_ctx=3, d_ctx=2, width=8, kv_dim=kv_dim, depth=depth, heads=2)
    randomise(g)
    names = torch.randn(5, kv_dim, generator=torch.Generator().manual_seed(1))
    out = g.double()(names.double())
    assert out.shape == (2, 3, 8)
    np.testing.assert_allclose(out.detach().numpy(), hand_generator(g, np_(names)), atol=1e-10)


def test_generator_defaults_are_the_papers():
    g = TextPromptGenerator(n_ctx=4, d_ctx=1, width=512, kv_dim=512)
    n = sum(p.numel() for p in g.parameters())
    assert 4.1e6 < n < 4.3e6  # "about 4.2 M parameters"
    assert g.cross_ff[1].out_features == 4096 and g.cross_ff[3].in_features == 2048
    assert abs(float(g.soft_prompt.detach().std()) - 0.02) < 0.005


# ---- the learner on the tiny backbone -----------------------------------------------------

CLASSES_A = ["red circle", "blue square", "green triangle"]
CLASSES_B = ["yellow star", "purple hexagon"]


def learner(clip, classes=CLASSES_A, **kw) -> GeneratedPrompt:
    lrn = GeneratedPrompt(n_ctx=4, **kw)
    lrn.setup(clip, list(classes), seed=0)
    randomise(lrn.generator, seed=3)
    with torch.no_grad():  # contexts of the size of token embeddings
        lrn.generator.soft_prompt.mul_(0.1)
    return lrn


def test_class_name_features_are_encoded_once_per_class_list(tiny_vit):
    lrn = learner(tiny_vit)
    bare = tiny_vit.encode_text(CLASSES_A)  # the bare names, normalised, no template
    lrn.text_features()  # encodes the names once, then the 3 prompts
    torch.testing.assert_close(lrn.name_features(), bare)
    seen = []
    for classes in (CLASSES_A, CLASSES_B, CLASSES_A, CLASSES_B, CLASSES_A):
        lrn.set_classes(classes)
        before = tiny_vit.text_sequences_encoded
        lrn.text_features().sum().backward()
        seen.append(tiny_vit.text_sequences_encoded - before)
    # A once more: only its 3 prompts; B the first time: 2 names + 2 prompts, then 2
    assert seen == [3, 4, 3, 2, 3]


def hand_text(clip, classes, contexts, start_block: int = 1) -> torch.Tensor:
    """Class features of "X X X X {class}." with contexts[0] in the placeholders, run through
    open_clip's text tower block by block at full length (77 tokens); before block j >=
    start_block the context rows are replaced by contexts[j - start_block + 1]."""
    owner = clip.model
    n = contexts.shape[1]
    tokens = clip.tokenize([f"{' '.join(['X'] * n)} {c}." for c in classes])
    x = owner.token_embedding(tokens).clone()
    x[:, 1 : 1 + n] = contexts[0]
    x = x + owner.positional_embedding
    deep = list(contexts[1:])
    for j, block in enumerate(owner.transformer.resblocks):
        if j >= start_block and deep:
            x = x.clone()
            x[:, 1 : 1 + n] = deep.pop(0)
        x = block(x, attn_mask=owner.attn_mask)
    x = owner.ln_final(x)[torch.arange(len(classes)), tokens.argmax(-1)] @ owner.text_projection
    return x / x.norm(dim=-1, keepdim=True)


def test_text_features_equal_the_77_token_tower(tiny_vit):
    lrn = learner(tiny_vit)
    with torch.no_grad():
        contexts = lrn.generate()
        expected = hand_text(tiny_vit, CLASSES_A, contexts)
        torch.testing.assert_close(lrn.text_features(), expected, atol=1e-5, rtol=0)
        lrn.set_classes(CLASSES_B)  # conditioned on the new class list
        expected = hand_text(tiny_vit, CLASSES_B, lrn.generate())
        torch.testing.assert_close(lrn.text_features(), expected, atol=1e-5, rtol=0)


def test_deep_prompts_start_at_block_1(tiny_vit):
    lrn = learner(tiny_vit, d_ctx=2)
    with torch.no_grad():
        contexts = lrn.generate()
        assert contexts.shape == (2, 4, tiny_vit.text_width)
        got = lrn.text_features()
        torch.testing.assert_close(got, hand_text(tiny_vit, CLASSES_A, contexts), atol=1e-5, rtol=0)
        # the public code's defect (the input context overwritten before block 0) differs
        defect = hand_text(tiny_vit, CLASSES_A, contexts, start_block=0)
        assert (got - defect).abs().max() > 1e-3
        torch.testing.assert_close(
            lrn.reference_text(contexts[0], deep=list(contexts[1:])), got, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("d_ctx", [1, 2])
def test_reference_logits_equal_forward(tiny_vit, d_ctx):
    lrn = learner(tiny_vit, d_ctx=d_ctx).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    from fedclip.batch import Batch

    with torch.no_grad():
        f = tiny_vit.encode_image(images)
        batch = Batch(labels=torch.zeros(2, dtype=torch.long), index=torch.arange(2), features=f)
        torch.testing.assert_close(lrn.reference_logits(images), lrn(batch), atol=1e-4, rtol=0)


def test_generator_stays_float32_under_autocast_and_everything_is_shared(tiny_vit):
    lrn = learner(tiny_vit)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lrn.generate().dtype == torch.float32
        lrn.text_features().float().sum().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in lrn.parameters())
    assert set(lrn.shared_keys()) == set(lrn.state_dict()) == {n for n, _ in lrn.named_parameters()}
    assert lrn.personal_keys() == []


def test_bad_arguments_are_refused_in_one_line(tiny_vit):
    for kw in ({"d_ctx": 0}, {"depth": -1}):
        with pytest.raises(ConfigError, match="learner.init_args"):
            GeneratedPrompt(**kw)
    for kw in ({"heads": 3}, {"d_ctx": 99}):
        with pytest.raises(ConfigError, match="learner.init_args") as e:
            GeneratedPrompt(**kw).setup(tiny_vit, CLASSES_A, 0)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="GeneratedPrompt"):
        GeneratedPrompt().set_task(multilabel=True)
