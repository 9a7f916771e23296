"""The backbone hooks of the vision-prompting and deep-prompt learners, on every family
that has the towers for them: visual prompt tokens (before or after the pre-norm, shallow
and deep), deep text prompts (batched and through the shared prefix) and per-image
contexts. The references are the towers' own forwards with open_clip's or timm's blocks
intercepted by forward hooks, not fedclip's staged loops."""

from __future__ import annotations

import pytest
import torch

from fedclip.backbone import BackboneConfig, load_backbone
from fedclip.backbone.families import FAMILIES
from fedclip.learners import TextualPrompt

TOKEN_FAMILIES = [
    f for f in FAMILIES if f.tiny not in {"fedclip-tiny-rn", "fedclip-tiny-mobileclip-s"}
]
NAMES = ["red circle", "blue square", "green triangle"]


def _clip(name: str):
    return load_backbone(BackboneConfig(model=name))


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _blocks(clip):
    visual = clip.model.visual
    if hasattr(visual, "trunk"):
        return visual.trunk.blocks
    return visual.transformer.resblocks


def _replace_rows(module, rows: torch.Tensor):
    """A forward pre-hook that replaces the last P rows of the block's input by `rows`."""

    def hook(_module, args, kwargs):
        x = args[0]
        p = rows.shape[-2]
        x = torch.cat([x[:, : x.shape[1] - p], rows.expand(x.shape[0], -1, -1).to(x.dtype)], 1)
        return (x, *args[1:]), kwargs

    return module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", TOKEN_FAMILIES, ids=lambda f: f.tiny)
def test_zero_length_visual_prompts_equal_the_plain_tower(family):
    clip = _clip(family.tiny)
    images = _images()
    plain = clip.encode_image(images)
    empty = torch.zeros(0, clip.vision_width)
    for after_norm in (False, True):
        got = clip.encode_image(images, prompts=empty, after_norm=after_norm)
        torch.testing.assert_close(got, plain, atol=1e-5, rtol=0)
    got = clip.encode_image(images, prompts=empty, deep=[empty] * (clip.vision_layers - 1))
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", TOKEN_FAMILIES, ids=lambda f: f.tiny)
def test_deep_visual_prompts_equal_blocks_with_their_rows_replaced(family):
    clip = _clip(family.tiny)
    images = _images()
    gen = torch.Generator().manual_seed(1)
    v, p = clip.vision_width, 3
    shallow = torch.randn(p, v, generator=gen)
    deep = [torch.randn(p, v, generator=gen) for _ in range(clip.vision_layers - 1)]
    got = clip.encode_image(images, prompts=shallow, deep=deep)
    handles = [_replace_rows(b, d) for b, d in zip(list(_blocks(clip))[1:], deep, strict=True)]
    try:  # the shallow path runs the tower's own block stack; the hooks replace the rows
        want = clip.encode_image(images, prompts=shallow)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - clip.encode_image(images, prompts=shallow)).abs().max() > 1e-4


@pytest.mark.parametrize("family", TOKEN_FAMILIES, ids=lambda f: f.tiny)
def test_per_image_deep_prompts_are_per_image(family):
    clip = _clip(family.tiny)
    images = _images(2)
    gen = torch.Generator().manual_seed(2)
    v, p = clip.vision_width, 2
    shallow = torch.randn(2, p, v, generator=gen)
    deep = [torch.randn(2, p, v, generator=gen)]
    both = clip.encode_image(images, prompts=shallow, deep=deep)
    for i in range(2):
        one = clip.encode_image(images[i : i + 1], prompts=shallow[i], deep=[deep[0][i]])
        torch.testing.assert_close(both[i : i + 1], one, atol=1e-5, rtol=0)


def test_prompts_after_the_pre_norm_are_not_normalised(tiny_vit):
    """after_norm: ln_pre sees the image's tokens only; the prompts join after it."""
    clip = tiny_vit
    images = _images()
    prompts = torch.randn(2, clip.vision_width, generator=torch.Generator().manual_seed(3))
    got = clip.encode_image(images, prompts=prompts, after_norm=True)
    ln_pre = clip.model.visual.ln_pre
    handle = ln_pre.register_forward_hook(
        lambda _m, _a, out: torch.cat([out, prompts.expand(out.shape[0], -1, -1)], 1)
    )
    try:  # the tower's own forward (CLS pooling: the appended rows are not pooled)
        want = torch.nn.functional.normalize(clip.model.visual(images), dim=-1)
    finally:
        handle.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    before = clip.encode_image(images, prompts=prompts)
    assert (got - before).abs().max() > 1e-4


