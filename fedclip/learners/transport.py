"""Entropic optimal transport between image patches and prompts, batched, in the log domain.

Each problem is a similarity matrix sim (M, Np) between M patches and Np prompts, with cost
1 - sim and kernel K = exp(-(1 - sim) / eps); any leading dims are independent problems
(e.g. (B, C, M, Np): one problem per image and class), solved together by tensor ops.
Patch masses a_m = 1/M. Starting from u = 1 (M), v = 1 (Np):

- `cot_plan` (unbalanced, one marginal relaxed): prompt masses b_n = rho / Np;
  u = min(a / (K v), 1), v = b / (K^T u). The plan diag(u) K diag(v) has prompt marginals
  exactly b, patch marginals <= a and total mass rho.
- `sinkhorn_plan` (balanced): b_n = 1 / Np; u = a / (K v), v = b / (K^T u).

Everything runs on log u, log v and log K = (sim - 1) / eps in float32 with log-sum-exp
updates (the cap u <= 1 is log u <= 0), so a kernel that would underflow in float16 or
float32 (eps = 0.01 with cosines of 0.1-0.3 gives exponents of -70 to -90) still gives the
plan of the plain-domain iteration; the result is finite for finite input. The iteration is
the plain-domain one step for step (same start, same updates), so a run to convergence meets
its fixed point.

Stopping: after every `check_every` iterations (one device sync per check, not per
iteration), the largest relative change of v over the last iteration across all problems,
max |v_new / v_old - 1| = max |expm1(log v_new - log v_old)|, is compared with `tol`; the
loop stops when it is below, or after `max_iter` iterations. A relative test is independent
of the kernel's scale (the plain-domain test on absolute changes of v, whose size is set by
K, never fires when K is tiny). tol = 0 runs exactly max_iter iterations.

No gradient flows through the plan (it is a constant of the loss, as in the method).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedclip.errors import ConfigError


def check_ot_args(eps: float, rho: float, max_iter: int, tol: float, prefix: str = "") -> None:
    """One-line ConfigErrors naming the key of a bad OT setting."""
    if not (math.isfinite(eps) and eps > 0):
        raise ConfigError(f"{prefix}eps={eps}: the entropic regularisation must be > 0")
    if not 0 < rho <= 1:
        raise ConfigError(f"{prefix}rho={rho}: the transported mass must be in (0, 1]")
    if max_iter < 1:
        raise ConfigError(f"{prefix}max_iter={max_iter}: must be >= 1")
    if not (math.isfinite(tol) and tol >= 0):
        raise ConfigError(f"{prefix}tol={tol}: must be >= 0")


@torch.no_grad()
def _solve(
    sim: Tensor,
    eps: float,
    b: float,
    capped: bool,
    max_iter: int,
    tol: float,
    check_every: int,
) -> Tensor:
    if sim.dim() < 2:
        raise ValueError(f"sim must be (..., M, Np), got shape {tuple(sim.shape)}")
    m, n = sim.shape[-2:]
    # prompts first, patches last: both reductions then run over contiguous memory
    log_k = ((sim.detach().float() - 1.0) / eps).transpose(-1, -2).contiguous()  # (..., Np, M)
    log_a, log_b = -math.log(m), math.log(b)
    log_u = log_k.new_zeros(log_k.shape[:-2] + (m,))  # (..., M)
    log_v = log_k.new_zeros(log_k.shape[:-1])  # (..., Np)
    work = torch.empty_like(log_k)
    for it in range(1, max_iter + 1):
        torch.add(log_k, log_v.unsqueeze(-1), out=work)  # log K_mn + log v_n
        if n == 2:  # log-sum-exp over two prompts, elementwise
            log_kv = torch.logaddexp(work[..., 0, :], work[..., 1, :])
        else:
            log_kv = torch.logsumexp(work, dim=-2)
        log_u = log_a - log_kv  # (..., M)
        if capped:
            log_u = log_u.clamp_(max=0.0)
        torch.add(log_k, log_u.unsqueeze(-2), out=work)  # log K_mn + log u_m
        new_v = log_b - torch.logsumexp(work, dim=-1)  # (..., Np)
        done = False
        if tol > 0 and it % check_every == 0 and it < max_iter:
            done = bool(torch.expm1(new_v - log_v).abs().max() < tol)
        log_v = new_v
        if done:
            break
    work.copy_(log_k).add_(log_u.unsqueeze(-2)).add_(log_v.unsqueeze(-1)).exp_()
    return work.transpose(-1, -2)  # (..., M, Np)


def cot_plan(
    sim: Tensor,
    eps: float = 0.1,
    rho: float = 0.8,
    max_iter: int = 100,
    tol: float = 1e-3,
    check_every: int = 5,
) -> Tensor:
    """Unbalanced (COT) plan (..., M, Np) of similarities `sim` (..., M, Np), float32: prompt
    marginals rho / Np, patch marginals <= 1 / M (see the module docstring)."""
    check_ot_args(eps, rho, max_iter, tol)
    return _solve(sim, eps, rho / sim.shape[-1], True, max_iter, tol, max(1, check_every))


def sinkhorn_plan(
    sim: Tensor,
    eps: float = 0.1,
    max_iter: int = 100,
    tol: float = 1e-3,
    check_every: int = 5,
) -> Tensor:
    """Balanced Sinkhorn plan (..., M, Np) of `sim` (..., M, Np), float32: patch marginals
    1 / M, prompt marginals 1 / Np (the latter exact after every iteration)."""
    check_ot_args(eps, 1.0, max_iter, tol)
    return _solve(sim, eps, 1.0 / sim.shape[-1], False, max_iter, tol, max(1, check_every))


def reference_plan(
    sim: Tensor, eps: float, rho: float, solver: str, max_iter: int, thresh: float
) -> Tensor:
    """The plain-domain iteration as the method's public code runs it (kernel exp(-(1 -
    sim) / eps), a stop test on the mean absolute change of v for COT and of u for
    Sinkhorn, a sync per iteration), for `reference_logits` and benchmarks. Float32; where
    float32 cannot hold the kernel or the scalings (tiny kernels give v above 3.4e38, an
    all-zero kernel row or column gives 0 * inf), it is rerun in float64 (never below
    exp(-2 / eps), no underflow for eps >= 0.003)."""
    plan = _reference_plan(sim.float(), eps, rho, solver, max_iter, thresh)
    if not bool(torch.isfinite(plan).all()):
        plan = _reference_plan(sim.double(), eps, rho, solver, max_iter, thresh).float()
    return plan


@torch.no_grad()
def _reference_plan(sim, eps, rho, solver, max_iter, thresh):
    m, n = sim.shape[-2:]
    kernel = torch.exp(-(1.0 - sim) / eps)
    a = torch.full(sim.shape[:-1], 1.0 / m, dtype=sim.dtype, device=sim.device)
    mass = rho if solver == "cot" else 1.0
    b = torch.full(sim.shape[:-2] + (n,), mass / n, dtype=sim.dtype, device=sim.device)
    u, v = torch.ones_like(a), torch.ones_like(b)
    for _ in range(max_iter):
        u0, v0 = u, v
        u = a / (kernel @ v.unsqueeze(-1)).squeeze(-1)
        if solver == "cot":
            u = torch.minimum(u, torch.ones_like(u))
        v = b / (kernel.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1)
        change = (v - v0) if solver == "cot" else (u - u0)
        if float(change.abs().mean()) < thresh:
            break
    return u.unsqueeze(-1) * kernel * v.unsqueeze(-2)
