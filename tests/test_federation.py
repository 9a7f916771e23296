"""The round loop: training, caching, partial participation, checkpoints and resume."""

from __future__ import annotations

import math

import pytest
import torch

from fedclip.checkpoint import CheckpointError, load_checkpoint
from fedclip.federation import Federation, tensor_bytes
from fedclip.learners import TextualPrompt, ZeroShot
from fedclip.strategies import FedProx, LocalOnly

from .conftest import small_config


def _states(fed: Federation) -> list[dict[str, torch.Tensor]]:
    return [c.client_state() for c in fed.clients]


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_promptfl_round_trip(tmp_path):
    fed = Federation(small_config(), tmp_path / "run", show_progress=False)
    init = fed.strategy.global_state["ctx"].clone()
    history = fed.fit()
    assert [r["round"] for r in history] == [0.0, 1.0, 2.0]
    assert not torch.equal(fed.strategy.global_state["ctx"], init)
    # FedAvg over the two clients' uploads (same sample counts) is what the server holds
    last = history[-1]
    assert last["traffic/up_bytes"] == 2 * init.numel() * 4
    assert last["traffic/down_bytes"] == 2 * init.numel() * 4
    assert 0.0 <= last["eval/acc_mean"] <= 1.0 and "client/1/acc" in last
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["round"] == 2 and len(ckpt["clients"]) == 2
    # every client has its own optimizer with its own momentum buffers
    opt0, opt1 = (c.optimizer_pairs[0][0] for c in fed.clients)
    assert opt0 is not opt1
    m0 = next(iter(opt0.state.values()))["momentum_buffer"]
    m1 = next(iter(opt1.state.values()))["momentum_buffer"]
    assert not torch.equal(m0, m1)


def test_image_encoder_runs_once_per_sample(tmp_path):
    fed = Federation(small_config(rounds=3, local_epochs=2), None, show_progress=False)
    fed.clip.clear_feature_cache()
    before = fed.clip.images_encoded
    fed.fit()
    n_samples = len(fed.data.train_labels) + sum(len(p) for p in fed.data.test_parts)
    assert fed.clip.images_encoded - before == n_samples


def test_augmentation_disables_the_train_cache():
    fed = Federation(small_config(augment=True, rounds=1), None, show_progress=False)
    assert not fed.data.use_train_cache and fed.data.use_test_cache
    before = fed.clip.images_encoded
    fed.fit()
    # train images are encoded at every step (augmented), test features come from the cache
    assert fed.clip.images_encoded - before >= len(fed.data.train_labels)


def test_partial_participation_samples_seeded_subsets():
    cfg = small_config(num_clients=4, fraction=0.5, rounds=3)
    fed = Federation(cfg, None, show_progress=False)
    hist = fed.fit()
    sampled = [r["traffic/sampled_clients"] for r in hist[1:]]
    assert sampled == [2.0, 2.0, 2.0]
    trained = [{k for k in range(4) if f"client/{k}/train_loss" in r} for r in hist[1:]]
    assert all(len(t) == 2 for t in trained)
    again = Federation(
        small_config(num_clients=4, fraction=0.5, rounds=3), None, show_progress=False
    )
    hist2 = again.fit()
    assert trained == [{k for k in range(4) if f"client/{k}/train_loss" in r} for r in hist2[1:]]


def test_resume_equals_uninterrupted(tmp_path):
    full = Federation(
        small_config(rounds=3, num_clients=3, fraction=0.67), tmp_path / "a", show_progress=False
    )
    full.fit()
    part = Federation(
        small_config(rounds=3, num_clients=3, fraction=0.67), tmp_path / "b", show_progress=False
    )
    part.fit(stop_after=1)
    resumed = Federation(
        small_config(rounds=3, num_clients=3, fraction=0.67), tmp_path / "b", show_progress=False
    )
    resumed.fit(resume=True)
    _assert_same(full.strategy.global_state, resumed.strategy.global_state)
    _assert_same(_states(full), _states(resumed))
    strip = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in full.history]
    strip_r = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in resumed.history]
    _assert_same(strip, strip_r)
    lines = (tmp_path / "b" / "csv" / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 4  # header + rounds 0..3


def test_resume_refuses_other_config(tmp_path):
    fed = Federation(small_config(rounds=1), tmp_path / "r", {"seed": 0}, show_progress=False)
    fed.fit()
    other = Federation(
        small_config(rounds=2, seed=1), tmp_path / "r", {"seed": 1}, show_progress=False
    )
    with pytest.raises(CheckpointError, match="different configuration"):
        other.fit(resume=True)


def test_zero_shot_trains_nothing_and_sends_nothing():
    fed = Federation(small_config(learner=ZeroShot()), None, show_progress=False)
    hist = fed.fit()
    assert all(r["traffic/up_bytes"] == 0 and r["traffic/down_bytes"] == 0 for r in hist[1:])
    assert hist[1]["eval/acc_mean"] == hist[0]["eval/acc_mean"]


def test_local_only_keeps_clients_apart():
    fed = Federation(small_config(strategy=LocalOnly()), None, show_progress=False)
    hist = fed.fit()
    a, b = (c.learner.ctx.detach() for c in fed.clients)
    assert not torch.equal(a, b)
    assert all(r["traffic/up_bytes"] == 0 for r in hist[1:])


def test_fedprox_adds_the_proximal_term():
    fed = Federation(small_config(strategy=FedProx(mu=2.0)), None, show_progress=False)
    fed.fit()
    client = fed.clients[0]
    payload = fed.strategy.configure_round(2, [0])[0]
    client.receive(payload)
    assert len(client.loss_terms) == 1  # the proximal term, applied by the client runtime
    batch = next(fed.data.batches(0, "train"))
    client.train()
    base = client.learner.loss(client(batch), batch)
    with torch.no_grad():
        client.learner.ctx.add_(0.1)
    moved = client.learner.loss(client(batch), batch)
    total = client.training_step(batch, 0)
    expected = moved + 0.5 * 2.0 * (0.1**2) * client.learner.ctx.numel()
    torch.testing.assert_close(total, expected)
    assert torch.isfinite(total) and torch.isfinite(base)


def test_csc_learner_federates():
    fed = Federation(
        small_config(learner=TextualPrompt(n_ctx=2, csc=True)), None, show_progress=False
    )
    fed.fit()
    assert fed.strategy.global_state["ctx"].shape == (4, 2, fed.clip.text_width)


def test_tensor_bytes():
    assert tensor_bytes({"a": torch.zeros(3), "b": [torch.zeros(2, dtype=torch.float16)]}) == 16


def test_bad_federation_values():
    with pytest.raises(ValueError, match="fraction must be in"):
        Federation(small_config(fraction=0.0), None, show_progress=False)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        Federation(small_config(rounds=0), None, show_progress=False)


def test_learning_improves_accuracy_on_its_own_data():
    """A single client trained for several epochs fits better than its start."""
    cfg = small_config(
        num_clients=1, rounds=4, local_epochs=3, lr=0.2, learner=TextualPrompt(n_ctx=4, csc=True)
    )
    fed = Federation(cfg, None, show_progress=False)
    hist = fed.fit()
    losses = [r["train/loss_mean"] for r in hist[1:]]
    assert losses[-1] < losses[0]


def test_wandb_offline_logging(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = small_config(rounds=1)
    cfg.logger.wandb = True
    fed = Federation(cfg, tmp_path / "wb", show_progress=False)
    fed.fit()
    fed.close(0)
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
