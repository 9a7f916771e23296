"""Independent (IVLP) and coupled (MaPLe) vision-language prompts, against hand loops.

The references run open_clip's own modules of a float64 copy of the backbone one block at a
time, replacing the prompt rows by hand; nothing of fedclip's prompted paths is re-used.
"""

from __future__ import annotations

import copy

import numpy as np
import open_clip
import pytest
import torch

from fedclip.backbone import BackboneError
from fedclip.backbone.clip import FrozenCLIP
from fedclip.errors import ConfigError
from fedclip.learners import Batch, CoupledPrompt, VisionLanguagePrompt

NAMES = ["red circle", "blue square", "green triangle"]


def images(n: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def deep_clip(tiny_vit):
    """A 3-block tiny CLIP (random weights), so that two deep layers exist (1 and 2)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CLIP(
            embed_dim=32,
            vision_cfg={"image_size": 32, "layers": 3, "width": 48, "head_width": 24,
                        "patch_size": 16},
            text_cfg={"context_length": 77, "vocab_size": 49408, "width": 40, "heads": 2,
                      "layers": 3},
        )  # fmt: skip
    return FrozenCLIP(model, tiny_vit.tokenizer, None, None, "deep-test-clip")


def double(clip) -> torch.nn.Module:
    return copy.deepcopy(clip.model).double()


def hand_text(model, tokens, ctx, deep, with_position=True) -> np.ndarray:
    """[SOS] ctx ... through the text blocks one by one; before block i >= 1 the context rows
    1 .. n are replaced by deep[i-1]; EOT row, ln_final, projection, normalised."""
    n = ctx.shape[0]
    pos = model.positional_embedding
    x = model.token_embedding(tokens) + pos  # (C, 77, W)
    x[:, 1 : 1 + n] = ctx + (pos[1 : 1 + n] if with_position else 0)
    for i, block in enumerate(model.transformer.resblocks):
        if 1 <= i <= len(deep):
            x[:, 1 : 1 + n] = deep[i - 1]
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)[torch.arange(len(tokens)), tokens.argmax(-1)] @ model.text_projection
    x = x.numpy()
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def hand_image(model, x, prompts, deep, after_norm=False) -> np.ndarray:
    """Patches + CLS + positions, prompts appended (before or after ln_pre), the blocks one by
    one with the last P rows replaced before block i >= 1, ln_post of CLS, projection."""
    v = model.visual
    p = prompts.shape[0]
    x = v.conv1(x).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
    rows = prompts.expand(x.shape[0], -1, -1)
    x = v.ln_pre(torch.cat([x, rows], 1)) if not after_norm else torch.cat([v.ln_pre(x), rows], 1)
    for i, block in enumerate(v.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[:, :-p], deep[i - 1].expand(x.shape[0], -1, -1)], 1)
        x = block(x)
    x = (v.ln_post(x[:, 0]) @ v.proj).numpy()
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


def sentences(clip, phrase="a photo of a"):
    return clip.tokenize([f"{phrase} {n}." for n in NAMES])


def test_unprompted_towers_are_the_plain_towers(tiny_vit):
    """Depth 1, no visual prompts, the context from "a photo" with "of a" fixed: the text is
    "a photo of a {class}." exactly and the image tower is the plain one."""
    learner = VisionLanguagePrompt(n_ctx=2, n_vision=0, text_depth=1)
    learner.setup(tiny_vit, NAMES, seed=0)
    assert dict(learner.named_parameters()).keys() == {"ctx"}
    x = images()
    with torch.no_grad():
        want = tiny_vit.encode_text([f"a photo of a {n}." for n in NAMES])
        torch.testing.assert_close(learner.text_features(), want, atol=2e-6, rtol=0)
        torch.testing.assert_close(
            learner.prompted_image_features(x), tiny_vit.encode_image(x), atol=2e-6, rtol=0
        )


def test_the_fixed_words_stay_in_the_prompt_while_the_context_trains(tiny_vit):
    learner = CoupledPrompt(prompt_depth=2)
    learner.setup(tiny_vit, NAMES, seed=0)
    full = sentences(tiny_vit)
    ids = learner.tokens
    assert learner.ctx_pos.tolist() == [[1, 2]] * 3
    assert torch.equal(ids[:, 3:], full[:, 3 : ids.shape[1]])  # "of a {class}." [EOT]
    torch.testing.assert_close(learner.ctx, tiny_vit.token_embedding(full[0, 1:3]), rtol=0, atol=0)
    opt = torch.optim.SGD(learner.parameters(), lr=1.0)
    batch = Batch(labels=torch.tensor([0, 1, 2]), index=torch.arange(3), images=images(size=64))
    learner.train()
    learner.training_loss(batch).backward()
    opt.step()
    embeds = learner.prompt_embeddings()
    assert not torch.allclose(embeds[:, 1:3], tiny_vit.token_embedding(full[:, 1:3]))
    assert torch.equal(embeds[:, 3:5], tiny_vit.token_embedding(full[:, 3:5]))  # "of a"


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_deep_text_prompts_equal_the_hand_loop(deep_clip, shared_prefix):
    learner = VisionLanguagePrompt(n_ctx=2, text_depth=3, vision_depth=2)
    learner.setup(deep_clip, NAMES, seed=0)
    learner.shared_prefix = shared_prefix
    assert learner.deep_text.shape == (2, 2, 40) and learner.deep_visual.shape == (1, 2, 48)
    want = hand_text(double(deep_clip), sentences(deep_clip), d(learner.ctx), d(learner.deep_text))
    with torch.no_grad():
        got = learner.prompted_text_features().double().numpy()
        ref = learner.reference_text(learner.text_context(), deep=learner.deep_text_prompts())
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ref.double().numpy(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("after_norm", [False, True])
def test_deep_visual_prompts_equal_the_hand_loop(deep_clip, after_norm):
    learner = VisionLanguagePrompt(n_ctx=2, n_vision=3, vision_depth=3, after_norm=after_norm)
    learner.setup(deep_clip, NAMES, seed=0)
    x = images(size=32)
    want = hand_image(double(deep_clip), x.double(), d(learner.visual), d(learner.deep_visual),
                      after_norm)  # fmt: skip
    with torch.no_grad():
        got = learner.prompted_image_features(x).double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_fedtpg_variant_context_is_a_hidden_state_and_prompts_follow_the_norm(deep_clip):
    learner = VisionLanguagePrompt(n_ctx=4, ctx_init=None, variant="fedtpg", text_depth=2)
    learner.setup(deep_clip, NAMES, seed=0)
    assert learner.after_norm
    model, x = double(deep_clip), images(size=32)
    tokens = deep_clip.tokenize([f"X X X X {n}." for n in NAMES])
    want_t = hand_text(model, tokens, d(learner.ctx), d(learner.deep_text), with_position=False)
    want_i = hand_image(model, x.double(), d(learner.visual), d(learner.deep_visual), True)
    with torch.no_grad():
        t, f = learner.text_features(), learner.prompted_image_features(x)
    np.testing.assert_allclose(t.double().numpy(), want_t, atol=1e-5, rtol=0)
    np.testing.assert_allclose(f.double().numpy(), want_i, atol=1e-5, rtol=0)


def test_coupled_prompts_are_linear_maps_of_the_text_prompts(deep_clip):
    learner = CoupledPrompt(n_ctx=2, prompt_depth=3)
    learner.setup(deep_clip, NAMES, seed=0)
    f0, f1 = learner.couplings
    assert torch.equal(f0.weight, f1.weight) and torch.equal(f0.bias, f1.bias)  # copies
    assert not torch.equal(learner.proj0.weight[:, :40], f0.weight[:, :40])
    p = [learner.proj0, *learner.couplings]
    w = [d(m.weight).numpy() for m in p]
    b = [d(m.bias).numpy() for m in p]
    ctx, deep = d(learner.ctx).numpy(), d(learner.deep_text).numpy()
    vis = ctx @ w[0].T + b[0]
    deep_vis = [deep[j] @ w[j + 1].T + b[j + 1] for j in range(2)]
    x = images(size=32)
    want = hand_image(double(deep_clip), x.double(), torch.from_numpy(vis),
                      [torch.from_numpy(v) for v in deep_vis])  # fmt: skip
    with torch.no_grad():
        got = learner.prompted_image_features(x).double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # 2 x 40 ctx, 2 x 2 x 40 deep text, three 40 -> 48 linears with bias
    assert sum(t.numel() for t in learner.parameters()) == 80 + 160 + 3 * (40 * 48 + 48)
    assert set(learner.shared_keys()) == {n for n, _ in learner.named_parameters()}


def test_forward_equals_the_reference_path_and_seeds_agree(deep_clip):
    for cls, kw in ((VisionLanguagePrompt, {"text_depth": 3}), (CoupledPrompt, {})):
        a, b = cls(**kw), cls(**kw)
        a.setup(deep_clip, NAMES, seed=3)
        b.setup(deep_clip, NAMES, seed=3)
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
            assert torch.equal(p, q), n
        x = images(size=32)
        batch = Batch(labels=torch.tensor([0, 1, 2]), index=torch.arange(3), images=x)
        with torch.no_grad():
            torch.testing.assert_close(a(batch), a.reference_logits(x), atol=1e-4, rtol=0)


def test_refusals_are_one_line(tiny_vit, tiny_rn):
    with pytest.raises(BackboneError, match="only prompt the text") as err:
        VisionLanguagePrompt().setup(tiny_rn, NAMES, seed=0)
    assert "\n" not in str(err.value)
    cases = [
        (VisionLanguagePrompt(text_depth=3), "learner.init_args.text_depth=3"),
        (VisionLanguagePrompt(vision_depth=5), "learner.init_args.vision_depth=5"),
        (CoupledPrompt(prompt_depth=9), "learner.init_args.prompt_depth=9"),
        (VisionLanguagePrompt(n_ctx=3, ctx_init="a photo"), "2 tokens, fewer than n_ctx=3"),
    ]
    for learner, message in cases:
        with pytest.raises(ConfigError, match=message):
            learner.setup(tiny_vit, NAMES, seed=0)
    with pytest.raises(ConfigError, match="ctx_init: null"):
        VisionLanguagePrompt(variant="fedtpg")
    with pytest.raises(ConfigError, match="does not support multi-label"):
        CoupledPrompt().set_task(multilabel=True)


def test_default_depths_are_capped_at_the_towers(tiny_vit):
    ivlp, maple = VisionLanguagePrompt(), CoupledPrompt()
    ivlp.setup(tiny_vit, NAMES, seed=0)
    maple.setup(tiny_vit, NAMES, seed=0)
    assert ivlp.deep_text.shape[0] == ivlp.deep_visual.shape[0] == 1  # 2 blocks: J = 2
    assert maple.deep_text.shape[0] == len(maple.couplings) == 1
