"""A private personalised prompt: a shared global context plus a local one factorised into a
low-rank part and a residual at every step, the factors trained with local DP-SGD.

DP-FPL (Tran, Sun, Patterson, Milanova, ICLR 2025). The client's context is G + u v + r:
G (n_ctx, W) is the global prompt (uploaded, averaged; its client-level privacy is fedclip's
`privacy:` block), L (n_ctx, W) the local prompt (never leaves the client). At every
forward L is factorised by one power-iteration step from a fresh Gaussian v0 (W, r):
u = orth(L v0) (n_ctx, r), v = orth(L^T u)^T (r, W), with orth the Gram-Schmidt
orthonormalisation of the columns, and r = L - u v a constant. u and v are leaf tensors made
at that forward (not parameters, not in any optimizer); their per-example gradients are
clipped and noised (local DP) and L's gradient is rebuilt from the noisy factor gradients.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedclip.backbone import FrozenCLIP
from fedclip.batch import Batch
from fedclip.errors import ConfigError
from fedclip.learners.textual import TextualPrompt

FACTORIZATIONS = ("lowrank_residual", "lowrank", "full")
NOISES = ("rdp", "reference")
TANGENTS = ("reference", "projection")


def orthonormal_columns(m: Tensor) -> Tensor:
    """Gram-Schmidt on the columns of m (n, k), n >= k: Q with orthonormal columns spanning
    them, Q[:, :j] spanning m[:, :j] and positive diagonal of Q^T m (QR with R's diagonal made
    positive, the same numbers as classical or modified Gram-Schmidt in exact arithmetic)."""
    q, r = torch.linalg.qr(m)
    sign = torch.sign(torch.diagonal(r))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign


def power_factorization(local: Tensor, v0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One power-iteration step of `local` (n, W) from v0 (W, r): (u (n, r), v (r, W),
    residual (n, W)) with u = orth(L v0), v = orth(L^T u)^T and residual = L - u v."""
    u = orthonormal_columns(local @ v0)
    v = orthonormal_columns(local.t() @ u).t()
    return u, v, local - u @ v


def local_gradient(u: Tensor, v: Tensor, g_u: Tensor, g_v: Tensor, tangent: str) -> Tensor:
    """The gradient of L (n, W) rebuilt from the factor gradients g_u (n, r), g_v (r, W):
    g_u v + u g_v +/- u u^T g_u v. 'projection' subtracts the last term (the projection of a
    gradient onto the tangent space of rank-r matrices at u v, for orthonormal u and v);
    'reference' adds it, as the public code does (DP_FPL.py:68-76)."""
    m = g_u @ v + u @ g_v
    last = u @ (u.t() @ (g_u @ v))
    return m + last if tangent == "reference" else m - last


def reference_noise_multiplier(epsilon: float, rounds: int, delta: float) -> float:
    """The public code's noise multiplier sqrt(R ln(1/delta)) / epsilon (DP_FPL.py:253-262):
    a formula for reproducing its tables, not a calibrated DP guarantee."""
    return math.sqrt(rounds * math.log(1 / delta)) / epsilon


