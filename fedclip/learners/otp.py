"""FedOTP: a global and a local prompt matched to image patches by unbalanced optimal transport.

Li, Huang, Wang, Shi, "Global and Local Prompts Cooperation via Optimal Transport for
Federated Learning" (CVPR 2024). Each client holds two CoOp contexts: a global prompt g
(uploaded, averaged by FedAvg) and a local prompt l (never uploaded). For an image with
patch tokens z_1..z_M (the frozen dense tokens, cached; the CLS token is not used) and a
class c, sim[m, n] = <z_m, t_n(c)> with t_0 = t(g), t_1 = t(l); the plan T* of the
entropic OT problem between the patches (mass 1/M each) and the prompts (COT: rho / 2
each, the most similar rho of the patch mass moves; Sinkhorn: 1/2 each) is computed
without gradient (`fedclip.learners.transport`), and

    logit[b, c] = s * sum_{m, n} T*[b, c, m, n] * sim[b, c, m, n],

trained with cross-entropy. All B * C problems are solved at once, in float32, in the log
domain.

The global part (`global_part()`): by default CoOp's logits of the global prompt on the
CLS feature, s * f_CLS @ t(g)^T (global_eval 'cls'); global_eval 'ot' runs the OT with
the global prompt alone over the patches.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from fedclip.backbone import FrozenCLIP
from fedclip.batch import Batch, Input
from fedclip.errors import ConfigError
from fedclip.learners.textual import TextualPrompt
from fedclip.learners.transport import check_ot_args, cot_plan, reference_plan, sinkhorn_plan

KEY = "learner.init_args"


class TransportPrompts(TextualPrompt):
    """A global and a local context, matched to the patch tokens by (unbalanced) OT.

    Trained on the client: both contexts (one optimizer, the run's `optim`). Uploaded: the
    global context `ctx`. Personal: the local context `ctx_local`. Fed the cached dense
    image tokens (float16 on the host, (1 + M) x D per image).

    Args:
        n_ctx: context tokens of each prompt (16 in the few-shot setting, 4 for CIFAR-100).
        ctx_init: phrase that initialises both contexts; null draws both from N(0, 0.02^2)
            (one draw of two contexts from the seed: the same on every client, g != l).
        class_token_position: 'end', 'middle' or 'front' (as TextualPrompt).
        solver: 'cot' (unbalanced, the method's) or 'sinkhorn' (balanced).
        eps: entropic regularisation of the kernel exp(-(1 - sim) / eps) (0.1, the public
            code's argparse default and its CIFAR-100 script; its few-shot script uses 0.01).
        rho: COT's transported mass (top_percent), in (0, 1].
        max_iter: at most this many OT iterations.
        tol: stop when the largest relative change of the prompt scaling v in one
            iteration is below tol (checked every 5 iterations); 0: always max_iter.
        global_eval: what the global part computes: 'cls' (CoOp logits of the global
            prompt on the CLS feature) or 'ot' (the OT over the patches with the global
            prompt alone).
    """

    inputs = frozenset({Input.TOKENS})
    supports_multilabel = False
    global_description = (
        "the global prompt alone: CoOp logits on the CLS feature (global_eval 'cls', "
        "default) or OT over the patches with it alone ('ot')"
    )

    def __init__(
        self,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_token_position: Literal["end", "middle", "front"] = "end",
        solver: Literal["cot", "sinkhorn"] = "cot",
        eps: float = 0.1,
        rho: float = 0.8,
        max_iter: int = 100,
        tol: float = 1e-3,
        global_eval: Literal["cls", "ot"] = "cls",
    ) -> None:
        super().__init__(n_ctx, ctx_init, False, class_token_position)
        if solver not in {"cot", "sinkhorn"}:
            raise ConfigError(f"{KEY}.solver={solver!r}: must be 'cot' or 'sinkhorn'")
        if global_eval not in {"cls", "ot"}:
            raise ConfigError(f"{KEY}.global_eval={global_eval!r}: must be 'cls' or 'ot'")
        check_ot_args(float(eps), float(rho), int(max_iter), float(tol), prefix=f"{KEY}.")
        self.solver = solver
        self.eps = float(eps)
        self.rho = float(rho)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.global_eval = global_eval

    def setup(self, clip: FrozenCLIP, classnames: list[str], seed: int) -> None:
        clip._dense_kind()  # a one-line BackboneError for towers without dense tokens
        super().setup(clip, classnames, seed)
        if self.ctx_init:
            local = self.ctx.detach().clone()
        else:  # one draw of (2, n_ctx, W): [0] is the global context drawn by TextualPrompt
            gen = torch.Generator().manual_seed(seed)
            both = torch.randn(2, self.n_ctx, clip.text_width, generator=gen) * 0.02
            local = both[1].to(clip.device)
        self.ctx_local = nn.Parameter(local)

    # ---- computation ---------------------------------------------------------------------
    def _class_features(self) -> Tensor:
        """(Np, C, D): [t(g), t(l)], or [t(g)] in the global part; one shared-prefix text
        pass per prompt."""
        prompts = [self.ctx] if self.using_global else [self.ctx, self.ctx_local]
        return torch.stack([self.encode_context(p) for p in prompts])

    def plan(self, sim: Tensor) -> Tensor:
        """The OT plan (..., M, Np) of similarities (..., M, Np), without gradient."""
        if self.solver == "cot":
            return cot_plan(sim, self.eps, self.rho, self.max_iter, self.tol)
        return sinkhorn_plan(sim, self.eps, self.max_iter, self.tol)

    def transport_logits(self, patches: Tensor, t: Tensor, plan_fn=None) -> Tensor:
        """s * sum_{m,n} T* sim: patches (B, M, D), prompt features t (Np, C, D) -> (B, C)."""
        sim = torch.einsum("bmd,ncd->bcmn", patches.to(t.dtype), t)  # (B, C, M, Np)
        plan = (plan_fn or self.plan)(sim).to(sim.dtype)
        logits = torch.einsum("bcmn,bcmn->bc", plan, sim)
        return self.clip.logit_scale * logits + self.clip.logit_bias.to(logits.dtype)

    def forward(self, batch: Batch) -> Tensor:
        tokens = batch.tokens
        if tokens is None:
            raise ValueError("TransportPrompts needs the dense image tokens (Input.TOKENS)")
        t = self.class_text_features()  # (Np, C, D)
        if self.using_global and self.global_eval == "cls":
            return self.scores(tokens[:, 0], t[0])
        return self.transport_logits(tokens[:, 1:], t)

    def initial_state(self) -> str:
        if self.ctx_init:
            return f"both prompts '{self.ctx_init}', matched to the patches by OT"
        return "random global and local prompts (not zero-shot)"

    def reference_logits(self, images: Tensor) -> Tensor | None:
        """The dense tokens from the images by the image encoder, both prompts' full-length
        sentences, and the public code's plain-domain OT iteration (kernel exp(-cost/eps),
        absolute stop test on v; float32, rerun in float64 where float32 overflows)."""
        with torch.no_grad():
            tokens = self.clip.encode_dense(images)
        prompts = [self.ctx] if self.using_global else [self.ctx, self.ctx_local]
        t = torch.stack([self.reference_text(p) for p in prompts])
        if self.using_global and self.global_eval == "cls":
            return self.scores(tokens[:, 0], t[0])

        def plan_fn(sim: Tensor) -> Tensor:
            return reference_plan(sim, self.eps, self.rho, self.solver, self.max_iter, self.tol)

        return self.transport_logits(tokens[:, 1:], t, plan_fn)

    # ---- what travels ------------------------------------------------------------------
    def shared_keys(self) -> list[str]:
        """The global context."""
        return ["ctx"]

    def personal_keys(self) -> list[str]:
        """The local context never leaves the client."""
        return ["ctx_local"]
