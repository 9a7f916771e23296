"""FedTPG: a shared prompt generator conditioned on the class names' text features.

Qiu, Li, Mummadi, Ganesh, Li, Peng, Lin, "Federated Text-driven Prompt Generation for
Vision-Language Models", ICLR 2024. Instead of a context, every client trains (and
uploads) a small network that turns the frozen text features of the class names in use
into a context: learned queries Q cross-attend over E = normalise(text("{name}")) of the
current class list, and the result fills the placeholders of "X X X X {class}." in the
CoOp text path. Because the context is a function of the class names, the same generator
produces a context for classes it never trained on (base-to-novel, other data sets).

    H = MHA(LN_q(Q), LN_kv(E), LN_kv(E))      (no residual from Q)
    H = H + FF(H),  FF = LN -> Linear(W, 8W) -> GEGLU -> Linear(4W, W)
    `depth` times: H = H + MHA(LN(H)); H = H + FF(H)
    ctx = H reshaped (d_ctx, n_ctx, W); ctx[0] is the input context, ctx[j] (j >= 1)
    replaces the context rows before text block j (deep text prompts)

Nothing is personal; FedAvg averages the whole generator (weighted by training size in
fedclip; the reference's unweighted mean is `strategy.init_args.weighted: false`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedclip.backbone import FrozenCLIP
from fedclip.errors import ConfigError
from fedclip.learners.mvp import GEGLU
from fedclip.learners.textual import TextualPrompt


def _feed_forward(width: int, mult: int) -> nn.Sequential:
    """LN -> Linear(W, 2 mult W) -> GEGLU -> Linear(mult W, W)."""
    return nn.Sequential(
        nn.LayerNorm(width),
        nn.Linear(width, 2 * mult * width),
        GEGLU(),
        nn.Linear(mult * width, width),
    )


class _SelfAttentionBlock(nn.Module):
    """x = x + MHA(LN(x)); x = x + FF(x)."""

    def __init__(self, width: int, heads: int, mult: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ff = _feed_forward(width, mult)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ff(x)


class TextPromptGenerator(nn.Module):
    """The prompt generator: class-name features E (C, kv_dim) -> contexts (d_ctx, n_ctx, W).

    Args:
        n_ctx: context tokens per layer.
        d_ctx: layers that get a context (1: the input context only).
        width: W, the text tower's token width (the queries' and outputs' width).
        kv_dim: the width of E (the joint embedding width D): keys and values are projected
            from it, so D need not equal W.
        depth: self-attention blocks after the cross-attention block.
        heads: attention heads (W must be divisible by it).
        mult: the feed-forward's hidden width is mult * W (after the GEGLU).
    """

    def __init__(
        self,
        n_ctx: int,
        d_ctx: int,
        width: int,
        kv_dim: int,
        depth: int = 0,
        heads: int = 4,
        mult: int = 4,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.n_ctx, self.d_ctx = n_ctx, d_ctx
        self.soft_prompt = nn.Parameter(
            torch.randn(n_ctx * d_ctx, width, generator=generator) * 0.02
        )
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(kv_dim)
        self.cross_attn = nn.MultiheadAttention(
            width, heads, kdim=kv_dim, vdim=kv_dim, batch_first=True
        )
        self.cross_ff = _feed_forward(width, mult)
        self.blocks = nn.ModuleList(_SelfAttentionBlock(width, heads, mult) for _ in range(depth))

    def forward(self, names: Tensor) -> Tensor:
        """names: (C, kv_dim) -> (d_ctx, n_ctx, W)."""
        q = self.norm_q(self.soft_prompt).unsqueeze(0)  # (1, n d, W)
        kv = self.norm_kv(names.to(q.dtype)).unsqueeze(0)  # (1, C, D)
        x = self.cross_attn(q, kv, kv, need_weights=False)[0]  # no residual from Q
        x = x + self.cross_ff(x)
        for block in self.blocks:
            x = block(x)
        return x[0].reshape(self.d_ctx, self.n_ctx, -1)


class GeneratedPrompt(TextualPrompt):
    """FedTPG's learner: a TextPromptGenerator (shared, uploaded whole) conditioned on the
    frozen features of the current class names; its context goes through CoOp's text path
    ("X X X X {class}.", the exact shared-prefix encoding).

    The class-name features are computed once per class list and cached; the generator runs
    once per step (and once per evaluation pass), in float32 whatever the run's precision
    (its parameters stay float32; the frozen towers run under the run's autocast).

    Args:
        n_ctx: context tokens (4).
        d_ctx: layers with a generated context (1): with d_ctx > 1, outputs 1 .. d_ctx-1
            replace the context rows before text blocks 1 .. d_ctx-1 (deep text prompts;
            never block 0, which holds the embedded input context).
        depth: self-attention blocks of the generator after its cross-attention (0).
        heads: attention heads of the generator (4).
    """

    supports_multilabel = False  # the generator has no negative context (see the README)

    def __init__(self, n_ctx: int = 4, d_ctx: int = 1, depth: int = 0, heads: int = 4) -> None:
        super().__init__(n_ctx=n_ctx)
        for name, value, low in (("d_ctx", d_ctx, 1), ("depth", depth, 0), ("heads", heads, 1)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"learner.init_args.{name}={value}: must be an integer >= {low}")
        self.d_ctx, self.depth, self.heads = d_ctx, depth, heads

    def setup(self, clip: FrozenCLIP, classnames: list[str], seed: int) -> None:
        super(TextualPrompt, self).setup(clip, classnames, seed)  # no learned `ctx` here
        width = clip.text_width
        if width % self.heads:
            raise ConfigError(
                f"learner.init_args.heads={self.heads}: must divide {clip.name}'s text width "
                f"{width}"
            )
        layers = clip.text_layers
        if self.d_ctx > layers:
            raise ConfigError(
                f"learner.init_args.d_ctx={self.d_ctx}: {clip.name}'s text tower has only "
                f"{layers} blocks"
            )
        gen = torch.Generator().manual_seed(seed)
        self.generator = TextPromptGenerator(
            self.n_ctx, self.d_ctx, width, clip.embed_dim, self.depth, self.heads, generator=gen
        ).to(clip.device)
        tokens, ctx_pos = self._layout(clip, classnames, self.n_ctx)
        self.register_buffer("tokens", tokens, persistent=False)  # (C, L)
        self.register_buffer("ctx_pos", ctx_pos, persistent=False)  # (C, n_ctx)
        self._layouts = {tuple(self.classnames): (tokens, ctx_pos)}
        self._names: dict[tuple[str, ...], Tensor] = {}

    def _classes_changed(self) -> None:
        key = tuple(self.classnames)
        if key not in self._layouts:
            self._layouts[key] = self._layout(self.clip, self.classnames, self.n_ctx)
        device = self.generator.soft_prompt.device
        tokens, ctx_pos = self._layouts[key]
        self.tokens, self.ctx_pos = tokens.to(device), ctx_pos.to(device)

    # ---- the class-name features --------------------------------------------------------
    def name_features(self) -> Tensor:
        """E (C, D): normalised frozen text features of the bare class names (no template),
        computed once per class list."""
        key = tuple(self.classnames)
        if key not in self._names:
            names = [c.replace("_", " ") for c in self.classnames]
            with torch.no_grad(), _no_autocast(self.clip.device):
                feats = self.clip.encode_text(names)
            self._names[key] = feats.to(self.generator.soft_prompt.device, self._dtype)
        return self._names[key]

    def generate(self, names: Tensor | None = None) -> Tensor:
        """The generator's contexts (d_ctx, n_ctx, W) for class-name features `names`
        (default: the cached ones of the current class list), in the parameters' dtype
        (float32), whatever autocast is active."""
        names = self.name_features() if names is None else names
        with _no_autocast(names.device):
            return self.generator(names.to(self._dtype))

    @property
    def _dtype(self) -> torch.dtype:
        return self.generator.soft_prompt.dtype

    @staticmethod
    def _deep(contexts: Tensor) -> list[Tensor] | None:
        """The deep text prompts: outputs 1 .. d_ctx-1 (before blocks 1 .. d_ctx-1)."""
        return list(contexts[1:]) if contexts.shape[0] > 1 else None

    def text_features(self) -> Tensor:
        contexts = self.generate()
        return self.encode_context(contexts[0], deep=self._deep(contexts))

    # ---- the reference path -------------------------------------------------------------
    def reference_logits(self, images: Tensor) -> Tensor | None:
        """The public code's way: the class names re-encoded at every step (77 tokens), the
        image encoder, every class's full-length prompt."""
        clip = self.clip
        with torch.no_grad():
            tokens = clip.tokenize([c.replace("_", " ") for c in self.classnames])
            names = clip.encode_prompted_text(clip.token_embedding(tokens), tokens, truncate=False)
            f = clip.encode_image(images)
        contexts = self.generate(names)
        return self.scores(f, self.reference_text(contexts[0], deep=self._deep(contexts)))

    # ---- what travels -------------------------------------------------------------------
    def shared_keys(self) -> list[str]:
        """The whole generator (nothing is personal)."""
        return [n for n, _ in self.named_parameters()]

    def initial_state(self) -> str:
        return "a randomly initialised prompt generator (not zero-shot)"


def _no_autocast(device: torch.device):
    """A context running its body in the tensors' own dtypes (the generator in float32)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)
