"""FedPHA: a shared fixed-length global prompt and a personal local prompt of any length.

Fang et al., "FedPHA: Federated Prompt Learning for Heterogeneous Client Adaptation"
(ICML 2025). Every client holds the global context G (n_g x W, averaged by the server) and
its own local context L (n_k x W, never sent; its length may differ between clients). At
every forward, in float32, G = U S V^T (reduced SVD) and L is projected token-wise onto a
subspace read from G's right singular vectors, P = L V2 V2^T:

- 'weak' (the public code, which calls it the null space): V2 = V[:, cutoff:], the right
  singular vectors of the n_g - cutoff weakest singular values, cutoff = floor(n_g (1 - ratio));
- 'complement': the true orthogonal complement of G's row space, P = L (I - V V^T)
  (dimension W - n_g; `ratio` is not used).

With t^X the normalised class features of context X (CoOp text path), the prediction is
s f t^L^T (the local prompt alone, in training and at test), and the loss is

    CE(s f t^L^T) + CE(s f t^G^T) + pull_weight * MSE(t^L, t^P)
    + push_weight * mean_c relu(alpha - ||t^L_c - t^G_c||).

Each context length has its own tokenisation ("X" * n + " {name}.") and is pooled at that
tokenisation's end token (the public heterogeneous-length code pools every prompt at the
longest one's end token, after the real one for the shorter prompts).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedclip.backbone import FrozenCLIP
from fedclip.errors import ConfigError
from fedclip.learners.base import Batch
from fedclip.learners.textual import TextualPrompt

PROJECTIONS = ("weak", "complement")


def weak_cutoff(n_global: int, ratio: float) -> int:
    """floor(n_g (1 - ratio)): how many of G's strongest right singular vectors the weak
    projection drops (3 for n_g 16, ratio 0.8). A tolerance of 1e-9 keeps float rounding
    from taking one off an exact product (5 x 0.2 is 1, not 0)."""
    return math.floor(n_global * (1.0 - ratio) + 1e-9)


def project_local(g: Tensor, local: Tensor, projection: str = "weak", ratio: float = 0.8) -> Tensor:
    """P = L V2 V2^T in float32 (see the module docstring): g (n_g, W), local (n_k, W) ->
    (n_k, W) float32. Gradients flow through the SVD into g unless the caller detaches it."""
    device = g.device.type
    with torch.autocast(device_type=device, enabled=False):
        g32, l32 = g.float(), local.float()
        _, _, vh = torch.linalg.svd(g32, full_matrices=False)  # vh (r, W), r = min(n_g, W)
        if projection == "weak":
            v2 = vh[weak_cutoff(vh.shape[0], ratio) :]  # (r - cutoff, W)
            return (l32 @ v2.t()) @ v2
        return l32 - (l32 @ vh.t()) @ vh


def pull_push(
    t_local: Tensor, t_global: Tensor, t_projected: Tensor, alpha: float
) -> tuple[Tensor, Tensor]:
    """(MSE(t^L, t^P) over C x D, mean_c relu(alpha - ||t^L_c - t^G_c||)), in float32."""
    t_l = t_local.float()
    pull = F.mse_loss(t_l, t_projected.float())
    push = F.relu(alpha - (t_l - t_global.float()).norm(dim=-1)).mean()
    return pull, push


class ProjectedLocalPrompt(TextualPrompt):
    """FedPHA's learner: a global context G (`ctx`, shared) and a local context L
    (`ctx_local`, personal, any length), tied by an SVD projection of L onto G's subspace.

    Uploaded: `ctx` alone (n_ctx x W, whatever the local lengths). Personal: `ctx_local`.
    The global part (`global_part()`: eval/global, base-to-novel, transfer) is G alone.
    Both contexts are drawn from N(0, 0.02^2) by one generator seeded with the run's seed
    (G first, then L), so clients of the same local length start identical.

    Args:
        n_ctx: n_g, tokens of the global context G (16 in the paper).
        n_local: n_k, tokens of every client's local context when `local_lengths` is null.
        local_lengths: per-client local lengths: client k uses local_lengths[k % len] (a
            learner built outside a federation, client None, uses the first); null: n_local.
        ratio: 'weak' projection: G's strongest floor(n_g (1 - ratio)) singular directions
            are dropped (0.8).
        alpha: margin of the push term (1).
        pull_weight: weight of MSE(t^L, t^P) (1).
        push_weight: weight of mean_c relu(alpha - ||t^L_c - t^G_c||) (1).
        projection: 'weak' (the public code) or 'complement' (the orthogonal complement of
            G's row space).
        detach_projection: no gradient from P into G through the SVD (the paper: false).
    """

    supports_multilabel = False  # the pull/push geometry of negative contexts is undefined
    global_description = "the global prompt G alone"

    def __init__(
        self,
        n_ctx: int = 16,
        n_local: int = 16,
        local_lengths: list[int] | None = None,
        ratio: float = 0.8,
        alpha: float = 1.0,
        pull_weight: float = 1.0,
        push_weight: float = 1.0,
        projection: Literal["weak", "complement"] = "weak",
        detach_projection: bool = False,
    ) -> None:
        super().__init__(n_ctx)
        key = "learner.init_args"
        if isinstance(n_local, bool) or not isinstance(n_local, int) or n_local < 1:
            raise ConfigError(f"{key}.n_local={n_local!r}: must be an integer >= 1")
        if local_lengths is not None:
            if not local_lengths or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in local_lengths
            ):
                raise ConfigError(
                    f"{key}.local_lengths={local_lengths!r}: must be a non-empty list of "
                    "integers >= 1, or null"
                )
            local_lengths = [int(n) for n in local_lengths]
        if not (math.isfinite(ratio) and 0 < ratio <= 1):
            raise ConfigError(f"{key}.ratio={ratio!r}: must be in (0, 1]")
        for name, value in (("alpha", alpha), ("pull_weight", pull_weight)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{key}.{name}={value!r}: must be >= 0 and finite")
        if not (math.isfinite(push_weight) and push_weight >= 0):
            raise ConfigError(f"{key}.push_weight={push_weight!r}: must be >= 0 and finite")
        if projection not in PROJECTIONS:
            raise ConfigError(f"{key}.projection={projection!r}: must be 'weak' or 'complement'")
        self.n_local = n_local
        self.local_lengths = local_lengths
        self.ratio = float(ratio)
        self.alpha = float(alpha)
        self.pull_weight = float(pull_weight)
        self.push_weight = float(push_weight)
        self.projection = projection
        self.detach_projection = bool(detach_projection)

    @property
    def local_length(self) -> int:
        """n_k of this client: local_lengths[client_id % len] (client None: the first), or
        n_local."""
        if self.local_lengths is None:
            return self.n_local
        k = 0 if self.client_id is None else int(self.client_id) % len(self.local_lengths)
        return self.local_lengths[k]

    def setup(self, clip: FrozenCLIP, classnames: list[str], seed: int) -> None:
        self._by_length: dict[tuple[tuple[str, ...], int], tuple[Tensor, Tensor]] = {}
        super().setup(clip, classnames, seed)  # ctx = G and its layout
        n_k, width = self.local_length, clip.text_width
        gen = torch.Generator().manual_seed(seed)
        torch.randn(self.n_ctx, width, generator=gen)  # G's draw (TextualPrompt's)
        local = torch.randn(n_k, width, generator=gen) * 0.02
        self.ctx_local = nn.Parameter(local.to(clip.device))
        tokens, ctx_pos = self._layout_for(n_k)
        self.register_buffer("local_tokens", tokens, persistent=False)  # (C, L_k)
        self.register_buffer("local_ctx_pos", ctx_pos, persistent=False)  # (C, n_k)

    def _layout_for(self, n: int) -> tuple[Tensor, Tensor]:
        """The tokenisation of "X" * n + " {name}." for the current classes (cached)."""
        key = (tuple(self.classnames), n)
        if key not in self._by_length:
            try:
                self._by_length[key] = self._layout(self.clip, self.classnames, n)
            except ConfigError as e:
                if n == self.n_ctx:
                    raise
                what = "local_lengths" if self.local_lengths is not None else "n_local"
                raise ConfigError(
                    f"learner.init_args.{what}: a {n}-token local context does not fit "
                    f"{self.clip.name}'s text context with these class names"
                ) from e
        return self._by_length[key]

    def _classes_changed(self) -> None:
        device = self.ctx.device
        self.tokens, self.ctx_pos = (t.to(device) for t in self._layout_for(self.n_ctx))
        local = self._layout_for(self.local_length)
        self.local_tokens, self.local_ctx_pos = (t.to(device) for t in local)

    def context_layout(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        """The layout of a context of ctx's length (each length tokenised on its own)."""
        n = ctx.shape[-2]
        if n == self.n_ctx:
            return self.tokens, self.ctx_pos
        if n == self.local_length:
            return self.local_tokens, self.local_ctx_pos
        return tuple(t.to(self.ctx.device) for t in self._layout_for(n))

    # ---- text ----------------------------------------------------------------------------
    def projected_local(self) -> Tensor:
        """P (n_k, W): L projected by G's SVD (float32), in the token embeddings' dtype."""
        g = self.ctx.detach() if self.detach_projection else self.ctx
        p = project_local(g, self.ctx_local, self.projection, self.ratio)
        return p.to(self.clip.text.token_embedding.weight.dtype)

    def text_features(self) -> Tensor:
        """t^L (the personal prediction), or t^G inside `global_part()`."""
        return self.encode_context(self.ctx if self.using_global else self.ctx_local)

    # ---- loss --------------------------------------------------------------------------
    def _terms(self, f: Tensor, labels: Tensor, encode) -> dict[str, Tensor]:
        t_l, t_g = encode(self.ctx_local), encode(self.ctx)
        t_p = encode(self.projected_local())
        pull, push = pull_push(t_l, t_g, t_p, self.alpha)
        return {
            "ce_local": F.cross_entropy(self.scores(f, t_l).float(), labels),
            "ce_global": F.cross_entropy(self.scores(f, t_g).float(), labels),
            "pull": pull,
            "push": push,
        }

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        """The four terms of the loss (unweighted): ce_local, ce_global, pull, push."""
        return self._terms(self.image_features(batch), batch.labels, self.encode_context)

    def _total(self, terms: dict[str, Tensor]) -> Tensor:
        return (
            terms["ce_local"]
            + terms["ce_global"]
            + self.pull_weight * terms["pull"]
            + self.push_weight * terms["push"]
        )

    def training_loss(self, batch: Batch) -> Tensor:
        return self._total(self.loss_terms(batch))

    # ---- the reference path ------------------------------------------------------------
    def reference_logits(self, images: Tensor) -> Tensor | None:
        with torch.no_grad():
            f = self.clip.encode_image(images)
        return self.scores(
            f, self.reference_text(self.ctx if self.using_global else self.ctx_local)
        )

    def reference_loss(self, images: Tensor, batch: Batch) -> Tensor | None:
        """The image encoder and three full-length text encodes (L, G, P) at every step."""
        with torch.no_grad():
            f = self.clip.encode_image(images)
        return self._total(self._terms(f, batch.labels, self.reference_text))

    # ---- what travels ------------------------------------------------------------------
    def shared_keys(self) -> list[str]:
        """G alone."""
        return ["ctx"]

    def personal_keys(self) -> list[str]:
        """L never leaves the client."""
        return ["ctx_local"]

    def upload_schema(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """G only: its shape does not depend on any client's local length."""
        return {"ctx": (tuple(self.ctx.shape), self.ctx.dtype)}

    def initial_state(self) -> str:
        return "random global and local contexts (not zero-shot)"

    def report(self) -> dict[str, Any]:
        """The client's local context length."""
        return {"local_length": self.local_length}
