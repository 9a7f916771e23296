"""FedMVP: attributes, the PromptFormer, prompt injection, the losses, the LoRA phase and the
base-to-novel protocol."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from fedclip.backbone import BackboneError
from fedclip.data import IID, Pathological, Shapes
from fedclip.data.attributes import attribute_sentences, load_attributes
from fedclip.errors import ConfigError, DataError
from fedclip.federation import Federation
from fedclip.learners import Batch, FedMVP, PromptFormer, ZeroShot
from fedclip.metrics import base_to_novel_metrics, harmonic_mean

from .conftest import fit_shipped_config_offline, small_config, write_cifar100_full

NAMES = ["red circle", "green square", "blue triangle"]


# ---- attributes --------------------------------------------------------------------------
def test_attribute_file_format_and_errors(tmp_path):
    path = tmp_path / "attrs.json"
    path.write_text(json.dumps({"Red_Circle": ["a round shape", " "], "green square": ["corners"]}))
    assert load_attributes(str(path), ["red circle", "green_square"]) == [
        ["a round shape"],
        ["corners"],
    ]
    with pytest.raises(DataError, match=r"no attributes for 1 of the 3 classes: 'blue triangle'"):
        load_attributes(str(path), NAMES)
    path.write_text("{not json")
    with pytest.raises(DataError, match="not readable JSON"):
        load_attributes(str(path), NAMES)
    path.write_text(json.dumps({"red circle": "round"}))
    with pytest.raises(DataError, match="list of strings"):
        load_attributes(str(path), ["red circle"])
    with pytest.raises(DataError, match="shipped names: shapes"):
        load_attributes(str(tmp_path / "missing.json"), NAMES)


def test_shipped_shapes_attributes_cover_every_class():
    names = Shapes(num_classes=56).classnames
    attrs = load_attributes("shapes", names)
    assert len(attrs) == 56 and all(len(a) == 10 for a in attrs)


def test_sentences_and_fallback():
    sentences, owner = attribute_sentences(["red_circle", "star"], [["a", "b"], ["c"]])
    assert sentences == [
        "a photo of a red circle, which has a.",
        "a photo of a red circle, which has b.",
        "a photo of a star, which has c.",
    ]
    assert owner == [0, 0, 1]
    sentences, owner = attribute_sentences(
        ["star"], None, fallback=["a {classname}.", "the {classname}"]
    )
    assert sentences == ["a star.", "the star"] and owner == [0, 0]


def test_long_sentences_are_cut_by_tokens_not_characters(tiny_vit, tmp_path, caplog):
    words = " ".join(f"w{i}" for i in range(120))  # far more than 77 tokens
    path = tmp_path / "a.json"
    path.write_text(json.dumps({n: [words] for n in NAMES}))
    mvp = FedMVP(attributes=str(path))
    with caplog.at_level(logging.WARNING):
        mvp.setup(tiny_vit, NAMES, 0)
    assert "exceed the 77-token context" in caplog.text
    tokens = tiny_vit.tokenize([attribute_sentences(NAMES, [[words]] * 3)[0][0]])[0]
    assert tokens.shape[0] == 77 and int(tokens[-1]) == int(tokens.max())  # EOT kept last
    # far more than 77 characters survive: the reference cut the sentence at 77 characters
    kept = tiny_vit.tokenizer.decode(tokens[1:-1].tolist())
    assert len(kept) > 150


def test_no_attribute_file_uses_templates_and_says_so(tiny_vit, caplog):
    mvp = FedMVP(attributes=None, fallback_templates=["a photo of a {classname}."])
    with caplog.at_level(logging.INFO):
        mvp.setup(tiny_vit, NAMES, 0)
    assert "no attribute file" in caplog.text
    feats, average = mvp.attribute_features()
    want = tiny_vit.encode_text([f"a photo of a {n}." for n in NAMES])
    torch.testing.assert_close(feats, want)
    torch.testing.assert_close(average, torch.eye(3))


# ---- the PromptFormer --------------------------------------------------------------------
def test_promptformer_size_at_vit_b16_widths():
    former = PromptFormer(text_dim=512, vision_width=768)
    lora = sum(p.numel() for p in former.lora_parameters())
    total = sum(p.numel() for p in former.parameters())
    base = total - lora
    # proj 512x768+768, two LNs, q/k/v/out 4 x (768^2 + 768), FFN LN + 768x6144+6144 +
    # 3072x768+768
    assert base == 9_845_760
    assert lora == 36_864 == 3 * (768 * 8 + 8 * 768)  # rank-8 pairs on the q, k, v inputs
    assert {tuple(p.shape) for p in former.lora_parameters()} == {(768, 8), (8, 768)}
    assert round(base / lora) == 267  # the paper's "267x fewer parameters"
    out = former(torch.randn(2, 196, 768), torch.randn(100 * 10, 512))
    assert out.shape == (2, 4, 768)


def test_promptformer_pools_to_p_tokens():
    former = PromptFormer(text_dim=16, vision_width=32, heads=4, num_prompts=3, lora_rank=2)
    assert former(torch.randn(5, 10, 32), torch.randn(7, 16)).shape == (5, 3, 32)
    with pytest.raises(ValueError, match="not divisible"):
        PromptFormer(16, 30, heads=4)


def _reference_prompts(former, patches, attrs, lora):
    """The PromptFormer of METHODS.md section 3 written out op by op: the LoRA updates act on
    the inputs of the query (before LN_q), key (before LN_k) and value (no LN) paths."""
    b, n, v = patches.shape
    h, dh = former.heads, v // former.heads
    a = attrs @ former.proj.weight.t() + former.proj.bias  # A' (M, V)

    def path(x, lin):
        if lora:
            x = x + x @ lin.lora_a @ lin.lora_b
        if isinstance(lin.norm, torch.nn.LayerNorm):
            x = F.layer_norm(x, (v,), lin.norm.weight, lin.norm.bias, lin.norm.eps)
        return x @ lin.weight.t() + lin.bias

    q, k, val = path(patches, former.q), path(a, former.k), path(a, former.v)
    heads = []
    for i in range(h):
        cols = slice(i * dh, (i + 1) * dh)
        weights = torch.softmax(q[..., cols] @ k[:, cols].t() / math.sqrt(dh), dim=-1)  # (B, N, M)
        heads.append(weights @ val[:, cols])  # (B, N, dh)
    x = torch.cat(heads, -1) @ former.out.weight.t() + former.out.bias  # (B, N, V)
    norm, up, _, down = former.ffn
    y = F.layer_norm(x, (v,), norm.weight, norm.bias, norm.eps) @ up.weight.t() + up.bias
    y = y[..., : 4 * v] * F.gelu(y[..., 4 * v :])  # GEGLU
    x = x + y @ down.weight.t() + down.bias
    p = former.num_prompts
    return x.view(b, p, n // p, v).mean(2)  # N divisible by P: the mean of each N/P block


def test_lora_forward_matches_the_hand_computation():
    torch.manual_seed(0)
    former = PromptFormer(text_dim=6, vision_width=8, heads=2, num_prompts=2, lora_rank=3).double()
    with torch.no_grad():  # every weight known and non-trivial, the LNs' affine part included
        for p in former.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    patches, attrs = torch.randn(2, 6, 8).double(), torch.randn(5, 6).double()
    for lora in (False, True):
        want = _reference_prompts(former, patches, attrs, lora)
        torch.testing.assert_close(former(patches, attrs, lora=lora), want, rtol=0, atol=1e-12)
    assert not torch.allclose(former(patches, attrs, lora=True), former(patches, attrs))
    # the query update sits before LN_q: E + E I I = 2E normalises to LN(E), so with the
    # key and value updates at zero the prompts do not move (after the LN they would)
    # (A_q B_q keeps the first 3 coordinates, and the patches live there)
    with torch.no_grad():
        eye = torch.eye(8).double()
        former.q.lora_a.copy_(eye[:, :3])  # (V, r)
        former.q.lora_b.copy_(eye[:3])  # (r, V)
        former.k.lora_b.zero_()
        former.v.lora_b.zero_()
    inside = torch.cat([patches[..., :3], torch.zeros(2, 6, 5).double()], -1)  # (B, N, V)
    torch.testing.assert_close(
        former(inside, attrs, lora=True), former(inside, attrs), rtol=0, atol=1e-4
    )


def test_lora_init_option():
    zero = PromptFormer(text_dim=16, vision_width=32, lora_rank=2, lora_init="zero")
    assert all(not p.lora_b.any() and p.lora_a.any() for p in (zero.q, zero.k, zero.v))
    normal = PromptFormer(text_dim=16, vision_width=32, lora_rank=2)  # the default
    b = torch.cat([p.lora_b.flatten() for p in (normal.q, normal.k, normal.v)])
    assert 0.01 < float(b.std()) < 0.03  # N(0, 0.02^2)
    with pytest.raises(ConfigError, match="lora_init"):
        FedMVP(lora_init="kaiming")
    with pytest.raises(ConfigError, match="lora_init"):
        PromptFormer(16, 32, lora_init="uniform")


@pytest.fixture
def mvp(tiny_vit):
    learner = FedMVP(attributes="shapes", random_flip=False)
    learner.setup(tiny_vit, NAMES, seed=0)
    return learner


def _images(n=4) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_prompts_reach_the_encoder_and_get_gradient(mvp, tiny_vit):
    images = _images()
    plain = tiny_vit.encode_image(images)
    prompted = mvp.prompted_features(images)
    assert prompted.shape == plain.shape and not torch.allclose(prompted, plain, atol=1e-3)
    batch = Batch(labels=torch.tensor([0, 1, 2, 0]), index=torch.arange(4), images=images)
    mvp.training_loss(batch).backward()
    grads = {n: p.grad for n, p in mvp.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert not any("lora" in n for n in grads)  # LoRA factors wait for the LoRA phase
    assert all(not p.requires_grad and p.grad is None for p in tiny_vit.model.parameters())


def test_logits_average_cosines_over_each_class_attributes(mvp, tiny_vit):
    images = _images()
    f = mvp.prompted_features(images)
    attrs = load_attributes("shapes", NAMES)
    feats = [
        tiny_vit.encode_text([f"a photo of a {n}, which has {a}." for a in attrs[c]])
        for c, n in enumerate(NAMES)
    ]
    want = torch.stack([tiny_vit.logit_scale * (f @ t.t()).mean(1) for t in feats], dim=1)
    batch = Batch(labels=torch.zeros(4, dtype=torch.long), index=torch.arange(4), images=images)
    torch.testing.assert_close(mvp(batch), want, atol=1e-4, rtol=1e-4)


def test_attribute_features_are_computed_once_per_class_set(mvp, tiny_vit):
    before = tiny_vit.text_sequences_encoded
    batch = Batch(labels=torch.tensor([0, 1, 2, 0]), index=torch.arange(4), images=_images())
    for _ in range(3):
        mvp.training_loss(batch).backward()
    assert tiny_vit.text_sequences_encoded == before  # cached at setup
    mvp.set_classes(["black circle", "red square"])
    assert tiny_vit.text_sequences_encoded == before + 20  # 2 classes x 10 attributes
    mvp(batch)
    mvp.set_classes(NAMES)
    mvp(batch)
    assert tiny_vit.text_sequences_encoded == before + 20


def test_consistency_loss_is_zero_when_features_coincide(mvp):
    images = _images()
    labels = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        f = mvp.prompted_features(images)
        ce = F.cross_entropy(mvp.attribute_scores(f), labels)
    # target of an unflipped input: the frozen feature of its flip, slot 1
    same = Batch(labels, torch.arange(4), images, targets=torch.stack([-f, f], dim=1))
    with torch.no_grad():
        torch.testing.assert_close(mvp.training_loss(same), ce)
        opposite = Batch(labels, torch.arange(4), images, targets=torch.stack([f, -f], dim=1))
        torch.testing.assert_close(mvp.training_loss(opposite), ce + 10.0 * 2.0)


def test_random_flip_uses_the_matching_target(tiny_vit):
    mvp = FedMVP(attributes="shapes", random_flip=True)
    mvp.setup(tiny_vit, NAMES, seed=0)
    images, labels = _images(), torch.tensor([0, 1, 2, 0])
    gen_state = mvp._flip_gen.get_state()
    flip = torch.rand(4, generator=mvp._flip_gen) < 0.5
    assert 0 < int(flip.sum()) < 4  # both cases occur in this draw
    mvp._flip_gen.set_state(gen_state)
    with torch.no_grad():
        seen = torch.where(flip[:, None, None, None], images.flip(-1), images)
        f = mvp.prompted_features(seen)
        ce = F.cross_entropy(mvp.attribute_scores(f), labels)
        # the frozen target of a flipped input is the unflipped image: slot 0
        targets = torch.stack(
            [torch.where(flip[:, None], f, -f), torch.where(flip[:, None], -f, f)], 1
        )
        loss = mvp.training_loss(Batch(labels, torch.arange(4), images, targets=targets))
    torch.testing.assert_close(loss, ce)


def test_lora_switch_changes_what_is_uploaded(mvp):
    full = set(mvp.shared_state())
    assert full and not any("lora" in k for k in full)
    assert not mvp.end_of_round(0.7)  # above sigma 0.5: no switch
    assert mvp.end_of_round(0.3)
    lora = set(mvp.shared_state())
    assert lora == {f"former.{m}.lora_{ab}" for m in "qkv" for ab in "ab"}
    assert not mvp.end_of_round(0.1)  # once only
    trainable = {n for n, p in mvp.named_parameters() if p.requires_grad}
    assert trainable == lora
    # the D -> V projection of the attributes freezes too (the paper; not the public code)
    assert not mvp.former.proj.weight.requires_grad and "former.proj.weight" in full
    # the phase survives a state_dict round trip
    other = FedMVP(attributes="shapes")
    other.setup(mvp.clip, NAMES, seed=1)
    other.load_state_dict(mvp.state_dict())
    assert other.lora_phase and set(other.shared_state()) == lora
    never = FedMVP(attributes="shapes", lora=False)
    never.setup(mvp.clip, NAMES, 0)
    assert not never.end_of_round(0.0)


@pytest.mark.parametrize("init", ["zero", "normal"])
def test_prompts_at_the_lora_switch(tiny_vit, init):
    mvp = FedMVP(attributes="shapes", random_flip=False, lora_init=init)
    mvp.setup(tiny_vit, NAMES, seed=0)
    images = _images()
    with torch.no_grad():
        before = mvp.visual_prompts(images)[1]
        assert mvp.end_of_round(0.1)
        after = mvp.visual_prompts(images)[1]
    change = float((after - before).abs().max() / before.abs().max())
    if init == "zero":  # B = 0: the switch does not move the prompts
        assert torch.equal(after, before)
    else:  # the public code's N(0, 0.02^2) factors move them a little
        assert 0 < change < 0.1
    batch = Batch(labels=torch.tensor([0, 1, 2, 0]), index=torch.arange(4), images=images)
    mvp.training_loss(batch).backward()
    b_grads = [p.lora_b.grad for p in (mvp.former.q, mvp.former.k, mvp.former.v)]
    assert all(g is not None and g.abs().sum() > 0 for g in b_grads)  # the factors train
    assert mvp.former.proj.weight.grad is None


def test_resnet_backbone_is_refused_with_the_model_name(tiny_rn):
    with pytest.raises(
        BackboneError, match="fedclip-tiny-rn.*ModifiedResNet.*only prompt the text"
    ):
        FedMVP().setup(tiny_rn, NAMES, 0)


# ---- in the federation -------------------------------------------------------------------
def _mvp_config(**over):
    cfg = small_config(learner=over.pop("learner", FedMVP(attributes="shapes")), **over)
    cfg.data.dataset = Shapes(num_classes=4, train_per_class=8, test_per_class=4, image_size=64)
    return cfg


def test_federation_traffic_drops_after_the_lora_switch():
    fed = Federation(
        _mvp_config(learner=FedMVP(attributes="shapes", sigma=100.0), rounds=3),
        None,
        show_progress=False,
    )
    hist = fed.fit()
    up = [r["traffic/up_bytes"] for r in hist[1:]]
    down = [r["traffic/down_bytes"] for r in hist[1:]]
    lora_bytes = sum(p.numel() * 4 for p in fed.clients[0].learner.former.lora_parameters())
    assert up[0] > 20 * up[1] and up[1] == up[2] == 2 * lora_bytes  # 23x at tiny widths
    assert down[1] == 0  # round 2: nobody has uploaded LoRA factors yet
    assert down[2] == 2 * lora_bytes
    assert all(c.learner.lora_phase for c in fed.clients)
    assert set(fed.strategy.global_state) >= {"former.q.lora_a", "former.proj.weight"}


def test_flip_targets_are_encoded_once_per_sample(monkeypatch):
    fed = Federation(_mvp_config(rounds=2, local_epochs=2), None, show_progress=False)
    fed.clip.clear_feature_cache()
    calls = []
    visual = fed.clip.model.visual
    original = visual.forward
    monkeypatch.setattr(visual, "forward", lambda x: calls.append(len(x)) or original(x))
    # every optimizer step of the run, whichever optimizer object takes it (SGD keeps no
    # step count of its own)
    steps = []
    hook = register_optimizer_step_post_hook(lambda opt, args, kwargs: steps.append(opt))
    try:
        fed.fit()
    finally:
        hook.remove()
    n_train = sum(len(p) for p in fed.data.train_parts)
    assert sum(calls) == 2 * n_train  # the frozen pass: each image and its flip, once
    # one optimizer step per batch per local epoch, on every client (all sampled)
    batches = [fed.data.steps_per_epoch(k) for k in range(fed.data.num_clients)]
    assert len(steps) == 2 * 2 * sum(batches) and min(batches) >= 2
    assert all(len(c.optimizer_pairs) == 1 for c in fed.clients)
    sched = fed.clients[0].optimizer_pairs[0][1]
    assert sched.last_epoch == 2 * 2 * fed.data.steps_per_epoch(0)


def test_augmentation_computes_targets_per_step():
    fed = Federation(_mvp_config(rounds=1, augment=True), None, show_progress=False)
    assert not fed.data.flip_targets
    hist = fed.fit()
    assert math.isfinite(hist[-1]["train/loss_mean"])


# ---- base-to-novel -----------------------------------------------------------------------
def test_base_to_novel_metrics_hand_computed():
    result = {
        0: {"local": (8, 10), "base": (6, 10), "novel": (3, 10)},
        1: {"local": (3, 5), "base": (9, 10), "novel": (5, 10)},
    }
    m = base_to_novel_metrics(result)
    assert m["eval/local"] == pytest.approx((0.8 + 0.6) / 2)
    assert m["eval/base"] == pytest.approx(15 / 20)
    assert m["eval/novel"] == pytest.approx(8 / 20)
    hm = 3 / (1 / 0.7 + 1 / 0.75 + 1 / 0.4)
    assert m["eval/hm"] == pytest.approx(hm)
    assert m["client/1/acc"] == pytest.approx(0.6) and m["client/0/novel"] == pytest.approx(0.3)
    assert m["eval/acc_weighted"] == pytest.approx(11 / 15)
    assert harmonic_mean([0.5, 0.0]) == 0.0 and math.isnan(harmonic_mean([0.5, float("nan")]))


def test_base_to_novel_split_and_numbers_on_a_tiny_run(tiny_vit):
    cfg = small_config(learner=ZeroShot(), partitioner=Pathological(1), num_clients=2, rounds=1)
    cfg.data.dataset = Shapes(num_classes=5, train_per_class=6, test_per_class=4, image_size=32)
    cfg.data.base_to_novel = True
    fed = Federation(cfg, None, show_progress=False)
    data = fed.data
    assert data.num_base == 3 and fed.classnames == data.all_classnames[:3]
    assert all((data.train_labels[p] < 3).all() for p in data.train_parts)
    assert all((data.test_labels[p] < 3).all() for p in data.test_parts)
    assert (
        sorted(np.concatenate(data.parts["novel"]).tolist())
        == np.flatnonzero(data.test_labels >= 3).tolist()
    )
    metrics = fed.evaluation_metrics(0)

    # by hand: zero-shot features, argmax among each evaluation's candidate classes
    test = data.source.dataset("test", fed.clip.preprocess_val)
    names = data.all_classnames
    text = fed.clip.encode_text([f"a photo of a {n}." for n in names])  # (5, D)

    def correct(indices, classes):
        images = torch.stack([test[i][0] for i in indices])
        pred = (fed.clip.encode_image(images) @ text[classes].t()).argmax(1)
        truth = torch.as_tensor([classes.index(int(data.test_labels[i])) for i in indices])
        return int((pred == truth).sum())

    local = []
    for k in range(2):
        classes = data.local_classes(k)
        local.append(correct(data.test_parts[k], classes) / len(data.test_parts[k]))
    base_total = sum(len(p) for p in data.parts["base"])
    base = sum(correct(p, [0, 1, 2]) for p in data.parts["base"] if len(p)) / base_total
    novel_total = sum(len(p) for p in data.parts["novel"])
    novel = sum(correct(p, [3, 4]) for p in data.parts["novel"] if len(p)) / novel_total
    assert metrics["eval/local"] == pytest.approx(sum(local) / 2)
    assert metrics["eval/base"] == pytest.approx(base)
    assert metrics["eval/novel"] == pytest.approx(novel)
    assert metrics["eval/hm"] == pytest.approx(harmonic_mean([sum(local) / 2, base, novel]))
    assert fed.clients[0].learner.classnames == fed.classnames  # switched back after eval


def test_base_to_novel_trains_textual_prompts(tiny_vit):
    from fedclip.learners import TextualPrompt

    cfg = small_config(learner=TextualPrompt(n_ctx=4), partitioner=IID(), rounds=1)
    cfg.data.base_to_novel = True
    hist = Federation(cfg, None, show_progress=False).fit()
    assert {"eval/local", "eval/base", "eval/novel", "eval/hm"} <= set(hist[-1])
    csc = small_config(learner=TextualPrompt(n_ctx=4, csc=True), rounds=1)
    csc.data.base_to_novel = True
    with pytest.raises(ValueError, match="class-specific contexts"):
        Federation(csc, None, show_progress=False).fit()


def test_fedmvp_cifar100_b2n_config_runs_one_round(tmp_path, skip_md5):
    write_cifar100_full(tmp_path / "data", per_class=(10, 2))
    summary = fit_shipped_config_offline(
        "fedmvp_cifar100_b2n.yaml",
        tmp_path,
        "--data.dataset.init_args.download=false",
        "--federation.eval_at_start=false",
    )
    assert len(summary["clients"]) == 10
    assert all(c["classes"] == 5 and c["train"] == 5 * 8 for c in summary["clients"])
    assert {"eval/local", "eval/base", "eval/novel", "eval/hm"} <= set(summary["eval"])
