"""Textual prompt learners: CoOp context tuning (PromptFL when federated) and zero-shot CLIP."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from fedclip.backbone import FrozenCLIP
from fedclip.learners.base import PromptLearner

PLACEHOLDER = "X"


class TextualPrompt(PromptLearner):
    """CoOp: a learned context in front of (or around) each class name; PromptFL federates it.

    Only the context is trained and only the context is uploaded.

    Args:
        n_ctx: number of learned context tokens (with `ctx_init`, its own token count wins).
        ctx_init: phrase whose token embeddings initialise the context, e.g. "a photo of a";
            null draws the context from N(0, 0.02^2).
        csc: class-specific context (one context per class) instead of one shared context.
        class_token_position: where the class name goes: 'end', 'middle' or 'front'.
        neg_ctx_init: multi-label only: phrase that initialises the negative context
            (DualCoOp's second context, learned and shared like the first); null uses
            "a photo without a" when ctx_init is set and it has as many tokens, else
            N(0, 0.02^2).
    """

    def __init__(
        self,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        csc: bool = False,
        class_token_position: Literal["end", "middle", "front"] = "end",
        neg_ctx_init: str | None = None,
    ) -> None:
        super().__init__()
        if n_ctx < 1:
            raise ValueError(f"TextualPrompt: n_ctx must be >= 1, got {n_ctx}")
        if class_token_position not in {"end", "middle", "front"}:
            raise ValueError(
                "TextualPrompt: class_token_position must be end, middle or front, "
                f"got {class_token_position!r}"
            )
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init or None
        self.csc = csc
        self.class_token_position = class_token_position
        self.neg_ctx_init = neg_ctx_init or None
        # Exact fast path (see uses_shared_prefix); false forces the batched path.
        self.shared_prefix = True

    def setup(self, clip: FrozenCLIP, classnames: list[str], seed: int) -> None:
        super().setup(clip, classnames, seed)
        ctx_vectors = self._initial_context(clip, seed)  # (n_ctx, W)
        if self.csc:
            ctx_vectors = ctx_vectors.unsqueeze(0).repeat(self.num_classes, 1, 1)  # (C, n, W)
        self.ctx = nn.Parameter(ctx_vectors)
        if self.multilabel:
            neg = self._negative_context(clip, seed)
            if self.csc:
                neg = neg.unsqueeze(0).repeat(self.num_classes, 1, 1)
            self.ctx_neg = nn.Parameter(neg)
        tokens, ctx_pos = self._layout(clip, classnames, self.n_ctx)
        self.register_buffer("tokens", tokens, persistent=False)  # (C, L)
        self.register_buffer("ctx_pos", ctx_pos, persistent=False)  # (C, n_ctx)
        self._layouts = {tuple(self.classnames): (tokens, ctx_pos)}

    def _classes_changed(self) -> None:
        if self.csc:
            raise ValueError(
                "TextualPrompt: class-specific contexts (csc) cannot classify other classes"
            )
        key = tuple(self.classnames)
        if key not in self._layouts:
            self._layouts[key] = self._layout(self.clip, self.classnames, self.n_ctx)
        tokens, ctx_pos = self._layouts[key]
        self.tokens, self.ctx_pos = tokens.to(self.ctx.device), ctx_pos.to(self.ctx.device)

    def _initial_context(self, clip: FrozenCLIP, seed: int) -> Tensor:
        width = clip.text_width
        if self.ctx_init:
            phrase = self.ctx_init.replace("_", " ")
            ids = clip.tokenize([phrase])
            n = int(clip.text.pool_index(ids)[0]) - 1  # tokens between SOS and EOT
            if n < 1:
                raise ValueError(f"TextualPrompt: ctx_init {self.ctx_init!r} has no tokens")
            self.n_ctx = n
            with torch.no_grad():
                return clip.token_embedding(ids)[0, 1 : 1 + n].detach().clone().float()
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(self.n_ctx, width, generator=gen) * 0.02).to(clip.device)

    def _phrase_context(self, clip: FrozenCLIP, phrase: str) -> Tensor:
        ids = clip.tokenize([phrase.replace("_", " ")])
        n = int(clip.text.pool_index(ids)[0]) - 1  # tokens between SOS and EOT
        with torch.no_grad():
            return clip.token_embedding(ids)[0, 1 : 1 + n].detach().clone().float()

    def _negative_context(self, clip: FrozenCLIP, seed: int) -> Tensor:
        phrase = self.neg_ctx_init or ("a photo without a" if self.ctx_init else None)
        if phrase is not None:
            ctx = self._phrase_context(clip, phrase)
            if ctx.shape[0] == self.n_ctx:
                return ctx
            if self.neg_ctx_init:
                raise ValueError(
                    f"TextualPrompt: neg_ctx_init {self.neg_ctx_init!r} has {ctx.shape[0]} "
                    f"tokens, the context has {self.n_ctx}"
                )
        gen = torch.Generator().manual_seed(seed + 1)
        return (torch.randn(self.n_ctx, clip.text_width, generator=gen) * 0.02).to(clip.device)

    def negative_text_features(self) -> Tensor:
        return self.encode_context(self.ctx_neg)

    def _layout(self, clip: FrozenCLIP, classnames: list[str], n_ctx: int) -> tuple[Tensor, Tensor]:
        """Token ids of every class's prompt and the positions that the context fills."""
        names = [c.replace("_", " ") for c in classnames]
        prefix = " ".join([PLACEHOLDER] * n_ctx)
        tokens = clip.tokenize([f"{prefix} {name}." for name in names])  # (C, 77)
        eot = clip.text.pool_index(tokens)  # (C,)
        rows, positions = [], []
        for c in range(len(names)):
            t = tokens[c]
            name_len = int(eot[c]) - 2 - n_ctx  # tokens of the name (without '.')
            sos, ctx_ids = t[:1], t[1 : 1 + n_ctx]
            name_ids, rest = t[1 + n_ctx : 1 + n_ctx + name_len], t[1 + n_ctx + name_len :]
            if self.class_token_position == "end":
                order = [sos, ctx_ids, name_ids, rest]
                pos = torch.arange(1, 1 + n_ctx)
            elif self.class_token_position == "front":
                order = [sos, name_ids, ctx_ids, rest]
                pos = torch.arange(1 + name_len, 1 + name_len + n_ctx)
            else:
                half = n_ctx // 2
                order = [sos, ctx_ids[:half], name_ids, ctx_ids[half:], rest]
                pos = torch.cat(
                    [
                        torch.arange(1, 1 + half),
                        torch.arange(1 + half + name_len, 1 + n_ctx + name_len),
                    ]
                )
            rows.append(torch.cat(order))
            positions.append(pos)
        tokens = torch.stack(rows)
        if clip.text.truncatable:
            # Causal tower: nothing after the last EOT reaches any EOT output (exact).
            tokens = tokens[:, : int(clip.text.pool_index(tokens).max()) + 1]
        return tokens, torch.stack(positions).to(tokens.device)

    def prompt_embeddings(self, ctx: Tensor | None = None) -> Tensor:
        """(C, L, W) input embeddings with a context in place: the learned one, or `ctx`
        (same shape, e.g. another client's context)."""
        with torch.no_grad():
            embeds = self.clip.token_embedding(self.tokens)  # (C, L, W)
        ctx = self.ctx if ctx is None else ctx
        if not self.csc:
            ctx = ctx.unsqueeze(0).expand(self.num_classes, -1, -1)  # (C, n_ctx, W)
        index = self.ctx_pos.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])  # (C, n_ctx, W)
        return embeds.scatter(1, index, ctx.to(embeds.dtype))

    def uses_shared_prefix(self) -> bool:
        """The exact shared-prefix path applies: one context for every class, in front of
        the class name, on a causal text tower with EOT pooling."""
        return (
            self.shared_prefix
            and not self.csc
            and self.class_token_position == "end"
            and self.clip.text.shared_prefix
        )

    def encode_context(self, ctx: Tensor) -> Tensor:
        """Normalised class features (C, D) under context `ctx` (the learned one or another
        client's): [SOS] + context are encoded once and shared by every class when exact."""
        if not self.uses_shared_prefix():
            return self.clip.encode_prompted_text(self.prompt_embeddings(ctx), self.tokens)
        n = self.n_ctx
        with torch.no_grad():
            sos = self.clip.token_embedding(self.tokens[:1, :1])[0]  # (1, W)
            suffix = self.clip.token_embedding(self.tokens[:, 1 + n :])  # (C, S, W)
        prefix = torch.cat([sos, ctx.to(sos.dtype)], dim=0)  # (1 + n, W)
        return self.clip.encode_shared_prefix(prefix, suffix, self.tokens[:, 1 + n :])

    def text_features(self) -> Tensor:
        return self.encode_context(self.ctx)


