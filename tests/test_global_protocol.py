"""The global / personal / dual protocol: `eval/global` is the global part (the server's
aggregate, personal tensors left out) on the whole test set, `eval/dual` the harmonic mean
of the mean personal accuracy and it; and `federation.local_steps`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedclip.batch import Batch
from fedclip.errors import ConfigError
from fedclip.federation import Federation
from fedclip.flower.records import eval_record, put_payload, read_eval, read_payload
from fedclip.learners import TextualPrompt
from fedclip.metrics import accuracy_metrics
from fedclip.strategies import FedAvg, LocalOnly
from fedclip.strategies.base import Payload

from .conftest import small_config


class BiasedPrompt(TextualPrompt):
    """A CoOp context (shared) plus a personal per-class logit bias that only the personal
    model adds: the smallest learner with a global part distinct from its personal one."""

    global_description = "the context alone, without the bias"

    def setup(self, clip, classnames, seed):
        super().setup(clip, classnames, seed)
        self.bias = nn.Parameter(torch.zeros(len(classnames)))

    def forward(self, batch: Batch):
        logits = super().forward(batch)
        return logits if self.using_global else logits + 5.0 * self.bias

    def personal_keys(self):
        return ["bias"]


def test_accuracy_metrics_by_hand():
    result = {
        0: {"local": (3, 4), "global": (1, 5)},
        1: {"local": (1, 2), "global": (4, 5)},
    }
    m = accuracy_metrics(result, {0: 4, 1: 2})
    assert m["eval/acc_mean"] == pytest.approx((0.75 + 0.5) / 2)
    assert m["eval/acc_weighted"] == pytest.approx((0.75 * 4 + 0.5 * 2) / 6)
    assert m["eval/global"] == pytest.approx(5 / 10)  # pooled, not a mean of shares
    mean = 0.625
    assert m["eval/dual"] == pytest.approx(2 * mean * 0.5 / (mean + 0.5))
    assert m["client/0/acc"] == 0.75


def _global_by_hand(fed: Federation) -> float:
    """A fresh learner with the server's aggregate, biases absent, on every test image."""
    runtime = fed.runtime
    learner = runtime.clients[0].learner
    probe = TextualPrompt(n_ctx=4)
    probe.setup(learner.clip, learner.classnames, 0)
    with torch.no_grad():
        probe.ctx.copy_(fed.strategy.global_state["ctx"])
    probe.eval()
    correct = total = 0
    data = runtime.data
    everyone = list(range(data.num_clients))
    for k in everyone:  # the shares cover the test set exactly once
        for batch in data.batches(k, "global"):
            correct += int((probe(batch).argmax(-1) == batch.labels).sum())
            total += len(batch)
    assert total == len(data.test_labels)
    return correct / total


def test_global_is_the_aggregate_without_personal_parts():
    fed = Federation(
        small_config(learner=BiasedPrompt(n_ctx=4), rounds=1), None, show_progress=False
    )
    for client in fed.clients:  # a personal part that ruins the personal model
        with torch.no_grad():
            client.learner.bias.copy_(torch.tensor([9.0, 0.0, 0.0, 0.0]))
    row = fed.fit()[-1]
    assert all(c.learner.bias[0] > 1.0 for c in fed.clients)  # kept, and still ruinous
    data = fed.runtime.data
    class0 = [float((data.test_labels[p] == 0).mean()) for p in data.test_parts]
    assert row["eval/acc_mean"] == pytest.approx(sum(class0) / 2)  # everything called 0
    assert row["eval/global"] == pytest.approx(_global_by_hand(fed))
    mean, glob = row["eval/acc_mean"], row["eval/global"]
    assert row["eval/dual"] == pytest.approx(2 * mean * glob / (mean + glob))
    assert not any(c.learner.using_global for c in fed.clients)


