"""Client-level differential privacy of the uploads (DP-FedAvg, McMahan et al., ICLR 2018).

Each upload is turned into an update against the global state its client downloaded, and the
update (all uploaded tensors together) is clipped to L2 norm `clip_norm` (C). Then either

- 'central': the server averages the clipped updates uniformly and adds Gaussian noise of
  std sigma * C / m to each element of the mean of m uploads (std sigma * C on the sum, whose
  sensitivity to adding or removing one client is C); or
- 'local': every client adds Gaussian noise of std sigma * C to each element of its clipped
  update before uploading, so the server never sees an un-noised update.

The privacy spent is tracked with Opacus' RDP accountant (Mironov, CSF 2017) and reported as
epsilon for the configured delta:

- central: one step of the sampled Gaussian mechanism per round, noise multiplier sigma and
  sampling rate q = sampled clients / all clients. The analysis assumes Poisson sampling of
  clients (the standard approximation for DP-FedAvg; fedclip samples a fixed number of
  clients without replacement) and add/remove-one-client adjacency.
- local: each upload is a Gaussian mechanism with std sigma * C whose L2 sensitivity is 2C
  (replacing a client's data moves its clipped update by up to 2C), with no amplification by
  sampling (the server sees every upload): per client, noise multiplier sigma / 2, rate 1, one
  step per round the client took part in. The reported epsilon is the largest over clients.

Noise comes from a torch CPU generator, in float32, then is cast to each tensor's dtype and
device, so a run's noise does not depend on the device. By default the generator of round r
and client k is seeded from numpy's SeedSequence([seed, r, k + 1, 0x445]) (the server uses 0
in place of k + 1): simulations are reproducible and a resumed run equals an uninterrupted
one. That noise is predictable by anyone who knows the config, which voids the guarantee;
`secure_noise: true` seeds every generator from `secrets.randbits(63)` instead. Even then the
sampler is torch's (Mersenne Twister, floating point), not a cryptographically secure one.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from fedclip.errors import CheckpointError, ConfigError, UploadError

MODES = ("off", "central", "local")
_SERVER = -1  # `client` of the server's noise
_TAG = 0x445  # separates these seeds from the other uses of the run's seed


@dataclass
class PrivacyConfig:
    """Differential privacy of the uploads, at the client level (DP-FedAvg).

    Args:
        mode: 'off'; 'central': clients clip their updates, the server adds Gaussian noise
            to their uniform mean (a trusted server); 'local': every client adds the noise to
            its own clipped update before uploading (the server is not trusted).
        clip_norm: C, the largest L2 norm of one client's update (upload minus the downloaded
            global state, over all uploaded tensors together); larger updates are scaled down.
        noise_multiplier: sigma, the noise std in units of clip_norm (std sigma * C per
            element of each noised update in 'local'; of the sum of updates in 'central').
        delta: the delta for which epsilon is reported.
        secure_noise: seed the noise from the operating system's randomness instead of the
            run's seed (not reproducible). Required for any real deployment: with the
            default, anyone who knows the config can subtract the noise.
    """

    mode: Literal["off", "central", "local"] = "off"
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    secure_noise: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(
                f"privacy.mode must be one of {', '.join(map(repr, MODES))}, got {self.mode!r}"
            )
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ConfigError(f"privacy.clip_norm must be > 0, got {self.clip_norm}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"privacy.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {self.delta}")


def update_norm(update: dict[str, Tensor]) -> float:
    """L2 norm of all tensors of `update` together, computed in float64."""
    total = 0.0
    for v in update.values():
        total += float(torch.sum(v.detach().to("cpu", torch.float64) ** 2))
    return math.sqrt(total)


def clip_update(update: dict[str, Tensor], clip_norm: float) -> tuple[dict[str, Tensor], float]:
    """Scale `update` by min(1, clip_norm / norm) (norm over all tensors together).

    Returns the clipped update (each tensor keeps its dtype and device) and the norm before
    clipping; an update whose norm is at most clip_norm is returned as is (same values).
    Raises ValueError for an update holding NaN or inf (nothing about it may be sent).
    """
    norm = update_norm(update)
    if not math.isfinite(norm):
        raise ValueError("privacy: the update holds NaN or inf and cannot be clipped")
    factor = 1.0 if norm == 0.0 else min(1.0, clip_norm / norm)
    if factor == 1.0:
        return {k: v.clone() for k, v in update.items()}, norm
    out = {k: (v.detach().to(torch.float64) * factor).to(v.dtype) for k, v in update.items()}
    return out, norm


def gaussian_like(
    state: dict[str, Tensor], std: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """N(0, std^2) noise shaped like every tensor of `state`.

    Drawn in float32 on the CPU from `generator`, key after key in sorted order, then cast to
    each tensor's dtype and device: the same generator gives the same noise on any device.
    The result lists the keys in `state`'s order.
    """
    noise = {}
    for k in sorted(state):
        v = state[k]
        z = torch.randn(v.shape, generator=generator, dtype=torch.float32) * std
        noise[k] = z.to(device=v.device, dtype=v.dtype)
    return {k: noise[k] for k in state}


def _seed(seed: int, rnd: int, client: int) -> int:
    words = [seed % 2**64, rnd, client + 1, _TAG]  # SeedSequence needs non-negative ints
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0])


def _new_accountant(history: list[tuple[float, float, int]]):
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return acc


@functools.lru_cache(maxsize=256)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    """RDP of one sampled Gaussian step at Opacus' default orders (cached: the fractional
    orders are slow, and every round asks for epsilon again)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = np.asarray(
        compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    )
    rdp.flags.writeable = False
    return rdp