def test_deep_prompts_deeper_than_the_tower_are_refused(tiny_vit):
    v = tiny_vit.vision_width
    too_deep = [torch.zeros(1, v)] * tiny_vit.vision_layers
    with pytest.raises(ValueError, match="deep visual prompt layers"):
        tiny_vit.encode_image(_images(1), prompts=torch.zeros(1, v), deep=too_deep)
    w = tiny_vit.text_width
    with pytest.raises(ValueError, match="deep text prompt layers"):
        learner = _learner(tiny_vit)
        learner.encode_context(learner.ctx, deep=[torch.zeros(4, w)] * tiny_vit.text_layers)


def _learner(clip, shared_prefix: bool = True) -> TextualPrompt:
    learner = TextualPrompt(n_ctx=4)
    learner.setup(clip, NAMES, seed=0)
    learner.shared_prefix = shared_prefix
    return learner


def _text_reference(clip, learner, ctx, deep):
    """77-token prompts through open_clip's own text transformer, with forward pre-hooks
    that write the deep prompts into the context rows before blocks 1 .. J-1."""
    tokens, pos = learner.context_layout(ctx)
    length = clip.tokenize(["x"]).shape[1]
    full = torch.nn.functional.pad(tokens, (0, length - tokens.shape[1]), value=clip.layout.pad)
    embeds = learner.prompt_embeddings(ctx, full)

    def writer(rows):
        def hook(_module, args, kwargs):
            x = args[0].clone()
            x[torch.arange(x.shape[0])[:, None], pos] = rows.to(x.dtype)
            return (x, *args[1:]), kwargs

        return hook

    blocks = list(clip.text.transformer.resblocks)
    handles = [
        b.register_forward_pre_hook(writer(d), with_kwargs=True)
        for b, d in zip(blocks[1:], deep, strict=False)
    ]
    try:
        return clip.encode_prompted_text(embeds, full, truncate=False)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.tiny)
def test_deep_text_prompts_equal_blocks_with_the_context_rows_replaced(family):
    clip = _clip(family.tiny)
    gen = torch.Generator().manual_seed(4)
    deep = [torch.randn(4, clip.text_width, generator=gen) for _ in range(clip.text_layers - 1)]
    fast, batched = _learner(clip, True), _learner(clip, False)
    want = _text_reference(clip, fast, fast.ctx, deep)
    torch.testing.assert_close(fast.encode_context(fast.ctx, deep=deep), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        batched.encode_context(batched.ctx, deep=deep), want, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(fast.reference_text(fast.ctx, deep=deep), want, atol=1e-5, rtol=0)
    assert (want - fast.encode_context(fast.ctx)).abs().max() > 1e-4
    assert fast.uses_shared_prefix() == clip.text.shared_prefix


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.tiny)
def test_per_image_contexts_equal_one_context_at_a_time(family):
    clip = _clip(family.tiny)
    learner = _learner(clip)
    gen = torch.Generator().manual_seed(5)
    ctxs = learner.ctx.detach() + 0.1 * torch.randn(5, 4, clip.text_width, generator=gen)
    want = torch.stack([learner.encode_context(c) for c in ctxs])  # (B, C, D)
    for chunk in (None, 2):
        got = learner.encode_contexts(ctxs, chunk=chunk)
        assert got.shape == (5, len(NAMES), want.shape[-1])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_per_image_contexts_carry_gradients(tiny_vit):
    learner = _learner(tiny_vit)
    ctxs = learner.ctx.detach().unsqueeze(0).repeat(2, 1, 1).requires_grad_(True)
    learner.encode_contexts(ctxs)[1].sum().backward()
    assert ctxs.grad[0].abs().max() == 0 and ctxs.grad[1].abs().max() > 0
