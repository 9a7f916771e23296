"""Multi-label recognition: mAP, the losses, and every learner on a multi-label step."""

from __future__ import annotations

import math

import pytest
import torch

from fedclip.batch import Input
from fedclip.errors import ConfigError
from fedclip.learners import Batch, TextualPrompt, ZeroShot
from fedclip.learners.base import MultiLabelConfig, asymmetric_loss
from fedclip.methods import get_method, list_methods
from fedclip.metrics import average_precision, mean_ap, multilabel_metrics

NAMES = ["red circle", "green square", "blue triangle", "yellow star"]


def ap_by_hand(scores: list[float], targets: list[int]) -> float:
    """AP = mean over the positives of the precision at their rank (no ties)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, total = 0, 0.0
    for rank, i in enumerate(order, start=1):
        if targets[i]:
            hits += 1
            total += hits / rank
    return total / hits


def test_average_precision_against_a_hand_computation():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(40, 5, generator=gen)
    targets = (torch.rand(40, 5, generator=gen) < 0.3).long()
    targets[:, 3] = 0  # a label absent from this client
    ap = average_precision(scores, targets)
    for c in range(5):
        if c == 3:
            assert math.isnan(ap[c])  # no positive: no AP (not 0)
        else:
            want = ap_by_hand(scores[:, c].tolist(), targets[:, c].tolist())
            assert ap[c].item() == pytest.approx(want, abs=1e-6)
    present = [c for c in range(5) if c != 3]
    assert mean_ap(ap) == pytest.approx(float(ap[present].mean()))


def test_per_client_and_pooled_map():
    gen = torch.Generator().manual_seed(1)
    a_scores, b_scores = torch.rand(10, 3, generator=gen), torch.rand(6, 3, generator=gen)
    a_t = torch.tensor([[1, 0, 0], [0, 1, 0]] * 5)  # class 2 absent on client 0
    b_t = torch.tensor([[0, 0, 1], [1, 0, 1], [0, 1, 0]] * 2)
    g_scores, g_t = torch.rand(8, 3, generator=gen), torch.tensor([[1, 0, 1], [0, 1, 0]] * 4)
    result = {
        0: {"local": (a_scores, a_t), "global": (g_scores[:5], g_t[:5])},
        1: {"local": (b_scores, b_t), "global": (g_scores[5:], g_t[5:])},
    }
    m = multilabel_metrics(result, ["x", "y", "z"])
    want0 = (
        ap_by_hand(a_scores[:, 0].tolist(), a_t[:, 0].tolist())
        + ap_by_hand(a_scores[:, 1].tolist(), a_t[:, 1].tolist())
    ) / 2
    assert m["client/0/map"] == pytest.approx(want0, abs=1e-6)
    pooled_s, pooled_t = torch.cat([a_scores, b_scores]), torch.cat([a_t, b_t])
    per_class = [ap_by_hand(pooled_s[:, c].tolist(), pooled_t[:, c].tolist()) for c in range(3)]
    assert m["eval/map_pooled"] == pytest.approx(sum(per_class) / 3, abs=1e-6)
    assert m["class/z/ap"] == pytest.approx(per_class[2], abs=1e-6)
    assert m["eval/map_mean"] == pytest.approx((m["client/0/map"] + m["client/1/map"]) / 2)
    # the global part: mAP of the clients' shares pooled (the whole test set), and the HM
    want_global = sum(ap_by_hand(g_scores[:, c].tolist(), g_t[:, c].tolist()) for c in range(3)) / 3
    assert m["eval/global"] == pytest.approx(want_global, abs=1e-6)
    mean = m["eval/map_mean"]
    assert m["eval/dual"] == pytest.approx(2 * mean * want_global / (mean + want_global))


def test_asymmetric_loss():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    targets = torch.tensor([[1.0, 0.0, 0.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    torch.testing.assert_close(asymmetric_loss(logits, targets, 0.0, 0.0, 0.0), bce)
    p = torch.sigmoid(logits)[0]
    p_m = (p - 0.05).clamp(min=0)
    want = -(
        torch.log(p[0]) + p_m[1] ** 4 * torch.log(1 - p_m[1]) + p_m[2] ** 4 * torch.log(1 - p_m[2])
    )
    torch.testing.assert_close(asymmetric_loss(logits, targets, 0.0, 4.0, 0.05), want)


def _batch(clip, images: bool = False) -> Batch:
    gen = torch.Generator().manual_seed(2)
    targets = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1]], dtype=torch.float32)
    if images:
        return Batch(targets, torch.arange(3), images=torch.randn(3, 3, 64, 64, generator=gen))
    f = torch.nn.functional.normalize(torch.randn(3, clip.embed_dim, generator=gen), dim=-1)
    return Batch(targets, torch.arange(3), features=f)


# every registered method's learner (tiny arguments), plus a phrase-initialised context
LEARNERS = {
    **{name: (lambda m=name: get_method(m).build(tiny=True)[0]) for name in list_methods()},
    "textual-phrase": lambda: TextualPrompt(n_ctx=4, ctx_init="a photo of a"),
}


@pytest.mark.parametrize("loss", ["asl", "bce"])
@pytest.mark.parametrize("name", list(LEARNERS))
def test_each_learner_trains_a_multilabel_step(name, loss, tiny_vit):
    learner = LEARNERS[name]()
    if not type(learner).supports_multilabel:  # refused in one line instead
        with pytest.raises(ConfigError, match=type(learner).__name__):
            learner.set_task(True, MultiLabelConfig(loss=loss))
        return
    learner.set_task(True, MultiLabelConfig(loss=loss))
    learner.setup(tiny_vit, NAMES, seed=0)
    learner.receive(learner.example_extras(2))  # e.g. two experts, as after a round
    batch = _batch(tiny_vit, images=Input.IMAGES in type(learner).inputs)
    loss_value = learner.training_loss(batch)
    assert loss_value.dim() == 0 and torch.isfinite(loss_value)
    if not learner.has_trainable():  # zero-shot: scores, nothing to train
        assert learner(batch).shape == (3, 4)
        return
    loss_value.backward()
    trainable = {n for n, p in learner.named_parameters() if p.requires_grad}
    assert all((p.grad is not None) == (n in trainable) for n, p in learner.named_parameters())
    assert all(
        torch.isfinite(p.grad).all() for n, p in learner.named_parameters() if n in trainable
    )
    assert all(p.grad is None for p in tiny_vit.model.parameters())
    if hasattr(learner, "ctx") and learner.shared_keys():  # the negative context travels
        assert set(learner.shared_state()) == {"ctx", "ctx_neg"}
    logits = learner(batch)
    assert logits.shape == (3, 4)


def test_negative_context_starts_from_the_negative_phrase(tiny_vit):
    learner = TextualPrompt(n_ctx=4, ctx_init="a photo of a")
    learner.set_task(True)
    learner.setup(tiny_vit, NAMES, seed=0)
    want = tiny_vit.encode_text([f"a photo without a {n}." for n in NAMES])
    torch.testing.assert_close(learner.negative_text_features(), want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="neg_ctx_init"):
        bad = TextualPrompt(n_ctx=4, ctx_init="a photo of a", neg_ctx_init="no")
        bad.set_task(True)
        bad.setup(tiny_vit, NAMES, 0)


def test_zero_shot_multilabel_logit(tiny_vit):
    zs = ZeroShot()
    zs.set_task(True)
    zs.setup(tiny_vit, NAMES, 0)
    batch = _batch(tiny_vit)
    pos = tiny_vit.encode_text([f"a photo of a {n}." for n in NAMES])
    neg = tiny_vit.encode_text([f"a photo without a {n}." for n in NAMES])
    want = tiny_vit.logit_scale * (batch.features @ pos.t() - batch.features @ neg.t())
    torch.testing.assert_close(zs(batch), want, atol=1e-5, rtol=1e-5)


def test_multilabel_quickstart_improves_map_over_zero_shot(shapes_cache, tmp_path, capsys):
    """The shipped offline multi-label config (shortened): training lifts mAP well above the
    zero-shot start of the same prompts."""
    import csv

    from fedclip.cli import main

    from .conftest import ROOT

    code = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "multilabel_quickstart.yaml"),
            "--federation.rounds=3",
            "--data.dataset.train_images=240",
            "--data.dataset.test_images=120",
            f"--output_dir={tmp_path}",
            "--run_name=ml",
            "--progress=false",
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "ml" / "csv" / "metrics.csv")))
    start, end = float(rows[0]["eval/map_mean"]), float(rows[-1]["eval/map_mean"])
    pooled_start, pooled_end = float(rows[0]["eval/map_pooled"]), float(rows[-1]["eval/map_pooled"])
    assert end > start + 0.1 and pooled_end > pooled_start + 0.1, (start, end)
    assert "class/red circle/ap" in rows[-1]