def test_global_pass_restores_the_clients_own_shared_tensors():
    fed = Federation(small_config(rounds=1), None, show_progress=False)
    fed.fit()
    runtime = fed.runtime
    learner = runtime.clients[0].learner
    aggregate = {"ctx": torch.full_like(learner.ctx, 0.25)}
    runtime.take(0, Payload(global_state=aggregate))
    before = learner.ctx.detach().clone()
    with runtime.global_pass(0):
        assert torch.equal(learner.ctx, aggregate["ctx"])
        assert learner.using_global
    assert torch.equal(learner.ctx, before) and not learner.using_global


def test_every_run_logs_global_and_dual_and_the_summary_says_what_it_is(tmp_path):
    fed = Federation(small_config(rounds=1), tmp_path / "run", show_progress=False)
    history = fed.fit()
    assert {"eval/global", "eval/dual"} <= set(history[-1])
    assert history[0]["round"] == 0 and "eval/global" in history[0]
    summary = fed.summary()
    assert summary["global_model"].startswith("the aggregate")
    assert "eval/global" in summary["eval"]
    local = Federation(small_config(rounds=1, strategy=LocalOnly()), None, show_progress=False)
    local.fit()
    assert "each client's own model" in local.summary()["global_model"]


def test_a_shared_model_s_global_accuracy_is_the_whole_test_set():
    """PromptFL: every client holds the aggregate, so the global accuracy is that model on
    all test images, computed here directly."""
    fed = Federation(small_config(rounds=1), None, show_progress=False)
    history = fed.fit()
    assert history[-1]["eval/global"] == pytest.approx(_global_by_hand(fed))


def test_base_to_novel_global_is_base():
    cfg = small_config(rounds=1)
    cfg.data.base_to_novel = True
    fed = Federation(cfg, None, show_progress=False)
    row = fed.fit()[-1]
    assert row["eval/global"] == row["eval/base"]
    local = row["eval/local"]
    assert row["eval/dual"] == pytest.approx(
        2 * local * row["eval/base"] / (local + row["eval/base"])
    )


def test_flower_records_carry_the_aggregate_and_every_part():
    from fedclip.flower._flwr import RecordDict

    content = RecordDict()
    put_payload(
        content, Payload(state={"ctx": torch.ones(2, 3)}, global_state={"ctx": torch.zeros(2, 3)})
    )
    back = read_payload(content)
    assert torch.equal(back.global_state["ctx"], torch.zeros(2, 3))
    result = {"local": (3, 4), "global": (1, 5)}
    assert read_eval(eval_record(result, {}))[0] == result
    ml = {
        "local": (torch.rand(2, 3), torch.ones(2, 3)),
        "global": (torch.rand(1, 3), torch.zeros(1, 3)),
    }
    got = read_eval(eval_record(ml, {"x": 1}))
    assert got[1] == {"x": 1}
    for part in ml:
        for a, b in zip(ml[part], got[0][part], strict=True):
            assert torch.equal(a, b)


class CountingPrompt(TextualPrompt):
    steps = 0

    def training_loss(self, batch):
        type(self).steps += 1
        return super().training_loss(batch)


@pytest.mark.parametrize("steps", [1, 5])
def test_local_steps_takes_exactly_that_many_steps(steps):
    cfg = small_config(learner=CountingPrompt(n_ctx=4), rounds=1)
    cfg.federation.local_steps = steps  # 12 samples per client, batch 8: 2 batches a pass
    CountingPrompt.steps = 0
    fed = Federation(cfg, None, show_progress=False)
    fed.fit()
    assert CountingPrompt.steps == steps * cfg.data.num_clients
    assert fed.summary()["federation"]["local_steps"] == steps


def test_local_steps_must_be_positive():
    from fedclip.federation.settings import check_config

    cfg = small_config()
    cfg.federation.local_steps = 0
    with pytest.raises(ConfigError, match="federation.local_steps"):
        check_config(cfg)


def test_fedavg_strategy_attaches_its_aggregate_to_every_evaluation_payload():
    strategy = FedAvg()
    strategy.global_state = {"ctx": torch.ones(1)}
    payloads = strategy.evaluation_payloads(0, [0, 3])
    assert set(payloads) == {0, 3}
    assert all(torch.equal(p.global_state["ctx"], torch.ones(1)) for p in payloads.values())
