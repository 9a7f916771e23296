"""Dense image tokens (METHODS-ZOO.md section 0, hook H1): `FrozenCLIP.encode_dense` on every
family, its float16 cache, and batches that carry them (`Input.TOKENS`)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedclip.backbone import FAMILIES, BackboneConfig, BackboneError, load_backbone
from fedclip.batch import Input
from fedclip.data import IID, Shapes
from fedclip.data.federated import DataConfig, FederatedData

NO_TOKENS = {"fedclip-tiny-mobileclip-s": "timm FastVit"}
DENSE = [f.tiny for f in FAMILIES if f.tiny not in NO_TOKENS]
# tokens after token 0 at 64 px: 16 patches of 16 px, or the ResNet's 2 x 2 grid
M = {name: 4 if name == "fedclip-tiny-rn" else 16 for name in DENSE}


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=DENSE)
def clip(request):
    return load_backbone(BackboneConfig(model=request.param))


@torch.no_grad()
def test_token_0_is_the_pooled_feature_and_every_token_is_normalised(clip):
    images = _images()
    dense = clip.encode_dense(images)
    assert dense.shape == (3, 1 + M[clip.name], clip.embed_dim)
    torch.testing.assert_close(dense[:, 0], clip.encode_image(images), atol=1e-6, rtol=0)
    torch.testing.assert_close(dense.norm(dim=-1), torch.ones(3, 1 + M[clip.name]))
    assert clip.has_dense_tokens
    # the patch tokens are the image's own (random tiny towers vary little between images)
    other = clip.encode_dense(_images(4)[1:])
    assert (other[:, 1:] - dense[:, 1:]).abs().max() > 1e-5


@torch.no_grad()
def test_vit_patch_tokens_are_open_clips_tokens_projected(tiny_vit):
    # open_clip's output_tokens=True gives the tokens after ln_post, not projected (H1)
    visual = copy.deepcopy(tiny_vit.model.visual)
    visual.output_tokens = True
    images = _images()
    pooled, tokens = visual(images)
    want = F.normalize(torch.cat([pooled.unsqueeze(1), tokens @ visual.proj], dim=1), dim=-1)
    torch.testing.assert_close(tiny_vit.encode_dense(images), want, atol=1e-6, rtol=0)


@torch.no_grad()
def test_resnet_grid_tokens_are_attention_pool_queries(tiny_rn):
    # each grid token, used as the attention pool's only query, gives that token's output
    visual = tiny_rn.model.visual
    images = _images(2)
    dense = tiny_rn.encode_dense(images)
    pool = visual.attnpool
    grid = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
    x = grid.flatten(2).permute(2, 0, 1)  # (hw, B, C)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + pool.positional_embedding[:, None]
    for j in range(x.shape[0]):
        q = pool.q_proj(x[j]).view(2, pool.num_heads, -1)  # (B, h, dh)
        k = pool.k_proj(x).view(x.shape[0], 2, pool.num_heads, -1)  # (L, B, h, dh)
        v = pool.v_proj(x).view(x.shape[0], 2, pool.num_heads, -1)
        att = torch.einsum("bhd,lbhd->bhl", q, k) / q.shape[-1] ** 0.5
        out = torch.einsum("bhl,lbhd->bhd", att.softmax(-1), v).reshape(2, -1)
        want = F.normalize(pool.c_proj(out), dim=-1)
        torch.testing.assert_close(dense[:, j], want, atol=1e-5, rtol=0)


def test_towers_without_tokens_are_refused_in_one_line():
    for name, tower in NO_TOKENS.items():
        clip = load_backbone(BackboneConfig(model=name))
        assert not clip.has_dense_tokens
        with pytest.raises(BackboneError, match=rf"^{name}: its vision tower \({tower}\)") as err:
            clip.encode_dense(_images())
        assert "\n" not in str(err.value) and "dense image tokens" in str(err.value)


# ---- the float16 cache -------------------------------------------------------------------
def test_dense_cache_is_float16_on_the_cpu_and_encodes_each_sample_once(tiny_vit):
    src = Shapes(num_classes=3, train_per_class=4, test_per_class=2, image_size=64)
    ds = src.dataset("train", tiny_vit.preprocess_val)
    tiny_vit.clear_feature_cache()
    before, rng = tiny_vit.images_encoded, torch.get_rng_state()
    a = tiny_vit.cached_dense_features("dense-test", ds, np.array([0, 1, 2, 5]), batch_size=3)
    b = tiny_vit.cached_dense_features("dense-test", ds, np.array([5, 2, 7]))
    assert torch.equal(torch.get_rng_state(), rng)  # filling it draws no global random number
    assert tiny_vit.images_encoded - before == 5
    assert a.dtype == torch.float16 and a.device.type == "cpu"
    assert a.shape == (4, 17, tiny_vit.embed_dim)
    assert a[0].numel() * a.element_size() == 17 * tiny_vit.embed_dim * 2  # bytes per image
    assert torch.equal(a[[3, 2]], b[[0, 1]])
    with torch.no_grad():
        direct = tiny_vit.encode_dense(torch.stack([ds[i][0] for i in (5, 2, 7)]))
    torch.testing.assert_close(b.float(), direct, atol=1e-3, rtol=0)  # float16 rounding
    tiny_vit.clear_feature_cache()
    again = tiny_vit.cached_dense_features("dense-test", ds, np.array([5, 2, 7]))
    assert torch.equal(again, b)  # recomputed after clearing: the same values


def test_dense_cache_of_a_tower_without_tokens_fails_before_loading_images():
    clip = load_backbone(BackboneConfig(model="fedclip-tiny-mobileclip-s"))
    ds = Shapes(num_classes=2, train_per_class=2, image_size=64).dataset("train", None)
    with pytest.raises(BackboneError, match="no dense image tokens"):
        clip.cached_dense_features("no-tokens", ds, np.array([0]))


# ---- batches with TOKENS -----------------------------------------------------------------
def _data(augment: bool = False) -> FederatedData:
    src = Shapes(num_classes=3, train_per_class=4, test_per_class=2, image_size=64)
    cfg = DataConfig(src, IID(), num_clients=2, batch_size=3, eval_batch_size=4, augment=augment)
    return FederatedData(cfg, seed=0)


def test_batches_carry_cached_tokens(tiny_vit):
    data = _data()
    data.bind(tiny_vit, {Input.TOKENS})
    batches = list(data.batches(0, "train", epoch_seed=1))
    assert sum(len(b) for b in batches) == data.num_train(0)
    dense = tiny_vit.cached_dense_features(
        data.source.key("train"), data.train_set, data.train_parts[0]
    )
    ids = list(data.train_parts[0])
    for batch in batches:
        assert batch.images is None and batch.features is None and batch.targets is None
        assert batch.tokens.dtype == torch.float32 and batch.tokens.shape[1:] == (17, 64)
        rows = [ids.index(int(i)) for i in batch.index]
        assert torch.equal(batch.tokens, dense[rows].float())
    # with pooled features too: both from their caches, for the same samples
    data.bind(tiny_vit, {Input.FEATURES, Input.TOKENS})
    (batch, *_) = data.batches(1, "test")
    assert batch.images is None and batch.features.shape == (len(batch), 64)
    torch.testing.assert_close(batch.tokens[:, 0], batch.features, atol=1e-3, rtol=0)


def test_augmented_training_computes_tokens_per_batch(tiny_vit):
    data = _data(augment=True)
    data.bind(tiny_vit, {Input.TOKENS})
    assert not data.use_train_cache and data.use_test_cache
    (batch, *_) = data.batches(0, "train", epoch_seed=0)
    assert batch.images is not None and batch.tokens.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(batch.tokens, tiny_vit.encode_dense(batch.images))
    (test_batch, *_) = data.batches(0, "test")  # test images are not augmented: cached
    assert test_batch.images is None and test_batch.tokens.shape[1:] == (17, 64)


def test_images_with_tokens_keep_the_loader_order(tiny_vit):
    data = _data()
    data.bind(tiny_vit, {Input.IMAGES, Input.TOKENS})
    for batch in data.batches(0, "train", epoch_seed=3):
        with torch.no_grad():
            want = tiny_vit.encode_dense(batch.images)
        torch.testing.assert_close(batch.tokens, want, atol=1e-3, rtol=0)
