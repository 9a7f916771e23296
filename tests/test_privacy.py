"""Client-level differential privacy: clipping, noise, seeding, accounting, checkpoints."""

from __future__ import annotations

import io
import math
from typing import ClassVar

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from scipy.optimize import brentq
from scipy.stats import norm

from fedclip.privacy import (
    DifferentialPrivacy,
    PrivacyConfig,
    check_strategy,
    clip_update,
    gaussian_like,
    update_norm,
)
from fedclip.strategies import FedAvg


def _state(seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "ctx": torch.randn(4, 8, generator=g) * scale,
        "vis": torch.randn(3, 5, 7, generator=g) * scale,
    }


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[k].reshape(-1).double() for k in sorted(state)])


def _opacus_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


# ---- clipping -----------------------------------------------------------------------------
def test_clip_bounds_norm_and_keeps_direction() -> None:
    update = _state(0, scale=3.0)
    before = update_norm(update)
    assert before > 1.0
    clipped, norm = clip_update(update, 1.0)
    assert norm == pytest.approx(before)
    assert update_norm(clipped) <= 1.0 + 1e-6
    assert update_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    cos = torch.nn.functional.cosine_similarity(_flat(update), _flat(clipped), dim=0)
    assert float(cos) == pytest.approx(1.0, abs=1e-6)
    assert clipped.keys() == update.keys()


def test_clip_leaves_small_updates_and_zero_untouched() -> None:
    update = _state(1, scale=0.01)
    assert update_norm(update) < 1.0
    clipped, _ = clip_update(update, 1.0)
    for k in update:
        assert torch.equal(clipped[k], update[k])
    zero = {k: torch.zeros_like(v) for k, v in update.items()}
    clipped, norm = clip_update(zero, 1.0)
    assert norm == 0.0
    assert all(torch.equal(clipped[k], zero[k]) for k in zero)


