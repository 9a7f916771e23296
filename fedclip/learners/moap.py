"""pFedMoAP: a personalised mixture of the local prompt and downloaded prompt experts.

Luo et al., "Mixture of Experts Made Personalized: Federated Prompt Learning for
Vision-Language Models" (ICLR 2025). Each client trains a local CoOp context (uploaded) and
an attention gating network (never uploaded). In every round it also downloads the contexts
of up to E-1 other clients (the experts, chosen by the server, see
`fedclip.strategies.PFedMoAP`); their text features are computed once, without gradient,
and the gating network mixes them per (image, class):

    logits = lambda * s * f @ T_L^T + s * <pool(f), G(pool(f), [pool(T_L); pool(T_1..T_{E-1})])>

With no experts yet (round 0, or a client that has never been sampled) the logits are the
local term alone, s * f @ T_L^T, without lambda: the public code does so, and scaling by
lambda there would halve the temperature of the round-0 softmax.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedclip.backbone import FrozenCLIP
from fedclip.data.memory import check_fits
from fedclip.errors import ConfigError
from fedclip.learners.base import Batch, OptimConfig, optimizer_for
from fedclip.learners.textual import TextualPrompt

log = logging.getLogger(__name__)


class PromptGating(nn.Module):
    """Multi-head attention from an image (query) over one class's expert text features
    (keys = values), with a fixed attention scale.

    Features of width D are first reduced to the gating width d: 'stride' keeps every r-th
    coordinate, r = D // d_gating (the reference; no parameters, no re-normalisation), and
    'linear' learns a D -> d_gating projection. q, k, v and out are Linear(d, d) with bias;
    the attention weights are softmax(scale * q k^T) over the experts, with no mask and no
    dropout.

    Args:
        embed_dim: D, the width of the CLIP features.
        d_gating: target gating width d.
        projection: 'stride' or 'linear'.
        heads: attention heads; d must be divisible by it.
        scale: the factor on q k^T (10.0 in the reference, not 1/sqrt(d / heads)).
    """

    def __init__(
        self,
        embed_dim: int,
        d_gating: int = 128,
        projection: Literal["stride", "linear"] = "stride",
        heads: int = 8,
        scale: float = 10.0,
    ) -> None:
        super().__init__()
        if projection == "stride":
            self.stride = max(1, embed_dim // d_gating)
            width = math.ceil(embed_dim / self.stride)  # len(range(0, D, r))
            self.proj = None
        elif projection == "linear":
            self.stride = 1
            width = d_gating
            self.proj = None  # built below, once its size is known to fit
        else:
            raise ConfigError(f"gating projection must be 'stride' or 'linear', got {projection!r}")
        # q, k, v, out (d x d, with bias) and the projection, before any is allocated
        params = 4 * (width * width + width) + (embed_dim * width if projection == "linear" else 0)
        check_fits(f"learner.init_args.d_gating={d_gating}", "the gating network", 4 * params)
        if width % heads:
            raise ConfigError(
                f"gating width {width} (from feature width {embed_dim}, d_gating {d_gating}, "
                f"projection {projection}) is not divisible by {heads} heads; change "
                "gating_heads or d_gating, or use gating_projection: linear"
            )
        if projection == "linear":
            self.proj = nn.Linear(embed_dim, d_gating, bias=False)
        self.width = width
        self.heads = heads
        self.scale = float(scale)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def pool(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., d)."""
        return x[..., :: self.stride] if self.proj is None else self.proj(x)

    def forward(self, query: Tensor, experts: Tensor) -> Tensor:
        """query (B, d) pooled image features, experts (C, E, d) pooled text features of every
        class under every expert -> (B, C, d), one mixture per (image, class) pair."""
        b, d = query.shape
        c, e, _ = experts.shape
        h, dh = self.heads, d // self.heads
        q = self.q(query).view(b, h, dh).transpose(0, 1)  # (h, B, dh)
        k = self.k(experts).view(c, e, h, dh).transpose(1, 2)  # (C, h, E, dh)
        v = self.v(experts).view(c, e, h, dh).transpose(1, 2)  # (C, h, E, dh)
        q = q.unsqueeze(0).expand(c, -1, -1, -1)  # (C, h, B, dh): the same query for each class
        mixed = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (C, h, B, dh)
        mixed = mixed.permute(2, 0, 1, 3).reshape(b, c, d)  # (B, C, d)
        return self.out(mixed)


