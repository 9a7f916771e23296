"""Visual prompts on every open_clip vision family (issue 10): the staged forward of
`FrozenCLIP.patch_tokens` / `encode_image_tokens` against the towers' own `encode_image`, the
prompts' gradients and pooling, FedMVP on each token tower, and the one-line refusal of the
towers without tokens (ResNet, FastViT)."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from timm.layers import apply_rot_embed_cat

from fedclip.backbone import BackboneConfig, BackboneError, FrozenCLIP, load_backbone
from fedclip.cli import main
from fedclip.data import Shapes
from fedclip.learners import Batch, FedMVP, OptimConfig

# tiny family -> prefix tokens before the patches (class / register tokens)
TOKEN_FAMILIES = {
    "fedclip-tiny-vit": 1,  # open_clip VisionTransformer, class token
    "fedclip-tiny-siglip": 0,  # timm ViT, no class token, MAP head
    "fedclip-tiny-siglip2": 0,
    "fedclip-tiny-eva02": 1,  # timm Eva, rope, class token
    "fedclip-tiny-pecore": 1,  # timm Eva, rope, MAP head over all tokens incl. the class token
    "fedclip-tiny-mobileclip-b": 1,  # timm ViT with a conv stem, no_embed_class
}
NO_TOKENS = {"fedclip-tiny-rn": "ModifiedResNet", "fedclip-tiny-mobileclip-s": "timm FastVit"}
SHAPES = Shapes(num_classes=3, train_per_class=2, test_per_class=1, image_size=64)
P = 3  # visual prompts per image


@pytest.fixture(scope="module", params=list(TOKEN_FAMILIES))
def clip(request) -> FrozenCLIP:
    return load_backbone(BackboneConfig(model=request.param))


@pytest.fixture(scope="module", params=list(NO_TOKENS))
def no_token_clip(request) -> FrozenCLIP:
    return load_backbone(BackboneConfig(model=request.param))


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _prompts(clip: FrozenCLIP, seed: int, n: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, P, clip.vision_width, generator=gen).requires_grad_(True)


# ---- the staged forward ------------------------------------------------------------------
@torch.no_grad()
def test_staged_forward_without_prompts_equals_encode_image(clip):
    images = _images()
    tokens = clip.patch_tokens(images)
    assert tokens.num_prefix == TOKEN_FAMILIES[clip.name]
    assert tokens.patches.shape == (2, 16, clip.vision_width)  # (64 / 16) ** 2 patches
    ours = clip.encode_image_tokens(tokens, None, normalize=False)
    torch.testing.assert_close(ours, clip.model.encode_image(images), atol=1e-6, rtol=0)
    with_empty = clip.encode_image_tokens(tokens, torch.zeros(2, 0, clip.vision_width))
    torch.testing.assert_close(with_empty, clip.encode_image(images), atol=1e-6, rtol=0)


def test_prompts_get_gradients_and_the_backbone_none(clip):
    images = _images()
    prompts = _prompts(clip, 0)
    out = clip.encode_image(images, prompts=prompts)
    assert out.shape == (2, clip.embed_dim)
    out.sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in clip.model.parameters())


@torch.no_grad()
def test_prompts_change_the_pooled_features(clip):
    # prompts reach the pooled tokens only through attention (their outputs are not pooled);
    # on the random tiny EVA/PE trunks the effect is small, so the check is "changes at all"
    images = _images()
    plain = clip.encode_image(images)
    a = clip.encode_image(images, prompts=_prompts(clip, 0))
    b = clip.encode_image(images, prompts=_prompts(clip, 1))
    assert (a - plain).abs().max() > 1e-5 and (a - b).abs().max() > 1e-5


@torch.no_grad()
def test_the_pooling_sees_only_the_towers_own_tokens(clip, monkeypatch):
    # what reaches the pooling (open_clip `_pool`, timm `forward_head`) is the frozen model's
    # sequence: n_prefix + N tokens, the P prompt outputs dropped
    visual = clip.model.visual
    owner, name = (visual, "_pool") if hasattr(visual, "_pool") else (visual.trunk, "forward_head")
    seen = []
    original = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda x: seen.append(x.shape[1]) or original(x))
    clip.encode_image(_images(), prompts=_prompts(clip, 0))
    assert seen == [TOKEN_FAMILIES[clip.name] + 16]


def test_prompt_shape_is_checked(clip):
    tokens = clip.patch_tokens(_images())
    with pytest.raises(ValueError, match="visual prompts must be"):
        clip.encode_image_tokens(tokens, torch.zeros(2, P, clip.vision_width + 1))


def test_identity_rope_rows_leave_tokens_unrotated():
    rope = torch.randn(16, 8)  # (N, 2R): [sin | cos]
    extended = FrozenCLIP._identity_rope(rope, P)
    assert extended.shape == (16 + P, 8) and torch.equal(extended[:16], rope)
    x = torch.randn(2, 2, P, 4)  # (B, heads, P, dh): the table holds [sin | cos], 2 x dh
    for half in (False, True):
        assert torch.equal(apply_rot_embed_cat(x, extended[16:], half=half), x)
    mixed = torch.randn(2, 2, 16, 8)  # per-depth rope: (depth, heads, N, 2R)
    assert FrozenCLIP._identity_rope(mixed, P).shape == (2, 2, 16 + P, 8)


def test_images_encoded_counts_prompted_passes(clip):
    before = clip.images_encoded
    with torch.no_grad():
        clip.encode_image(_images(3), prompts=_prompts(clip, 0, n=3))
        clip.encode_image(_images(3))
    assert clip.images_encoded - before == 6


# ---- towers without tokens ---------------------------------------------------------------
def test_towers_without_tokens_are_refused_in_one_line(no_token_clip):
    clip = no_token_clip
    assert not clip.accepts_visual_prompts
    tower = NO_TOKENS[clip.name]
    pattern = (
        rf"^{clip.name}: its vision tower \({tower}\) has no token sequence, so it cannot "
        r"take visual prompt tokens; learners that only prompt the text work on it$"
    )
    with pytest.raises(BackboneError, match=pattern) as err:
        FedMVP(attributes="shapes").setup(clip, SHAPES.classnames, 0)
    assert "\n" not in str(err.value)
    with pytest.raises(BackboneError, match=pattern):
        clip.encode_image(_images(), prompts=torch.zeros(2, P, 64))
    with pytest.raises(BackboneError, match=pattern):
        _ = clip.vision_width


def test_a_trunk_with_a_forward_of_its_own_is_refused():
    # a subclass may build or run its tokens differently: its stages are not re-run blindly
    siglip = load_backbone(BackboneConfig(model="fedclip-tiny-siglip"))
    model = copy.deepcopy(siglip.model)
    trunk = model.visual.trunk
    trunk.__class__ = type("OwnViT", (type(trunk),), {"forward_features": lambda self, x: x})
    clip = FrozenCLIP(model, siglip.tokenizer, None, None, "own-vit")
    assert siglip.accepts_visual_prompts and not clip.accepts_visual_prompts
    with pytest.raises(BackboneError, match=r"^own-vit: .*\(timm OwnViT\) builds its tokens"):
        clip.check_visual_prompts()


def test_fit_with_fedmvp_on_fastvit_exits_2_with_one_line(tmp_path, capsys):
    config = tmp_path / "mvp.yaml"
    config.write_text(
        json.dumps(
            {
                "backbone": {"model": "fedclip-tiny-mobileclip-s"},
                "learner": {"class_path": "fedclip.learners.FedMVP"},
                "data": {
                    "dataset": {
                        "class_path": "fedclip.data.Shapes",
                        "init_args": {"num_classes": 3, "train_per_class": 2, "image_size": 64},
                    },
                    "partitioner": {"class_path": "fedclip.data.IID"},
                    "num_clients": 1,
                },
                "federation": {"rounds": 1},
                "fabric": {"accelerator": "cpu"},
            }
        )
    )
    code = main(
        ["fit", "--config", str(config), f"--output_dir={tmp_path / 'runs'}", "--progress=false"]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(err) == 1
    assert "fedclip-tiny-mobileclip-s" in err[0] and "FastVit" in err[0]
    assert "only prompt the text" in err[0]


# ---- FedMVP on every token tower -----------------------------------------------------------
def test_one_fedmvp_step_on_each_token_tower(clip):
    names = SHAPES.classnames
    data = SHAPES.dataset("train", clip.preprocess_val)
    images = torch.stack([data[i][0] for i in range(len(data))])  # (6, 3, 64, 64)
    labels = torch.as_tensor([int(data[i][1]) for i in range(len(data))])
    template = "a photo of a {classname}."
    mvp = FedMVP(fallback_templates=[template], random_flip=False, num_prompts=P)
    mvp.setup(clip, names, seed=0)
    # the attributes are plain frozen sentences: nothing in FedMVP assumes CLIP's token layout
    want = clip.encode_text([template.format(classname=n) for n in names])
    torch.testing.assert_close(mvp.attribute_features()[0], want)
    batch = Batch(labels=labels, index=torch.arange(len(labels)), images=images)
    ((opt, _),) = mvp.configure_optimizers(OptimConfig(lr=0.01), steps_per_round=1, rounds=1)
    mvp.training_loss(batch).backward()
    trainable = {n for n, p in mvp.named_parameters() if p.requires_grad}
    assert trainable and not any("lora" in n for n in trainable)  # LoRA waits for its phase
    for n, p in mvp.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    assert all(p.grad is None for p in clip.model.parameters())
    before = {n: p.detach().clone() for n, p in mvp.named_parameters()}
    opt.step()
    changed = {n for n, p in mvp.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


@pytest.mark.parametrize("model", ["fedclip-tiny-siglip", "fedclip-tiny-siglip2"])
def test_cut_attribute_sentences_are_found_with_the_tokenizers_pad(model, tmp_path, caplog):
    # SigLIP's T5 pads with its end token (1), Gemma with 0; CLIP pads with 0
    clip = load_backbone(BackboneConfig(model=model))
    names = SHAPES.classnames
    short, long = tmp_path / "short.json", tmp_path / "long.json"
    short.write_text(json.dumps({n: ["a round shape"] for n in names}))
    long.write_text(json.dumps({n: [" ".join(f"w{i}" for i in range(80))] for n in names}))
    with caplog.at_level(logging.WARNING):
        FedMVP(attributes=str(short)).setup(clip, names, 0)
    assert "exceed" not in caplog.text
    with caplog.at_level(logging.WARNING):
        FedMVP(attributes=str(long)).setup(clip, names, 0)
    assert f"3 attribute sentences exceed the {clip.context_length}-token context" in caplog.text
