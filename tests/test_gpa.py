"""Gaussian prompt aggregation: weights and accumulator against hand computations, the global
model untouched by it, its extra evaluation model end to end, its state resumed bitwise."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch

from fedclip.federation import Federation
from fedclip.federation.summary import eval_metrics
from fedclip.strategies import (
    ClientResult,
    FedAvg,
    GaussianPromptAggregation,
    Payload,
    gaussian_weights,
)

from .conftest import small_config


def test_weights_are_the_normalised_gaussian_density():
    r, mu, sigma = 20, 15.0, 1.0
    x = np.arange(1, r + 1, dtype=np.float64)
    pdf = np.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(gaussian_weights(r, mu, sigma), pdf / pdf.sum(), rtol=1e-12)
    s = GaussianPromptAggregation()
    s.set_rounds(40)
    assert s.gaussian() == (30.0, 2.0)  # 0.75 R, max(1, 0.05 R)
    s.set_rounds(8)
    assert s.gaussian() == (6.0, 1.0)


def _results(rng, rnd):
    out = {}
    for k in range(3):
        state = {"a": torch.tensor(rng.normal(size=(2, 3)), dtype=torch.float32),
                 "b": torch.tensor(rng.normal(size=(4,)), dtype=torch.float32)}  # fmt: skip
        out[k] = ClientResult(k, state, num_samples=int(rng.integers(1, 10)))
    return out


def _run(strategy, rounds, seed=0, start=0, rng=None):
    rng = rng or np.random.default_rng(seed)
    seen = []
    for rnd in range(start, rounds):
        results = _results(rng, rnd)
        seen.append(results)
        strategy.aggregate(rnd, results)
    return seen, rng


def _init(strategy, rounds):
    strategy.initialize({"a": torch.zeros(2, 3), "b": torch.zeros(4)}, 3, 0)
    strategy.set_rounds(rounds)
    return strategy


def test_accumulator_is_the_weighted_sum_of_the_fedavg_results_and_training_is_untouched():
    rounds = 6
    gpa, plain = (
        _init(GaussianPromptAggregation(mu=3.5, sigma=1.5), rounds),
        _init(FedAvg(), rounds),
    )
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    w = np.exp(-0.5 * ((np.arange(1, rounds + 1) - 3.5) / 1.5) ** 2)
    w = w / w.sum()
    acc = {"a": np.zeros((2, 3)), "b": np.zeros(4)}
    for rnd in range(rounds):
        results = _results(rng_a, rnd)
        gpa.aggregate(rnd, results)
        plain.aggregate(rnd, _results(rng_b, rnd))
        # the global model and what clients download are the plain FedAvg's, bitwise
        for key in ("a", "b"):
            assert torch.equal(gpa.global_state[key], plain.global_state[key])
        down = gpa.configure_round(rnd + 1, [0, 1])[0].state
        assert all(torch.equal(down[k], plain.global_state[k]) for k in down)
        # by hand: weighted mean of the uploads, then the Gaussian-weighted running sum
        n = np.array([results[k].num_samples for k in range(3)], dtype=np.float64)
        for key in acc:
            avg = sum(n[k] * results[k].state[key].double().numpy() for k in range(3)) / n.sum()
            # the round's global model is float32 (as the uploads): that is what is summed
            acc[key] = acc[key] + w[rnd] * avg.astype(np.float32).astype(np.float64)
        model = gpa.evaluation_models()["gpa"]
        for key in acc:
            expected = acc[key] / w[: rnd + 1].sum()
            np.testing.assert_allclose(model[key].numpy(), expected, rtol=1e-6, atol=1e-7)
            assert model[key].dtype == torch.float32
    # after the last round: PromptSRC's GPA model, the sum itself (weights sum to 1)
    for key in acc:
        np.testing.assert_allclose(gpa.gpa_sum[key].numpy(), acc[key], rtol=1e-12, atol=1e-15)
    assert plain.evaluation_models() == {}


def test_payloads_carry_the_extra_model_and_flower_records_too():
    gpa = _init(GaussianPromptAggregation(), 4)
    assert gpa.evaluation_payloads(0, [0])[0].models == {}  # nothing before an aggregation
    _run(gpa, 2)
    payload = gpa.evaluation_payloads(1, [0, 1])[1]
    assert set(payload.models) == {"gpa"}
    pytest.importorskip("flwr")
    from fedclip.flower._flwr import RecordDict
    from fedclip.flower.records import put_payload, read_payload

    content = RecordDict()
    put_payload(content, payload)
    back = read_payload(content)
    assert set(back.models) == {"gpa"}
    assert all(torch.equal(back.models["gpa"][k], payload.models["gpa"][k]) for k in ("a", "b"))
    assert read_payload_without_models_is_empty(put_payload, read_payload, RecordDict)


def read_payload_without_models_is_empty(put, read, record_dict) -> bool:
    content = record_dict()
    put(content, Payload(state={"a": torch.zeros(1)}))
    return read(content).models == {}


def test_state_resumes_bitwise():
    rounds = 7
    full = _init(GaussianPromptAggregation(), rounds)
    seen, _ = _run(full, rounds, seed=3)
    half = _init(GaussianPromptAggregation(), rounds)
    rng = np.random.default_rng(3)
    for rnd in range(3):
        half.aggregate(rnd, _results(rng, rnd))
    buf = io.BytesIO()
    torch.save(half.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    resumed = _init(GaussianPromptAggregation(), rounds)
    resumed.check_state(state)
    resumed.load_state_dict(state)
    for rnd in range(3, rounds):
        resumed.aggregate(rnd, _results(rng, rnd))
    for key in ("a", "b"):
        assert torch.equal(resumed.gpa_sum[key], full.gpa_sum[key])
        assert torch.equal(resumed.global_state[key], full.global_state[key])
    assert resumed.gpa_weight == full.gpa_weight and resumed.gpa_rounds == rounds
    bad = copy.deepcopy(state)
    bad["gpa_sum"]["a"] = bad["gpa_sum"]["a"].float()
    with pytest.raises(ValueError, match="gpa_sum.a"):
        resumed.check_state(bad)


def test_extra_model_metrics_by_hand():
    result = {
        0: {"local": (3, 4), "global": (5, 10), "global_gpa": (7, 10)},
        1: {"local": (1, 4), "global": (2, 5), "global_gpa": (4, 5)},
    }
    m = eval_metrics(result, False, False, {0: 4, 1: 4}, ["a"])
    assert m["eval/global"] == pytest.approx(7 / 15)
    assert m["eval/global_gpa"] == pytest.approx(11 / 15)
    assert "client/0/global_gpa" not in m
    b2n = {
        0: {"local": (3, 4), "base": (5, 10), "novel": (1, 10), "base_gpa": (6, 10),
            "novel_gpa": (2, 10)},
        1: {"local": (1, 4), "base": (2, 5), "novel": (1, 5), "base_gpa": (3, 5),
            "novel_gpa": (4, 5)},
    }  # fmt: skip
    m = eval_metrics(b2n, False, True, {0: 4, 1: 4}, ["a"])
    local, base, novel = 0.5, 9 / 15, 6 / 15
    assert m["eval/global_gpa"] == pytest.approx(base)
    assert m["eval/novel_gpa"] == pytest.approx(novel)
    assert m["eval/hm_gpa"] == pytest.approx(3 / (1 / local + 1 / base + 1 / novel))
    assert m["eval/hm"] == pytest.approx(3 / (1 / local + 1 / (7 / 15) + 1 / (2 / 15)))


@pytest.mark.slow  # two small fits
def test_the_gpa_model_is_evaluated_and_training_equals_plain_fedavg():
    plain = Federation(small_config(rounds=3), None, show_progress=False)
    plain.fit()
    fed = Federation(
        small_config(rounds=3, strategy=GaussianPromptAggregation()), None, show_progress=False
    )
    history = fed.fit()
    for key, value in plain.strategy.global_state.items():
        assert torch.equal(fed.strategy.global_state[key], value)
    assert [r["eval/global"] for r in history] == [r["eval/global"] for r in plain.history]
    assert all("eval/global_gpa" in r for r in history if r["round"] >= 1)
    # after round 1 the GPA model is that round's global model
    first = next(r for r in history if r["round"] == 1)
    assert first["eval/global_gpa"] == first["eval/global"]
    assert math.isfinite(fed.summary()["eval"]["eval/global_gpa"])  # summary.json's