class MixtureOfPrompts(TextualPrompt):
    """pFedMoAP's learner: a local context plus a gating network over downloaded experts.

    Trained on the client: the context and the gating network, each with its own SGD
    (context: the run's `optim`, cosine; gating: `gating_lr`, constant). Uploaded: the
    context only. Personal state kept across rounds and in checkpoints: the gating network,
    the last local context and the experts last received (with their client ids).

    Args:
        n_ctx: learned context tokens (as TextualPrompt).
        ctx_init: phrase that initialises the context (as TextualPrompt).
        class_token_position: 'end', 'middle' or 'front' (as TextualPrompt).
        d_gating: gating width (128 in the paper).
        gating_projection: 'stride' (every r-th feature, the reference) or 'linear'.
        gating_heads: attention heads of the gating network.
        attn_scale: factor on q k^T inside the gating attention.
        lambda_local: weight lambda of the local prompt's logits next to the mixture (not
            applied while there are no experts).
        gating_lr: SGD learning rate of the gating network (constant).
        gating_momentum: SGD momentum of the gating network.
        gating_weight_decay: SGD weight decay of the gating network.
    """

    accepts_extras = frozenset({"experts", "expert_ids"})

    def __init__(
        self,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_token_position: Literal["end", "middle", "front"] = "end",
        d_gating: int = 128,
        gating_projection: Literal["stride", "linear"] = "stride",
        gating_heads: int = 8,
        attn_scale: float = 10.0,
        lambda_local: float = 0.5,
        gating_lr: float = 0.01,
        gating_momentum: float = 0.9,
        gating_weight_decay: float = 5e-4,
    ) -> None:
        super().__init__(n_ctx, ctx_init, False, class_token_position)
        if d_gating < 1 or gating_heads < 1:
            raise ConfigError(
                f"MixtureOfPrompts: d_gating and gating_heads must be >= 1, got "
                f"{d_gating} and {gating_heads}"
            )
        if gating_projection not in {"stride", "linear"}:
            raise ConfigError(
                "MixtureOfPrompts: gating_projection must be 'stride' or 'linear', got "
                f"{gating_projection!r}"
            )
        if lambda_local < 0 or gating_lr <= 0:
            raise ConfigError(
                f"MixtureOfPrompts: lambda_local must be >= 0 and gating_lr > 0, got "
                f"{lambda_local} and {gating_lr}"
            )
        if gating_momentum < 0 or gating_weight_decay < 0:
            raise ConfigError(
                "MixtureOfPrompts: gating_momentum and gating_weight_decay must be >= 0, got "
                f"{gating_momentum} and {gating_weight_decay}"
            )
        self.d_gating = d_gating
        self.gating_projection = gating_projection
        self.gating_heads = gating_heads
        self.attn_scale = attn_scale
        self.lambda_local = lambda_local
        self.gating_lr = gating_lr
        self.gating_momentum = gating_momentum
        self.gating_weight_decay = gating_weight_decay
        self.expert_ids: list[int] = []
        self._experts: dict[str, Tensor] | None = None  # key -> (n, n_ctx, W); None: none
        # (n, C, D) frozen expert features per class set, computed once per download
        self._expert_text: dict[tuple[str, ...], Tensor] = {}

    def setup(self, clip: FrozenCLIP, classnames: list[str], seed: int) -> None:
        super().setup(clip, classnames, seed)
        # The gating's default init, identical on every client, without touching the
        # caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            gating = PromptGating(
                clip.embed_dim,
                self.d_gating,
                self.gating_projection,
                self.gating_heads,
                self.attn_scale,
            )
        self.gating = gating.to(clip.device)

    # ---- experts -----------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        """Non-local experts currently held."""
        return 0 if self._experts is None else int(self._experts["ctx"].shape[0])

    def receive(self, extras: dict[str, Any]) -> None:
        """Take the experts of this round: extras {'experts': {'ctx': (n, n_ctx, W)} (plus
        'ctx_neg' when multi-label), 'expert_ids': [client ids]}. No 'experts' key keeps the
        experts held."""
        extras = dict(extras)
        experts = extras.pop("experts", None)
        ids = extras.pop("expert_ids", None)
        super().receive(extras)  # anything else is an error
        if experts is None:
            return
        keys = self.shared_keys()
        if set(experts) != set(keys):
            raise ValueError(f"MixtureOfPrompts: experts must hold {keys}, got {sorted(experts)}")
        n = experts["ctx"].shape[0]
        for key in keys:
            own = tuple(getattr(self, key).shape)
            if tuple(experts[key].shape) != (n, *own):
                raise ValueError(
                    f"MixtureOfPrompts: expert contexts {key} of shape "
                    f"{tuple(experts[key].shape[1:])} do not match the local context {own}"
                )
        ids = list(ids) if ids is not None else list(range(n))
        if len(ids) != n:
            raise ValueError(f"MixtureOfPrompts: {len(ids)} expert ids for {n} experts")
        self._set_experts(experts, ids)

    def _set_experts(self, experts: dict[str, Tensor], ids: list[int]) -> None:
        self._experts = (
            {k: v.detach().to(self.ctx.device, self.ctx.dtype) for k, v in experts.items()}
            if len(ids)
            else None
        )
        self.expert_ids = [int(i) for i in ids]
        self._expert_text = {}

    @torch.no_grad()
    def expert_text_features(self) -> Tensor:
        """Normalised text features of the experts, computed once per download and class
        set: (n, C, D), or (n, 2, C, D) with the negative features when multi-label."""
        key = tuple(self.classnames)
        if key not in self._expert_text:
            per_expert = []
            for j in range(self.num_experts):
                feats = [self.encode_context(self._experts[k][j]) for k in self.shared_keys()]
                per_expert.append(torch.stack(feats) if self.multilabel else feats[0])
            self._expert_text[key] = torch.stack(per_expert).float()
        return self._expert_text[key]

    # ---- computation -------------------------------------------------------------------
    def _mixture(self, pooled: Tensor, t_local: Tensor, t_experts: Tensor) -> Tensor:
        """s * <pool(f), G>: (B, d), (C, D), (n, C, D) -> (B, C)."""
        keys = torch.cat([t_local.unsqueeze(0), t_experts]).transpose(0, 1)  # (C, E, D)
        mixture = self.gating(pooled, self.gating.pool(keys))  # (B, C, d)
        return self.clip.logit_scale * torch.einsum("bd,bcd->bc", pooled, mixture.to(pooled.dtype))

    def forward(self, batch: Batch) -> Tensor:
        f = self.image_features(batch)  # (B, D)
        t_local = self.class_text_features()  # (C, D), multi-label (2, C, D)
        local = self.scores(f, t_local)  # (B, C)
        if self._experts is None:  # no lambda: lambda would halve the temperature
            return local
        f = f.to(t_local.dtype)
        t_experts = self.expert_text_features().to(t_local.dtype)  # (n, [2,] C, D)
        pooled = self.gating.pool(f)  # (B, d)
        if self.multilabel:  # the same gating mixes the positive and the negative features
            moe = self._mixture(pooled, t_local[0], t_experts[:, 0]) - self._mixture(
                pooled, t_local[1], t_experts[:, 1]
            )
        else:
            moe = self._mixture(pooled, t_local, t_experts)
        return self.lambda_local * local + moe

    # ---- what travels ------------------------------------------------------------------
    def shared_keys(self) -> list[str]:
        return ["ctx", "ctx_neg"] if self.multilabel else ["ctx"]

    def reference_logits(self, images: Tensor) -> Tensor | None:
        """The image encoder, the full-length local prompts and every expert's full-length
        prompts recomputed at every step."""
        if self.multilabel:
            return None
        with torch.no_grad():
            f = self.clip.encode_image(images)
        t = self.reference_text(self.ctx)
        local = self.scores(f, t)
        if self._experts is None:
            return local
        with torch.no_grad():
            t_exp = torch.stack([self.reference_text(c) for c in self._experts["ctx"]])
        return self.lambda_local * local + self._mixture(self.gating.pool(f), t, t_exp)

    def example_extras(self, n: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """n experts: small random contexts (as a downloaded pool would hold), ids 100.."""
        experts = {
            k: 0.02 * torch.randn(n, *getattr(self, k).shape, generator=generator).to(self.ctx)
            for k in self.shared_keys()
        }
        return {"experts": experts, "expert_ids": list(range(100, 100 + n))}

    def personal_keys(self) -> list[str]:
        """The gating network never leaves the client."""
        return [f"gating.{n}" for n, _ in self.gating.named_parameters()]

    def report(self) -> dict[str, Any]:
        """The client ids of the experts the client holds now."""
        return {"experts": [int(i) for i in self.expert_ids]}

    def get_extra_state(self) -> dict[str, Tensor]:
        state = {"expert_ids": torch.tensor(self.expert_ids, dtype=torch.int64)}
        for key in self.shared_keys():
            held = self._experts[key] if self._experts is not None else torch.empty(0)
            state[f"expert_{key}"] = held.detach().cpu()
        return state

    def expected_extra_state(self, reference: dict[str, Any], saved: Any) -> Any:
        """E held experts: `expert_ids` (E,) and each `expert_<key>` (E, *shape of key), or
        (0,) while none are held; E from the saved ids."""
        ids = saved.get("expert_ids") if isinstance(saved, dict) else None
        e = int(ids.shape[0]) if isinstance(ids, Tensor) and ids.dim() == 1 else 0
        expected: dict[str, Any] = {"expert_ids": torch.empty(e, dtype=torch.int64)}
        for key in reference["_extra_state"]:
            if key.startswith("expert_") and key != "expert_ids":
                own = reference[key.removeprefix("expert_")]
                shape = (e, *own.shape) if e else (0,)
                expected[key] = torch.empty(shape, dtype=own.dtype)
        return expected

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        ids = [int(i) for i in state["expert_ids"]]
        self._set_experts({k: state[f"expert_{k}"] for k in self.shared_keys()}, ids)

    # ---- optimisation ------------------------------------------------------------------
    def configure_optimizers(
        self, optim: OptimConfig, steps_per_round: int, rounds: int
    ) -> list[tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]]:
        gating = OptimConfig(
            lr=self.gating_lr,
            momentum=self.gating_momentum,
            weight_decay=self.gating_weight_decay,
            scheduler="constant",
        )
        prompts = [getattr(self, k) for k in self.shared_keys()]
        return [
            optimizer_for(prompts, optim, steps_per_round, rounds),
            optimizer_for(list(self.gating.parameters()), gating, steps_per_round, rounds),
        ]