def _accountant_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """RDPAccountant(history).get_epsilon(delta), the same numbers computed faster."""
    if not history:
        return 0.0
    if any(s == 0 and q > 0 and n > 0 for s, q, n in history):
        return math.inf
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum([_rdp_per_step(float(s), float(q)) * n for s, q, n in history])
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def _step(history: list[tuple[float, float, int]], sigma: float, q: float) -> None:
    """RDPAccountant.step on a plain history list (merges equal consecutive steps)."""
    if history and history[-1][0] == sigma and history[-1][1] == q:
        history[-1] = (sigma, q, history[-1][2] + 1)
    else:
        history.append((sigma, q, 1))


class DifferentialPrivacy:
    """Clipping, noise and accounting of one federation (see the module docstring).

    The accountants' histories are kept as plain lists of (noise multiplier, sampling rate,
    steps), Opacus' RDPAccountant format, so that `state_dict` holds only python numbers.
    """

    def __init__(self, cfg: PrivacyConfig, num_clients: int, seed: int) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.cfg = cfg
        self.num_clients = num_clients
        self.seed = seed
        self.central: list[tuple[float, float, int]] = []
        self.local: dict[int, list[tuple[float, float, int]]] = {}
        self.last_round: int | None = None

    @property
    def enabled(self) -> bool:
        return self.cfg.mode != "off"

    def _generator(self, rnd: int, client: int) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(
            secrets.randbits(63) if self.cfg.secure_noise else _seed(self.seed, rnd, client)
        )
        return g

    def privatize_upload(
        self, upload: dict[str, Tensor], reference: dict[str, Tensor], rnd: int, client: int
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """What client `client` sends in round `rnd` instead of `upload`.

        reference: the global state the client downloaded (it may hold more keys than the
        upload; only the upload's are used). Returns reference + the clipped update (+ noise
        of std sigma * C in 'local'), with the upload's keys, dtypes and devices, and the
        metrics {"update_norm": norm before clipping, "clipped": 1.0 if it was scaled down}.
        An update holding NaN or inf raises ValueError (the client should be left out).
        With mode 'off', the upload itself and no metrics.
        """
        if not self.enabled:
            return upload, {}
        missing = [k for k in upload if k not in reference]
        if missing:
            raise UploadError(
                f"privacy: uploaded tensor {missing[0]!r} is not in the downloaded state, so "
                "its update cannot be clipped"
            )
        ref = {k: reference[k].detach().to("cpu", torch.float64) for k in upload}
        update = {k: upload[k].detach().to("cpu", torch.float64) - ref[k] for k in upload}
        clipped, norm = clip_update(update, self.cfg.clip_norm)
        if self.cfg.mode == "local":
            std = self.cfg.noise_multiplier * self.cfg.clip_norm
            noise = gaussian_like(clipped, std, self._generator(rnd, client))
            clipped = {k: clipped[k] + noise[k] for k in clipped}
        out = {
            k: (ref[k] + clipped[k]).to(device=upload[k].device, dtype=upload[k].dtype)
            for k in upload
        }
        return out, {"update_norm": norm, "clipped": float(norm > self.cfg.clip_norm)}

    def noise_aggregate(
        self, mean: dict[str, Tensor], keys: Iterable[str], num_aggregated: int, rnd: int
    ) -> dict[str, Tensor]:
        """Central mode: `mean` (the uniform mean of `num_aggregated` privatized uploads) with
        N(0, (sigma * C / num_aggregated)^2) added to each element of the tensors in `keys`.
        Other modes, or no upload: `mean` unchanged. Returns a new dict."""
        if self.cfg.mode != "central" or num_aggregated <= 0:
            return mean
        keys = [k for k in keys if k in mean]
        std = self.cfg.noise_multiplier * self.cfg.clip_norm / num_aggregated
        noise = gaussian_like({k: mean[k] for k in keys}, std, self._generator(rnd, _SERVER))
        return {k: mean[k] + noise[k] if k in noise else mean[k] for k in mean}

    def account(self, rnd: int, participants: list[int], num_sampled: int) -> dict[str, float]:
        """Record completed round `rnd` and return the privacy spent so far.

        participants: clients whose uploads were aggregated (local mode: each takes a step).
        num_sampled: clients sampled in the round (central mode: q = num_sampled / clients).
        A round at or before the last recorded one is not counted again.
        """
        if not self.enabled:
            return {}
        if self.last_round is None or rnd > self.last_round:
            sigma = float(self.cfg.noise_multiplier)
            if self.cfg.mode == "central":
                q = num_sampled / self.num_clients
                if not 0 <= q <= 1:
                    raise ValueError(
                        f"privacy: {num_sampled} sampled of {self.num_clients} clients"
                    )
                if q > 0:
                    _step(self.central, sigma, q)
            else:
                for k in sorted(set(participants)):
                    _step(self.local.setdefault(int(k), []), sigma / 2, 1.0)
            self.last_round = rnd
        return {"privacy/epsilon": self.epsilon(), "privacy/delta": float(self.cfg.delta)}

    def epsilon(self) -> float:
        """Epsilon spent so far for the configured delta (local: the largest over clients);
        inf when the noise multiplier is 0, 0 before any round."""
        delta = self.cfg.delta
        if self.cfg.mode == "central":
            return _accountant_epsilon(self.central, delta)
        if self.cfg.mode == "local":
            histories = {tuple(h) for h in self.local.values()}  # clients with equal histories
            return max((_accountant_epsilon(list(h), delta) for h in histories), default=0.0)
        return 0.0

    def accountants(self) -> dict[int, Any]:
        """Opacus RDPAccountants rebuilt from the histories: {-1: central} or {client: ...}."""
        if self.cfg.mode == "central":
            return {_SERVER: _new_accountant(self.central)}
        return {k: _new_accountant(h) for k, h in self.local.items()}

    def state_dict(self) -> dict[str, Any]:
        """Plain python (ints, floats, strs, lists, dicts): loads with weights_only=True."""
        return {
            "mode": self.cfg.mode,
            "last_round": -1 if self.last_round is None else int(self.last_round),
            "central": [[float(s), float(q), int(n)] for s, q, n in self.central],
            "local": {
                str(k): [[float(s), float(q), int(n)] for s, q, n in h]
                for k, h in sorted(self.local.items())
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.cfg.mode:
            raise CheckpointError(
                f"privacy: the checkpoint was written with privacy.mode {state['mode']!r}, "
                f"the config has {self.cfg.mode!r}"
            )
        self.last_round = None if state["last_round"] < 0 else int(state["last_round"])
        self.central = [(float(s), float(q), int(n)) for s, q, n in state["central"]]
        self.local = {
            int(k): [(float(s), float(q), int(n)) for s, q, n in h]
            for k, h in state["local"].items()
        }


def check_strategy(cfg: PrivacyConfig, strategy: Any) -> None:
    """Raise ConfigError when `strategy` (a Strategy or its class) cannot be made private
    with `cfg`: central noise on a server that forwards individual uploads to other clients
    (`releases_uploads`), or any privacy with a strategy that uploads nothing."""
    if cfg.mode == "off":
        return
    cls = strategy if isinstance(strategy, type) else type(strategy)
    if not getattr(cls, "collects_uploads", True):
        raise ConfigError(
            f"privacy.mode {cfg.mode!r} with {cls.__name__}: its clients upload nothing, so "
            "there is nothing to protect; use privacy.mode: off"
        )
    if cfg.mode == "central" and getattr(cls, "releases_uploads", False):
        raise ConfigError(
            f"privacy.mode 'central' does not protect {cls.__name__}: its server sends "
            "individual uploads to other clients before any noise is added; use privacy.mode: local"
        )
    if cfg.mode == "central" and not isinstance(strategy, type) and not strategy.uniform_mean():
        raise ConfigError(
            f"privacy.mode 'central' needs a uniform mean of the clipped updates (its noise is "
            f"calibrated to one client's share); set strategy.init_args.weighted: false for "
            f"{cls.__name__}"
        )
