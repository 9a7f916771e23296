"""PromptSRC: its losses on fixed features against float64 loops, the zero-shot targets, the
learner's loss assembled by hand, and the data layer giving images with their features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedclip.batch import Batch, Input
from fedclip.errors import ConfigError
from fedclip.learners import SelfRegulatingPrompt
from fedclip.learners.promptsrc import self_regulated_loss, self_regulating_terms
from fedclip.templates import IMAGENET_TEMPLATES


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _hand(logits, labels, f, t, f_zs, t_zs, s, lt, li):
    b, c = logits.shape
    ce = 0.0
    for i in range(b):
        m = max(logits[i])
        lse = m + math.log(sum(math.exp(v - m) for v in logits[i]))
        ce += lse - logits[i][labels[i]]
    ce /= b
    l1_t = sum(abs(t[j][d] - t_zs[j][d]) for j in range(c) for d in range(t.shape[1])) / t.size
    l1_i = sum(abs(f[i][d] - f_zs[i][d]) for i in range(b) for d in range(f.shape[1])) / f.size
    kl = 0.0
    for i in range(b):
        z = [s * sum(f_zs[i][d] * t_zs[j][d] for d in range(f.shape[1])) for j in range(c)]
        mz, ml = max(z), max(logits[i])
        lz = mz + math.log(sum(math.exp(v - mz) for v in z))
        ll = ml + math.log(sum(math.exp(v - ml) for v in logits[i]))
        for j in range(c):
            q = math.exp(z[j] - lz)
            kl += q * ((z[j] - lz) - (logits[i][j] - ll))
    kl /= b * c
    return ce, l1_t, l1_i, kl, ce + lt * l1_t + li * l1_i + kl


def test_losses_on_fixed_features_equal_float64_loops():
    rng = np.random.default_rng(0)
    b, c, d, s = 5, 4, 6, 20.0
    f, t, f_zs, t_zs = _unit(rng, b, d), _unit(rng, c, d), _unit(rng, b, d), _unit(rng, c, d)
    logits = s * f @ t.T
    labels = rng.integers(0, c, size=b)
    ce, l1_t, l1_i, kl, total = _hand(logits, labels, f, t, f_zs, t_zs, s, 25.0, 10.0)
    T = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    terms = self_regulating_terms(T(logits), T(f), T(t), T(f_zs), T(t_zs), s)
    assert float(terms["text"]) == pytest.approx(l1_t, rel=1e-5)
    assert float(terms["image"]) == pytest.approx(l1_i, rel=1e-5)
    assert float(terms["logits"]) == pytest.approx(kl, rel=1e-4, abs=1e-7)
    loss = self_regulated_loss(
        T(logits), torch.tensor(labels), T(f), T(t), T(f_zs), T(t_zs), s, 25.0, 10.0
    )
    assert float(loss) == pytest.approx(total, rel=1e-5)
    # the KL is zero when the prompted logits are the zero-shot ones, positive otherwise
    z = s * f_zs @ t_zs.T
    assert float(self_regulating_terms(T(z), T(f), T(t), T(f_zs), T(t_zs), s)["logits"]) < 1e-6
    assert kl > 0


def test_the_60_templates():
    assert len(IMAGENET_TEMPLATES) == 60 and len(set(IMAGENET_TEMPLATES)) == 60
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert (
        IMAGENET_TEMPLATES[0] == "a photo of a {}." and IMAGENET_TEMPLATES[-1] == "itap of the {}."
    )


def test_options_are_checked():
    with pytest.raises(ConfigError, match="lambda_text"):
        SelfRegulatingPrompt(lambda_text=-1.0)
    with pytest.raises(ConfigError, match="templates"):
        SelfRegulatingPrompt(templates=["no placeholder"])


def _learner(clip, names=("circle", "square", "star"), **kw):
    learner = SelfRegulatingPrompt(text_depth=2, vision_depth=2, **kw)
    learner.setup(clip, list(names), seed=0)
    return learner


def test_zero_shot_text_is_the_normalised_mean_of_the_templates_once_per_class_set(tiny_vit):
    templates = ["a photo of a {}.", "a drawing of the {}.", "itap of a {}."]
    learner = _learner(tiny_vit, templates=templates)
    names = ["circle", "square", "star"]
    raw = np.stack(
        [tiny_vit.encode_text([t.format(n) for n in names], normalize=False).double().numpy()
         for t in templates]
    )  # fmt: skip
    mean = raw.mean(0)
    expected = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
    np.testing.assert_allclose(learner.zero_shot_text().double().numpy(), expected, atol=1e-5)
    before = tiny_vit.text_sequences_encoded
    learner.zero_shot_text()
    learner.set_classes(["moon"])
    learner.zero_shot_text()
    learner.set_classes(names)
    learner.zero_shot_text()
    assert tiny_vit.text_sequences_encoded - before == len(templates)  # "moon" only


def test_training_loss_is_assembled_from_the_prompted_and_frozen_features(tiny_vit):
    learner = _learner(tiny_vit)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 64, 64, generator=gen)
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        f_zs = tiny_vit.encode_image(images)
    with_features = Batch(labels=labels, index=torch.arange(3), images=images, features=f_zs)
    without = Batch(labels=labels, index=torch.arange(3), images=images)
    loss = learner.training_loss(with_features)
    torch.testing.assert_close(learner.training_loss(without), loss)
    with torch.no_grad():
        f = learner.prompted_image_features(images).double().numpy()
        t = learner.prompted_text_features().double().numpy()
        t_zs = learner.zero_shot_text().double().numpy()
    s = float(tiny_vit.logit_scale)
    *_, total = _hand(s * f @ t.T, labels.numpy(), f, t, f_zs.double().numpy(), t_zs, s, 25, 10)
    assert float(loss) == pytest.approx(total, rel=1e-4)
    loss.backward()
    assert all(p.grad is not None for p in learner.parameters())
    assert all(p.grad is None for p in tiny_vit.parameters())
    # the reference way (77-token text, frozen pass recomputed) gives the same loss
    ref = learner.reference_loss(images, with_features)
    assert float(ref) == pytest.approx(float(loss), rel=1e-4)


def test_batches_hold_images_and_their_cached_frozen_features(tiny_vit):
    from fedclip.data import IID, Shapes
    from fedclip.data.federated import DataConfig, FederatedData

    cfg = DataConfig(
        dataset=Shapes(num_classes=3, train_per_class=4, test_per_class=2, image_size=64),
        partitioner=IID(), num_clients=1, batch_size=4,
    )  # fmt: skip
    data = FederatedData(cfg, seed=0)
    data.bind(tiny_vit, SelfRegulatingPrompt.inputs)
    assert SelfRegulatingPrompt.inputs == {Input.IMAGES, Input.FEATURES}
    batch = next(iter(data.batches(0, "train", epoch_seed=1)))
    assert batch.images is not None and batch.features is not None
    with torch.no_grad():
        torch.testing.assert_close(batch.features, tiny_vit.encode_image(batch.images))