class ZeroShot(PromptLearner):
    """Zero-shot CLIP: hand-written templates, nothing trained, nothing sent (the baseline row).

    Args:
        templates: sentence templates with '{}' for the class name; their normalised text
            features are averaged per class.
        negative_templates: multi-label only: the negative prompts ("a photo without a {}.").
    """

    def __init__(
        self, templates: list[str] | None = None, negative_templates: list[str] | None = None
    ) -> None:
        super().__init__()
        self.templates = list(templates or ["a photo of a {}."])
        self.negative_templates = list(negative_templates or ["a photo without a {}."])
        if not all("{}" in t for t in self.templates + self.negative_templates):
            raise ValueError("ZeroShot: every template needs a '{}' for the class name")

    def setup(self, clip: FrozenCLIP, classnames: list[str], seed: int) -> None:
        super().setup(clip, classnames, seed)
        self._features: dict[tuple[str, ...], Tensor] = {}
        self.register_buffer("class_features", self._template_features(), persistent=False)

    def _template_features(self, negative: bool = False) -> Tensor:
        key = (str(negative), *self.classnames)
        if key not in self._features:
            names = [c.replace("_", " ") for c in self.classnames]
            templates = self.negative_templates if negative else self.templates
            feats = torch.stack(
                [self.clip.encode_text([t.format(n) for n in names]) for t in templates]
            )  # (T, C, D)
            mean = feats.mean(0)
            self._features[key] = mean / mean.norm(dim=-1, keepdim=True)
        return self._features[key]

    def _classes_changed(self) -> None:
        self.class_features = self._template_features()

    def negative_text_features(self) -> Tensor:
        return self._template_features(negative=True)

    def text_features(self) -> Tensor:
        return self.class_features