def test_clip_norm_is_joint_over_all_tensors() -> None:
    # each tensor alone has norm 0.8 < 1, together 0.8 * sqrt(2) > 1: must be clipped
    update = {"a": torch.tensor([0.8, 0.0]), "b": torch.tensor([0.0, 0.0, 0.8])}
    assert update_norm(update) == pytest.approx(0.8 * math.sqrt(2))
    clipped, _ = clip_update(update, 1.0)
    assert update_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    assert float(clipped["a"][0]) == pytest.approx(0.8 / (0.8 * math.sqrt(2)), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_clip_keeps_dtype(dtype: torch.dtype) -> None:
    update = {k: (v * 5).to(dtype) for k, v in _state(2).items()}
    clipped, _ = clip_update(update, 0.5)
    assert all(clipped[k].dtype == dtype for k in update)
    assert update_norm(clipped) == pytest.approx(0.5, rel=1e-2)


def test_non_finite_update_is_a_value_error() -> None:
    update = _state(3)
    update["ctx"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        clip_update(update, 1.0)
    dp = DifferentialPrivacy(PrivacyConfig(mode="local"), num_clients=3, seed=0)
    ref = _state(0)
    upload = {k: v.clone() for k, v in ref.items()}
    upload["vis"][0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        dp.privatize_upload(upload, ref, rnd=0, client=0)


# ---- noise --------------------------------------------------------------------------------
def _big(n: int = 200_000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"a": torch.randn(n // 2, generator=g), "b": torch.randn(n // 4, 2, generator=g)}


def test_local_noise_has_std_sigma_c() -> None:
    cfg = PrivacyConfig(mode="local", clip_norm=0.3, noise_multiplier=1.7)
    dp = DifferentialPrivacy(cfg, num_clients=10, seed=0)
    ref = _big()
    out, metrics = dp.privatize_upload({k: v.clone() for k, v in ref.items()}, ref, rnd=0, client=3)
    assert metrics == {"update_norm": 0.0, "clipped": 0.0}
    diff = _flat(out) - _flat(ref)
    assert diff.numel() == 200_000
    assert float(diff.std()) == pytest.approx(1.7 * 0.3, rel=0.02)
    assert abs(float(diff.mean())) < 5 * 1.7 * 0.3 / math.sqrt(diff.numel())
    assert all(out[k].dtype == ref[k].dtype and out[k].shape == ref[k].shape for k in ref)


def test_central_privatize_clips_without_noise() -> None:
    cfg = PrivacyConfig(mode="central", clip_norm=0.5, noise_multiplier=2.0)
    dp = DifferentialPrivacy(cfg, num_clients=10, seed=0)
    ref = _state(0)
    step = _state(1, scale=2.0)
    upload = {k: ref[k] + step[k] for k in ref}
    out, metrics = dp.privatize_upload(upload, {**ref, "extra": torch.ones(3)}, rnd=0, client=1)
    assert out.keys() == upload.keys()
    assert metrics["clipped"] == 1.0
    assert metrics["update_norm"] == pytest.approx(update_norm(step), rel=1e-6)
    sent = {k: out[k] - ref[k] for k in ref}
    assert update_norm(sent) == pytest.approx(0.5, rel=1e-5)  # exactly clipped: no noise
    expected, _ = clip_update(step, 0.5)
    for k in ref:
        torch.testing.assert_close(sent[k], expected[k], rtol=1e-5, atol=1e-6)


def test_noise_aggregate_std_is_sigma_c_over_m() -> None:
    cfg = PrivacyConfig(mode="central", clip_norm=0.2, noise_multiplier=1.5)
    dp = DifferentialPrivacy(cfg, num_clients=10, seed=0)
    mean = _big()
    mean["kept"] = torch.zeros(5)
    out = dp.noise_aggregate(mean, ["a", "b"], num_aggregated=4, rnd=2)
    assert out is not mean
    assert torch.equal(out["kept"], mean["kept"])
    diff = _flat({k: out[k] - mean[k] for k in ("a", "b")})
    assert float(diff.std()) == pytest.approx(1.5 * 0.2 / 4, rel=0.02)
    assert abs(float(diff.mean())) < 5 * 1.5 * 0.2 / 4 / math.sqrt(diff.numel())
    # nothing to add: no uploads, or not central
    assert dp.noise_aggregate(mean, ["a"], 0, 2) is mean
    local = DifferentialPrivacy(PrivacyConfig(mode="local"), num_clients=10, seed=0)
    assert local.noise_aggregate(mean, ["a"], 4, 2) is mean


def test_off_is_identity() -> None:
    dp = DifferentialPrivacy(PrivacyConfig(), num_clients=3, seed=0)
    upload = _state(0)
    assert not dp.enabled
    out, metrics = dp.privatize_upload(upload, {}, rnd=0, client=0)
    assert out is upload and metrics == {}
    assert dp.account(0, [0, 1], 2) == {}


def test_missing_reference_key_is_a_value_error() -> None:
    dp = DifferentialPrivacy(PrivacyConfig(mode="local"), num_clients=3, seed=0)
    upload = _state(0)
    with pytest.raises(ValueError, match="'vis'"):
        dp.privatize_upload(upload, {"ctx": upload["ctx"]}, rnd=0, client=0)


def test_gaussian_like_is_device_independent_and_sorted() -> None:
    state = {"b": torch.zeros(3, dtype=torch.float64), "a": torch.zeros(2, dtype=torch.float16)}
    noise = gaussian_like(state, 2.0, torch.Generator().manual_seed(5))
    assert list(noise) == ["b", "a"]
    assert noise["b"].dtype == torch.float64 and noise["a"].dtype == torch.float16
    draws = torch.randn(5, generator=torch.Generator().manual_seed(5)) * 2.0  # a, then b
    assert torch.equal(noise["a"], draws[:2].half())
    assert torch.equal(noise["b"], draws[2:].double())


# ---- reproducibility ----------------------------------------------------------------------
def _noise(dp: DifferentialPrivacy, rnd: int, client: int) -> torch.Tensor:
    ref = _state(0)
    out, _ = dp.privatize_upload({k: v.clone() for k, v in ref.items()}, ref, rnd, client)
    return _flat(out) - _flat(ref)


def test_noise_is_reproducible_and_distinct() -> None:
    cfg = PrivacyConfig(mode="local")
    a = DifferentialPrivacy(cfg, num_clients=5, seed=11)
    b = DifferentialPrivacy(cfg, num_clients=5, seed=11)
    assert torch.equal(_noise(a, 2, 3), _noise(b, 2, 3))
    assert not torch.equal(_noise(a, 2, 3), _noise(a, 2, 4))
    assert not torch.equal(_noise(a, 2, 3), _noise(a, 3, 3))
    assert not torch.equal(_noise(a, 2, 3), _noise(DifferentialPrivacy(cfg, 5, seed=12), 2, 3))
    central = DifferentialPrivacy(PrivacyConfig(mode="central"), num_clients=5, seed=11)
    mean = _state(0)
    n1 = central.noise_aggregate(mean, list(mean), 3, rnd=1)
    n2 = DifferentialPrivacy(PrivacyConfig(mode="central"), 5, 11).noise_aggregate(
        mean, list(mean), 3, rnd=1
    )
    n3 = central.noise_aggregate(mean, list(mean), 3, rnd=2)
    assert torch.equal(_flat(n1), _flat(n2))
    assert not torch.equal(_flat(n1), _flat(n3))


def test_secure_noise_differs_between_runs() -> None:
    cfg = PrivacyConfig(mode="local", secure_noise=True)
    a = DifferentialPrivacy(cfg, num_clients=5, seed=11)
    b = DifferentialPrivacy(cfg, num_clients=5, seed=11)
    assert not torch.equal(_noise(a, 2, 3), _noise(b, 2, 3))
    assert not torch.equal(_noise(a, 2, 3), _noise(a, 2, 3))


# ---- accounting ---------------------------------------------------------------------------
def _closed_form_epsilon(sigma: float, steps: int, delta: float) -> float:
    """q = 1: RDP of `steps` Gaussian mechanisms is steps * alpha / (2 sigma^2); converted to
    (eps, delta) with Balle et al. 2020, Theorem 21 (Opacus' conversion), minimised over
    Opacus' default orders."""
    alphas = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=np.float64)
    rdp = steps * alphas / (2 * sigma**2)
    eps = rdp - (np.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    return float(eps.min())


def _exact_gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """The exact epsilon of `steps` Gaussian mechanisms of noise multiplier sigma (one
    Gaussian mechanism with mu = sqrt(steps) / sigma; Balle & Wang, ICML 2018, Theorem 8)."""
    mu = math.sqrt(steps) / sigma

    def gap(eps: float) -> float:
        return norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu) - delta

    return brentq(gap, 0.0, 500.0)


def _run_central(sigma: float, num_clients: int, sampled: int, rounds: int, delta: float) -> float:
    cfg = PrivacyConfig(mode="central", noise_multiplier=sigma, delta=delta)
    dp = DifferentialPrivacy(cfg, num_clients=num_clients, seed=0)
    out = {}
    for rnd in range(rounds):
        out = dp.account(rnd, list(range(sampled)), sampled)
    assert out["privacy/delta"] == delta
    assert out["privacy/epsilon"] == dp.epsilon()
    return out["privacy/epsilon"]


@pytest.mark.parametrize(
    ("sigma", "num_clients", "sampled", "rounds", "delta"),
    [(1.0, 100, 10, 100, 1e-5), (1.1, 1000, 10, 50, 1e-5), (0.8, 20, 5, 30, 1e-3)],
)
def test_central_epsilon_matches_opacus(sigma, num_clients, sampled, rounds, delta) -> None:
    eps = _run_central(sigma, num_clients, sampled, rounds, delta)
    assert eps == pytest.approx(
        _opacus_epsilon(sigma, sampled / num_clients, rounds, delta), rel=1e-12
    )
    # subsampling amplifies: less than the same rounds without sampling
    assert eps < _closed_form_epsilon(sigma, rounds, delta)


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 1), (2.0, 10), (4.0, 100)])
def test_full_participation_matches_closed_form(sigma: float, rounds: int) -> None:
    eps = _run_central(sigma, 8, 8, rounds, 1e-5)
    assert eps == pytest.approx(_closed_form_epsilon(sigma, rounds, 1e-5), rel=1e-9)
    # an RDP bound is an upper bound on the exact epsilon, and a close one for Gaussians
    exact = _exact_gaussian_epsilon(sigma, rounds, 1e-5)
    assert exact <= eps <= 1.15 * exact


def test_account_is_idempotent_per_round_and_zero_sigma_is_inf() -> None:
    dp = DifferentialPrivacy(PrivacyConfig(mode="central"), num_clients=10, seed=0)
    assert dp.epsilon() == 0.0
    first = dp.account(0, [0, 1], 2)["privacy/epsilon"]
    assert dp.account(0, [0, 1], 2)["privacy/epsilon"] == first
    assert dp.account(1, [0, 1], 2)["privacy/epsilon"] > first
    assert dp.epsilon() == pytest.approx(_opacus_epsilon(1.0, 0.2, 2, 1e-5))
    for mode in ("central", "local"):
        free = DifferentialPrivacy(PrivacyConfig(mode=mode, noise_multiplier=0.0), 10, seed=0)
        assert free.account(0, [0], 1)["privacy/epsilon"] == math.inf


def test_local_epsilon_is_max_over_clients() -> None:
    sigma, delta = 3.0, 1e-5
    dp = DifferentialPrivacy(PrivacyConfig(mode="local", noise_multiplier=sigma), 4, seed=0)
    schedule = [[0, 1], [1, 2], [1], [0, 1]]  # client 1: 4 rounds, client 0: 2, client 2: 1
    for rnd, participants in enumerate(schedule):
        dp.account(rnd, participants, len(participants))
    accountants = dp.accountants()
    per_client = {k: a.get_epsilon(delta=delta) for k, a in accountants.items()}
    assert sorted(per_client) == [0, 1, 2]
    assert per_client[1] > per_client[0] > per_client[2]
    assert dp.epsilon() == pytest.approx(max(per_client.values()))
    # sensitivity 2C, std sigma C, no sampling: noise multiplier sigma / 2 at rate 1
    assert dp.epsilon() == pytest.approx(_opacus_epsilon(sigma / 2, 1.0, 4, delta), rel=1e-12)
    assert dp.epsilon() == pytest.approx(_closed_form_epsilon(sigma / 2, 4, delta), rel=1e-9)


def test_state_dict_round_trip() -> None:
    for mode, rounds in (("central", 6), ("local", 6)):
        cfg = PrivacyConfig(mode=mode, noise_multiplier=1.3)
        whole = DifferentialPrivacy(cfg, num_clients=5, seed=0)
        part = DifferentialPrivacy(cfg, num_clients=5, seed=0)
        for rnd in range(rounds):
            sampled = [rnd % 5, (rnd + 2) % 5]
            whole.account(rnd, sampled, 2)
            if rnd < 3:
                part.account(rnd, sampled, 2)
        buf = io.BytesIO()
        torch.save(part.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        resumed = DifferentialPrivacy(cfg, num_clients=5, seed=0)
        resumed.load_state_dict(state)
        assert resumed.epsilon() == part.epsilon() > 0
        resumed.account(2, [0, 1, 2, 3], 4)  # already accounted: ignored
        for rnd in range(3, rounds):
            resumed.account(rnd, [rnd % 5, (rnd + 2) % 5], 2)
        assert resumed.epsilon() == whole.epsilon()
        assert resumed.state_dict() == whole.state_dict()
    with pytest.raises(ValueError, match="privacy.mode"):
        DifferentialPrivacy(PrivacyConfig(mode="local"), 5, 0).load_state_dict(
            DifferentialPrivacy(PrivacyConfig(mode="central"), 5, 0).state_dict()
        )


# ---- configuration ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_norm": 0.0}, "privacy.clip_norm must be > 0, got 0.0"),
        ({"clip_norm": -1.0}, "privacy.clip_norm"),
        ({"noise_multiplier": -0.1}, "privacy.noise_multiplier must be >= 0"),
        ({"delta": 0.0}, "privacy.delta"),
        ({"delta": 1.0}, "privacy.delta"),
        ({"mode": "global"}, "privacy.mode"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrivacyConfig(**kwargs)


def test_config_accepts_valid_values() -> None:
    cfg = PrivacyConfig(mode="central", clip_norm=0.1, noise_multiplier=0.0, delta=1e-6)
    assert cfg.mode == "central"


class _Averaging:
    collects_uploads: ClassVar[bool] = True

    def uniform_mean(self) -> bool:  # the Strategy hook central noise is calibrated to
        return True


class _Forwarding(_Averaging):
    releases_uploads: ClassVar[bool] = True


class _LocalOnly:
    collects_uploads: ClassVar[bool] = False


def test_check_strategy() -> None:
    central, local = PrivacyConfig(mode="central"), PrivacyConfig(mode="local")
    check_strategy(central, _Averaging())
    check_strategy(local, _Forwarding())
    check_strategy(PrivacyConfig(), _Forwarding())
    check_strategy(PrivacyConfig(), _LocalOnly())
    with pytest.raises(ValueError, match="use privacy.mode: local"):
        check_strategy(central, _Forwarding())
    for cfg in (central, local):
        with pytest.raises(ValueError, match="upload nothing"):
            check_strategy(cfg, _LocalOnly())
    with pytest.raises(ValueError, match="needs a uniform mean"):
        check_strategy(central, FedAvg(weighted=True))
    check_strategy(central, FedAvg(weighted=False))
