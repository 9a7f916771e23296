"""FrozenCLIP and the textual learner against open_clip's own encoders (METHODS.md section 0)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedclip.backbone import BackboneConfig, BackboneError, FrozenCLIP, load_backbone
from fedclip.data import Shapes
from fedclip.learners import TextualPrompt, ZeroShot

NAMES = ["red circle", "blue square", "aquarium_fish", "a rather long and winding class name"]


@pytest.fixture(params=["tiny_vit", "tiny_rn"])
def clip(request) -> FrozenCLIP:
    return request.getfixturevalue(request.param)


def test_backbone_is_frozen_and_shared(tiny_vit):
    assert all(not p.requires_grad for p in tiny_vit.parameters())
    assert load_backbone(BackboneConfig(model="fedclip-tiny-vit")) is tiny_vit
    tiny_vit.train()
    assert not tiny_vit.model.training


def test_phrase_context_equals_encode_text(clip):
    learner = TextualPrompt(ctx_init="a photo of a")
    learner.setup(clip, NAMES, seed=0)
    assert learner.n_ctx == 4
    ours = learner.text_features()
    prompts = [f"a photo of a {n.replace('_', ' ')}." for n in NAMES]
    ref = clip.model.encode_text(clip.tokenize(prompts), normalize=True)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
def test_truncated_equals_full_length(clip, position, csc):
    learner = TextualPrompt(n_ctx=6, csc=csc, class_token_position=position)
    learner.setup(clip, NAMES, seed=1)
    assert learner.tokens.shape[1] < clip.context_length  # truncation happened
    full_tokens = clip.tokenize([f"{' '.join(['X'] * 6)} {n.replace('_', ' ')}." for n in NAMES])
    emb = learner.prompt_embeddings()
    pad = clip.token_embedding(full_tokens)[:, emb.shape[1] :]
    full_emb = torch.cat([emb, pad], dim=1)  # (C, 77, W)
    full_ids = torch.cat([learner.tokens, full_tokens[:, learner.tokens.shape[1] :]], dim=1)
    full = clip.encode_prompted_text(full_emb, full_ids, truncate=False)
    torch.testing.assert_close(learner.text_features(), full, atol=1e-5, rtol=0)


def test_class_position_layout(tiny_vit):
    # "red circle" is two tokens: [SOS] ctx ctx ctx ctx red circle . [EOT] for 'end'
    expected = {"end": [1, 2, 3, 4], "middle": [1, 2, 5, 6], "front": [3, 4, 5, 6]}
    x_id = int(tiny_vit.tokenize(["X"])[0, 1])
    for position, where in expected.items():
        learner = TextualPrompt(n_ctx=4, class_token_position=position)
        learner.setup(tiny_vit, ["red circle"], seed=0)
        ids = learner.tokens[0].tolist()
        assert learner.ctx_pos[0].tolist() == where
        assert [i for i, t in enumerate(ids) if t == x_id] == where
        assert len(ids) == 9  # truncated right after EOT


def test_gradients_reach_only_the_context(tiny_vit):
    learner = TextualPrompt(n_ctx=4)
    learner.setup(tiny_vit, NAMES, seed=0)
    loss = learner.text_features().sum()
    loss.backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_vit.parameters())
    assert set(learner.shared_state()) == {"ctx"}
    assert "model" not in " ".join(learner.state_dict())  # the backbone is not in the learner


def test_random_init_is_seeded(tiny_vit):
    a, b, c = TextualPrompt(n_ctx=4), TextualPrompt(n_ctx=4), TextualPrompt(n_ctx=4)
    a.setup(tiny_vit, NAMES, 0)
    b.setup(tiny_vit, NAMES, 0)
    c.setup(tiny_vit, NAMES, 1)
    assert torch.equal(a.ctx, b.ctx) and not torch.equal(a.ctx, c.ctx)
    assert abs(float(a.ctx.detach().std()) - 0.02) < 0.01


def test_zero_shot_matches_encode_text(tiny_vit):
    zs = ZeroShot(templates=["a photo of a {}."])
    zs.setup(tiny_vit, NAMES, 0)
    ref = tiny_vit.model.encode_text(
        tiny_vit.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES]), normalize=True
    )
    torch.testing.assert_close(zs.text_features(), ref, atol=1e-5, rtol=0)
    assert not zs.has_trainable() and zs.shared_state() == {}


def test_visual_prompts(tiny_vit, tiny_rn):
    images = torch.randn(2, 3, 64, 64)
    plain = tiny_vit.encode_image(images)
    torch.testing.assert_close(plain, tiny_vit.model.encode_image(images, normalize=True))
    prompts = torch.randn(2, 4, tiny_vit.model.visual.conv1.out_channels, requires_grad=True)
    out = tiny_vit.encode_image(images, prompts=prompts)
    assert out.shape == plain.shape and not torch.allclose(out, plain)
    out.sum().backward()
    assert prompts.grad is not None
    with pytest.raises(BackboneError, match="fedclip-tiny-rn.*cannot take visual prompt"):
        tiny_rn.encode_image(images, prompts=torch.zeros(2, 4, 64))


def test_feature_cache_encodes_each_sample_once(tiny_vit):
    src = Shapes(num_classes=3, train_per_class=4, test_per_class=2, image_size=32)
    ds = src.dataset("train", tiny_vit.preprocess_val)
    before = tiny_vit.images_encoded
    a = tiny_vit.cached_image_features("cache-test", ds, np.array([0, 1, 2, 5]))
    b = tiny_vit.cached_image_features("cache-test", ds, np.array([5, 2, 7]))
    assert tiny_vit.images_encoded - before == 5
    torch.testing.assert_close(a[[3, 2]], b[[0, 1]])
    direct = tiny_vit.encode_image(torch.stack([ds[7][0]]))
    torch.testing.assert_close(b[2:], direct, atol=1e-5, rtol=0)


def test_unknown_model_and_tag_errors():
    with pytest.raises(BackboneError, match="unknown open_clip model 'ViT-B-61'.*did you mean"):
        load_backbone(BackboneConfig(model="ViT-B-61"))
    with pytest.raises(BackboneError, match="unknown pretrained tag 'openaii' for ViT-B-16"):
        load_backbone(BackboneConfig(model="ViT-B-16", pretrained="openaii"))
    with pytest.raises(BackboneError, match="neither a known open_clip tag nor an existing file"):
        load_backbone(BackboneConfig(model="ViT-B-16", pretrained="/nowhere/weights.pt"))


def test_local_checkpoint_path(tmp_path, tiny_vit):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_vit.model.state_dict(), path)
    clip = FrozenCLIP.from_config(BackboneConfig(model="fedclip-tiny-vit", pretrained=str(path)))
    for p, q in zip(clip.model.parameters(), tiny_vit.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_download_failure_is_one_clear_line(monkeypatch):
    import open_clip

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': connection refused")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(BackboneError) as err:
        FrozenCLIP.from_config(BackboneConfig(model="ViT-B-16", pretrained="openai"))
    msg = str(err.value)
    assert "\n" not in msg and "backbone.pretrained" in msg and "local path" in msg


def test_shapes_pretraining_tag(tmp_path, monkeypatch):
    from fedclip.backbone import tiny

    monkeypatch.setenv("FEDCLIP_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny, "STEPS", 3)
    path = tiny.shapes_weights("fedclip-tiny-rn")
    assert path == str(tmp_path / "fedclip-tiny-rn-shapes-v1.pt")
    first = torch.load(path, weights_only=True)
    again = tiny.pretrain("fedclip-tiny-rn", steps=3)
    for k in first:  # deterministic in the seed
        torch.testing.assert_close(first[k], again[k])
    clip = FrozenCLIP.from_config(BackboneConfig(model="fedclip-tiny-rn", pretrained="shapes"))
    torch.testing.assert_close(clip.model.state_dict()["logit_scale"], first["logit_scale"])
    with pytest.raises(BackboneError, match="only for fedclip-tiny"):
        tiny.shapes_weights("ViT-B-16")


@pytest.mark.parametrize("model", ["fedclip-tiny-vit", "fedclip-tiny-rn"])
def test_shared_prefix_is_exact(model, tiny_vit, tiny_rn):
    """[SOS] + context encoded once, suffixes attending to it: the same features and
    gradients as the batched (truncated) path."""
    from fedclip.learners import TextualPrompt

    clip = tiny_vit if model.endswith("vit") else tiny_rn
    names = ["red circle", "green square", "blue triangle", "a much longer class name here"]
    learner = TextualPrompt(n_ctx=6)
    learner.setup(clip, names, seed=0)
    assert learner.uses_shared_prefix()
    out = {}
    for fast in (True, False):
        learner.shared_prefix = fast
        learner.ctx.grad = None
        feats = learner.text_features()
        (feats * torch.arange(feats.numel()).view_as(feats)).sum().backward()
        out[fast] = (feats.detach(), learner.ctx.grad.clone())
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-6, rtol=0)
    scale = float(out[False][1].abs().max())  # float32 rounding, relative to the gradient
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-5 * scale, rtol=1e-4)
    for kwargs in ({"csc": True}, {"class_token_position": "middle"}):
        other = TextualPrompt(n_ctx=6, **kwargs)
        other.setup(clip, names, seed=0)
        assert not other.uses_shared_prefix()  # the batched path for those layouts


# ---- the offline registries ----------------------------------------------------------------
def test_the_registries_list_the_tiny_models():
    import open_clip

    from fedclip.backbone import (
        FAMILIES,
        list_offline_models,
        list_offline_weights,
        register_model_configs,
    )

    assert set(list_offline_models()) == {f.tiny for f in FAMILIES}
    assert list_offline_weights()["shapes"] == ("fedclip-tiny-vit", "fedclip-tiny-rn")
    register_model_configs()  # what loading does first
    assert set(list_offline_models()) <= set(open_clip.list_models())
    with pytest.raises(BackboneError, match="pretrained 'shapes' exists only for fedclip-tiny"):
        load_backbone(BackboneConfig(model="ViT-B-16", pretrained="shapes"))


def test_an_offline_model_registered_from_outside_loads(tmp_path, monkeypatch, tiny_vit):
    """What a user does for an architecture of their own: a config file, optionally weights
    and a tokenizer; the loader finds all three by name."""
    import shutil

    from fedclip.backbone import CONFIG_DIR, LayoutTokenizer, registry

    for table in ("_MODELS", "_WEIGHTS", "_TOKENIZERS"):  # leave the registries as they were
        monkeypatch.setattr(registry, table, dict(getattr(registry, table)))
    config = tmp_path / "my-tiny.json"
    shutil.copy(CONFIG_DIR / "fedclip-tiny-vit.json", config)
    weights = tmp_path / "mine.pt"
    torch.save(tiny_vit.model.state_dict(), weights)
    made = []
    registry.register_offline_model("my-tiny", config, setup=lambda: made.append(1))
    registry.register_offline_weights("mine", lambda model, cache: str(weights), ("my-tiny",))
    registry.register_offline_tokenizer("my-tiny", lambda: LayoutTokenizer(77, eos=1, pad=0))
    assert "my-tiny" in registry.list_offline_models()
    clip = FrozenCLIP.from_config(BackboneConfig(model="my-tiny", pretrained="mine"))
    assert made == [1] and clip.layout.bos is None  # its setup ran; its tokenizer is used
    for p, q in zip(clip.model.parameters(), tiny_vit.model.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="names a model config by its file"):
        registry.register_offline_model("other-name", config)


def test_reference_text_is_the_full_length_sentence(tiny_vit):
    """The reference path encodes the whole tokenizer-length sentence: with the context set
    to a phrase's embeddings it equals open_clip's own encoding of the sentence."""
    from fedclip.learners import TextualPrompt

    names = ["red circle", "blue square"]
    learner = TextualPrompt(n_ctx=4, ctx_init="a photo of a")
    learner.setup(tiny_vit, names, 0)
    want = tiny_vit.encode_text([f"a photo of a {n}." for n in names])
    got = learner.reference_text(learner.ctx)
    torch.testing.assert_close(got, want.to(got.dtype), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(learner.text_features(), got, atol=1e-5, rtol=1e-5)