class PrivateLowRankPrompt(TextualPrompt):
    """A global context G (`ctx`, shared) plus a local context L (`local_ctx`, personal)
    whose factor gradients get per-example clipping and Gaussian noise (local DP-SGD).

    Trained: G with the ordinary batch gradient (its privacy, if any, is the run's
    `privacy:` block: client-level clipping of G's update and noise on the average; with
    `federation.local_steps: 1` and SGD without momentum that is the public code's lock-step
    averaged gradient); L with the gradient rebuilt from the noisy factor gradients. Each
    example's gradient of the personal factors ((g_u, g_v) jointly, or g_L for 'full') is
    computed by one batched backward (vmap over the cotangents), clipped to L2 norm
    `clip_norm`, averaged over the batch, and N(0, (sigma C / B)^2) noise is added.

    The factor noise is accounted per client with Opacus' RDP accountant: every noisy step is
    a sampled Gaussian mechanism with noise multiplier sigma and rate q = B / N_k (the
    Poisson approximation of shuffled fixed-size batches; N_k is the client's training size,
    or `sampling_rate` when given; q = 1, no amplification, when neither is known), reported
    as `factor_epsilon` at `delta`.

    Args:
        n_ctx: context tokens of G and L (16 in the paper).
        ctx_init: phrase initialising G (L starts from N(0, 0.02^2)); null: both random.
        rank: r, the rank of u v (8 in the paper).
        factorization: 'lowrank_residual' (G + u v + r, the paper's), 'lowrank' (G + u v,
            the residual dropped), 'full' (G + L, no factorisation, noise on g_L).
        clip_norm: C, the per-example L2 bound of the private gradient (10 in the paper).
        noise: 'rdp': noise multiplier `noise_multiplier`; 'reference': the public code's
            sqrt(R ln(1/delta)) / `reference_epsilon` with R = the run's rounds and std
            sigma C / B (for reproducing its tables; not a valid guarantee at that epsilon).
        noise_multiplier: sigma of 'rdp' (0: no noise).
        reference_epsilon: the public code's `--noise` (0: no noise).
        delta: the delta of the reported epsilon and of the reference formula.
        tangent: 'reference' (g_u v + u g_v + u u^T g_u v, the public code) or
            'projection' (the exact tangent-space projection, minus the last term).
        factor_grad_scale: factor on the noisy factor gradients before L's gradient is
            rebuilt (0.1, the public code's division by 10; 1.0 for the plain chain rule).
        sampling_rate: q of the accountant; null: batch size / the client's training size.
        reference_rounds: R of the reference formula; null: the run's `federation.rounds`
            (the public code's R counts epochs of lock-step: with `local_steps: 1`, give its
            round count here).
    """

    supports_multilabel = False  # the paper's objective is single-label CE
    global_description = "the global prompt G alone"

    def __init__(
        self,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        rank: int = 8,
        factorization: Literal["lowrank_residual", "lowrank", "full"] = "lowrank_residual",
        clip_norm: float = 10.0,
        noise: Literal["rdp", "reference"] = "rdp",
        noise_multiplier: float = 0.0,
        reference_epsilon: float = 0.0,
        delta: float = 1e-5,
        tangent: Literal["reference", "projection"] = "reference",
        factor_grad_scale: float = 0.1,
        sampling_rate: float | None = None,
        reference_rounds: int | None = None,
    ) -> None:
        super().__init__(n_ctx, ctx_init, False, "end")
        key = "learner.init_args"
        for name, value, options in (
            ("factorization", factorization, FACTORIZATIONS),
            ("noise", noise, NOISES),
            ("tangent", tangent, TANGENTS),
        ):
            if value not in options:
                raise ConfigError(f"{key}.{name}={value!r}: must be one of {', '.join(options)}")
        if rank < 1 or (factorization != "full" and rank > n_ctx):
            raise ConfigError(f"{key}.rank={rank}: must be in 1..n_ctx ({n_ctx})")
        if not (clip_norm > 0 and math.isfinite(clip_norm)):
            raise ConfigError(f"{key}.clip_norm={clip_norm}: must be > 0 and finite")
        for name, value in (("noise_multiplier", noise_multiplier),
                            ("reference_epsilon", reference_epsilon),
                            ("factor_grad_scale", factor_grad_scale)):  # fmt: skip
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{key}.{name}={value}: must be >= 0 and finite")
        if not 0 < delta < 1:
            raise ConfigError(f"{key}.delta={delta}: must be in (0, 1)")
        if reference_rounds is not None and reference_rounds < 1:
            raise ConfigError(f"{key}.reference_rounds={reference_rounds}: must be >= 1")
        if sampling_rate is not None and not 0 < sampling_rate <= 1:
            raise ConfigError(f"{key}.sampling_rate={sampling_rate}: must be in (0, 1]")
        self.rank = rank
        self.factorization = factorization
        self.clip_norm = float(clip_norm)
        self.noise = noise
        self.noise_multiplier = float(noise_multiplier)
        self.reference_epsilon = float(reference_epsilon)
        self.delta = float(delta)
        self.tangent = tangent
        self.factor_grad_scale = float(factor_grad_scale)
        self.sampling_rate = sampling_rate
        self.reference_rounds = reference_rounds
        self.rounds: int | None = None  # the run's rounds (configure_optimizers)
        self._history: list[tuple[float, float, int]] = []  # (sigma, q, steps), Opacus' form
        self._clipped = (0, 0)  # (clipped examples, examples) of the last round

    def setup(self, clip: FrozenCLIP, classnames: list[str], seed: int) -> None:
        super().setup(clip, classnames, seed)
        gen = torch.Generator().manual_seed(seed + 7919)  # the same L on every client
        local = torch.randn(self.n_ctx, clip.text_width, generator=gen) * 0.02
        self.local_ctx = nn.Parameter(local.to(clip.device))
        self._eval_seed = seed + 104729

    # ---- the context -------------------------------------------------------------------
    def factors(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(u, v, residual) of L from a fresh Gaussian v0 (W, r), drawn in float32 on the
        CPU from `generator` (None: torch's global RNG, which the runtime forks per turn)."""
        v0 = torch.randn(self.local_ctx.shape[1], self.rank, generator=generator)
        local = self.local_ctx.detach()
        return power_factorization(local, v0.to(local.device, local.dtype))

    def context(self, u: Tensor | None, v: Tensor | None, residual: Tensor | None) -> Tensor:
        """The client's context from G and the given factors (G alone in `global_part()`)."""
        if self.using_global:
            return self.ctx
        if self.factorization == "full":
            return self.ctx + self.local_ctx
        ctx = self.ctx + u @ v
        return ctx + residual if self.factorization == "lowrank_residual" else ctx

    def text_features(self) -> Tensor:
        """Evaluation (and any call outside `training_loss`): the factors come from a fixed
        v0 (the same weights give the same logits; for 'lowrank_residual' the context equals
        G + L up to rounding)."""
        if self.using_global or self.factorization == "full":
            return self.encode_context(self.context(None, None, None))
        gen = torch.Generator().manual_seed(self._eval_seed)
        return self.encode_context(self.context(*self.factors(gen)))

    # ---- private training --------------------------------------------------------------
    def sigma(self) -> float:
        """The noise multiplier of the factor noise (std sigma C / B on the mean)."""
        if self.noise == "rdp":
            return self.noise_multiplier
        if self.reference_epsilon == 0:
            return 0.0
        rounds = self.reference_rounds or self.rounds or 1
        return reference_noise_multiplier(self.reference_epsilon, rounds, self.delta)

    def per_example_loss_grads(self, t: Tensor, f: Tensor, labels: Tensor) -> Tensor:
        """d loss_i / d t for every example: (B, C, D) (torch.func.vmap of grad)."""

        def loss_one(t_: Tensor, f_: Tensor, y_: Tensor) -> Tensor:
            logits = self.scores(f_.unsqueeze(0), t_)
            return F.cross_entropy(logits.float(), y_.unsqueeze(0))

        return torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(t, f, labels)

    def clip_and_noise(self, grads: list[Tensor]) -> list[Tensor]:
        """Per-example gradients [(B, ...), ...] -> their clipped mean plus noise: each
        example's tensors are clipped jointly to L2 norm C, averaged, and N(0, (sigma C /
        B)^2) is added to every element (drawn in float32 on the CPU, torch's global RNG)."""
        b = grads[0].shape[0]
        sq = sum(g.reshape(b, -1).double().pow(2).sum(1) for g in grads)
        norms = sq.sqrt()
        scale = torch.clamp(self.clip_norm / norms.clamp_min(1e-30), max=1.0)
        clipped, seen = self._clipped
        self._clipped = (clipped + int((norms > self.clip_norm).sum()), seen + b)
        out = []
        std = self.sigma() * self.clip_norm / b
        for g in grads:
            mean = (g.double() * scale.view(b, *[1] * (g.dim() - 1))).mean(0).to(g.dtype)
            if std > 0:
                mean = mean + (torch.randn(mean.shape) * std).to(mean)
            out.append(mean)
        return out

    def account(self, batch_size: int) -> None:
        """Count one noisy step of the factor noise."""
        sigma = self.sigma()
        if self.sampling_rate is not None:
            q = self.sampling_rate
        elif self.num_train:
            q = min(1.0, batch_size / self.num_train)
        else:
            q = 1.0
        if self._history and self._history[-1][:2] == (sigma, q):
            self._history[-1] = (sigma, q, self._history[-1][2] + 1)
        else:
            self._history.append((sigma, q, 1))

    def private_local_gradient(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(loss, noisy g_L) of one step; the loss has G's batch gradient in its graph."""
        f = self.image_features(batch)
        if self.factorization == "full":
            local = self.local_ctx.detach().requires_grad_(True)
            leaves, u = [local], None
            t = self.encode_context(self.ctx + local)
        else:
            u, v, residual = self.factors()
            u, v = u.requires_grad_(True), v.requires_grad_(True)
            leaves = [u, v]
            t = self.encode_context(self.context(u, v, residual))
        loss = self.loss(self.scores(f, t), batch)
        cot = self.per_example_loss_grads(t.detach(), f.detach(), batch.labels).to(t.dtype)
        per_example = torch.autograd.grad(
            t, leaves, cot, is_grads_batched=True, retain_graph=True
        )  # per-example gradients of the private leaves: [(B, *leaf.shape)]
        noisy = self.clip_and_noise([g.float() for g in per_example])
        self.account(f.shape[0])
        if self.factorization == "full":
            return loss, noisy[0].to(self.local_ctx.dtype)
        s = self.factor_grad_scale
        g_local = local_gradient(u.detach(), v.detach(), s * noisy[0], s * noisy[1], self.tangent)
        return loss, g_local.to(self.local_ctx.dtype)

    def training_loss(self, batch: Batch) -> Tensor:
        """The CE loss, whose backward gives G its batch gradient and L the noisy rebuilt
        gradient (a surrogate term of value exactly 0)."""
        loss, g_local = self.private_local_gradient(batch)
        surrogate = (self.local_ctx * g_local.detach()).sum()
        return loss + (surrogate - surrogate.detach())

    # ---- what travels and what is reported --------------------------------------------
    def shared_keys(self) -> list[str]:
        """The global prompt G."""
        return ["ctx"]

    def personal_keys(self) -> list[str]:
        """The local prompt L (u, v and r are recomputed from it at every step)."""
        return ["local_ctx"]

    def initial_state(self) -> str:
        if not self.ctx_init:
            return "random global and local prompts (not zero-shot)"
        return f"the global prompt '{self.ctx_init}' plus a small random local prompt"

    def configure_optimizers(self, optim, steps_per_round: int, rounds: int):
        self.rounds = rounds  # the reference noise formula's R
        return super().configure_optimizers(optim, steps_per_round, rounds)

    def factor_epsilon(self) -> float:
        """Epsilon (at `delta`) of the factor noise so far, from Opacus' RDP accountant."""
        from fedclip.privacy import _accountant_epsilon

        return _accountant_epsilon(self._history, self.delta)

    def report(self) -> dict[str, Any]:
        clipped, seen = self._clipped
        self._clipped = (0, 0)
        out: dict[str, Any] = {"factor_steps": sum(n for _, _, n in self._history)}
        if self._history:
            out["factor_epsilon"] = self.factor_epsilon()
            out["factor_sigma"] = self._history[-1][0]
        if seen:
            out["factor_clipped"] = clipped / seen
        return out

    # ---- personal state: the accountant's history --------------------------------------
    def get_extra_state(self) -> dict[str, Tensor]:
        return {"dp_history": torch.tensor(self._history, dtype=torch.float64).reshape(-1, 3)}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self._history = [(float(s), float(q), int(n)) for s, q, n in state["dp_history"].tolist()]

    def expected_extra_state(self, reference: dict[str, Any], saved: Any) -> Any:
        """`dp_history` (S, 3) float64, S from the saved history."""
        h = saved.get("dp_history") if isinstance(saved, dict) else None
        s = int(h.shape[0]) if isinstance(h, Tensor) and h.dim() == 2 else 0
        return {"dp_history": torch.empty(s, 3, dtype=torch.float64)}
