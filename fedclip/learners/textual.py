"""Textual prompt learners: CoOp context tuning (PromptFL when federated) and zero-shot CLIP."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from fedclip.backbone import FrozenCLIP
from fedclip.errors import BackboneError, ConfigError
from fedclip.learners.base import PromptLearner
from fedclip.templates import POSITIONAL, check_templates

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
            raise ConfigError(f"TextualPrompt: n_ctx must be >= 1, got {n_ctx}")
        if class_token_position not in {"end", "middle", "front"}:
            raise ConfigError(
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
            raise ConfigError(
                "TextualPrompt: class-specific contexts (csc) cannot classify other classes"
            )
        key = tuple(self.classnames)
        if key not in self._layouts:
            self._layouts[key] = self._layout(self.clip, self.classnames, self.n_ctx)
        tokens, ctx_pos = self._layouts[key]
        self.tokens, self.ctx_pos = tokens.to(self.ctx.device), ctx_pos.to(self.ctx.device)

    def _initial_context(self, clip: FrozenCLIP, seed: int) -> Tensor:
        if self.ctx_init:
            ctx = self._phrase_context(clip, self.ctx_init)
            if ctx.shape[0] < 1:
                raise ConfigError(f"TextualPrompt: ctx_init {self.ctx_init!r} has no tokens")
            self.n_ctx = ctx.shape[0]
            return ctx
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(self.n_ctx, clip.text_width, generator=gen) * 0.02).to(clip.device)

    @staticmethod
    def _phrase_context(clip: FrozenCLIP, phrase: str) -> Tensor:
        """The input embeddings (n, W) of a phrase's content tokens (no start/end token)."""
        ids = clip.tokenize([phrase.replace("_", " ")])
        start, end = clip.layout.offset, int(clip.layout.content_end(ids)[0])
        with torch.no_grad():
            return clip.token_embedding(ids)[0, start:end].detach().clone().float()

    def _negative_context(self, clip: FrozenCLIP, seed: int) -> Tensor:
        phrase = self.neg_ctx_init or ("a photo without a" if self.ctx_init else None)
        if phrase is not None:
            ctx = self._phrase_context(clip, phrase)
            if ctx.shape[0] == self.n_ctx:
                return ctx
            if self.neg_ctx_init:
                raise ConfigError(
                    f"TextualPrompt: neg_ctx_init {self.neg_ctx_init!r} has {ctx.shape[0]} "
                    f"tokens, the context has {self.n_ctx}"
                )
        gen = torch.Generator().manual_seed(seed + 1)
        return (torch.randn(self.n_ctx, clip.text_width, generator=gen) * 0.02).to(clip.device)

    def negative_text_features(self) -> Tensor:
        return self.encode_context(self.ctx_neg)

    def _layout(self, clip: FrozenCLIP, classnames: list[str], n_ctx: int) -> tuple[Tensor, Tensor]:
        """Token ids of every class's prompt and the positions that the context fills.

        The prompt is "X X ... X {name}." tokenised by the backbone's own tokenizer; where
        the content starts and ends comes from its layout (a start token or not, the end
        token), and the placeholders are found by their id, so this holds for CLIP's
        tokenizer and SigLIP's alike."""
        names = [c.replace("_", " ") for c in classnames]
        length = clip.tokenize(["x"]).shape[1]
        if n_ctx + clip.layout.offset >= length - 1:  # before tokenizing n_ctx placeholders
            raise ConfigError(
                f"learner.init_args.n_ctx={n_ctx}: the context tokens do not fit {clip.name}'s "
                f"{length}-token text context; use a smaller n_ctx"
            )
        prefix = " ".join([PLACEHOLDER] * n_ctx)
        tokens = clip.tokenize([f"{prefix} {name}." for name in names])  # (C, L)
        layout, length = clip.layout, tokens.shape[1]
        off = layout.offset
        end = layout.content_end(tokens)  # (C,)
        ph = int(clip.tokenize([PLACEHOLDER])[0, off])
        # tokens of the final '.' (SigLIP's cleaning drops punctuation: 0)
        dot = int(layout.content_end(clip.tokenize(["x."]))[0]) - int(
            layout.content_end(clip.tokenize(["x"]))[0]
        )
        if bool((tokens[:, off : off + n_ctx] != ph).any()):
            raise BackboneError(
                f"TextualPrompt: {clip.name}'s tokenizer does not give one token per context "
                f"placeholder {PLACEHOLDER!r}"
            )
        if int(end.max()) >= length - 1:
            c = int(end.argmax())
            raise ConfigError(
                f"TextualPrompt: {n_ctx} context tokens + class {classnames[c]!r} do not fit "
                f"{clip.name}'s {length}-token context; use a smaller n_ctx"
            )
        rows, positions = [], []
        for c in range(len(names)):
            t = tokens[c]
            name_len = int(end[c]) - off - n_ctx - dot  # tokens of the name
            head, ctx_ids = t[:off], t[off : off + n_ctx]
            name_ids, rest = t[off + n_ctx : off + n_ctx + name_len], t[off + n_ctx + name_len :]
            if self.class_token_position == "end":
                order = [head, ctx_ids, name_ids, rest]
                pos = torch.arange(off, off + n_ctx)
            elif self.class_token_position == "front":
                order = [head, name_ids, ctx_ids, rest]
                pos = torch.arange(off + name_len, off + name_len + n_ctx)
            else:
                half = n_ctx // 2
                order = [head, ctx_ids[:half], name_ids, ctx_ids[half:], rest]
                pos = torch.cat(
                    [
                        torch.arange(off, off + half),
                        torch.arange(off + half + name_len, off + n_ctx + name_len),
                    ]
                )
            rows.append(torch.cat(order))
            positions.append(pos)
        tokens = torch.stack(rows)
        if clip.text.truncatable:
            # Causal tower: nothing after the last EOT reaches any EOT output (exact).
            tokens = tokens[:, : int(clip.text.pool_index(tokens).max()) + 1]
        return tokens, torch.stack(positions).to(tokens.device)

    def context_layout(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        """(token ids (C, L), context positions (C, n)) of the prompts that `ctx` fills:
        the one layout of the learned context's length here; learners with contexts of
        several lengths return the layout of ctx's length."""
        return self.tokens, self.ctx_pos

    def prompt_embeddings(self, ctx: Tensor | None = None, tokens: Tensor | None = None) -> Tensor:
        """(C, L, W) input embeddings with a context in place: the learned one, or `ctx`
        (e.g. another client's context), in its layout (`tokens`: those ids instead of the
        layout's, e.g. padded to the full length)."""
        ctx = self.ctx if ctx is None else ctx
        own, ctx_pos = self.context_layout(ctx)
        with torch.no_grad():
            embeds = self.clip.token_embedding(own if tokens is None else tokens)  # (C, L, W)
        if not self.csc:
            ctx = ctx.unsqueeze(0).expand(self.num_classes, -1, -1)  # (C, n_ctx, W)
        index = ctx_pos.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])  # (C, n_ctx, W)
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

    def encode_context(self, ctx: Tensor, deep: list[Tensor] | None = None) -> Tensor:
        """Normalised class features (C, D) under context `ctx` (the learned one or another
        client's): [SOS] + context are encoded once and shared by every class when exact.
        deep: deep text prompts, one (n_ctx, W) tensor per text block 1 .. len(deep),
        replacing the context's hidden states before that block (MaPLe, IVLP); exact on the
        shared-prefix path too (the prefix stays class-independent at every layer)."""
        tokens, ctx_pos = self.context_layout(ctx)
        if not self.uses_shared_prefix():
            return self.clip.encode_prompted_text(
                self.prompt_embeddings(ctx), tokens, deep=deep, deep_pos=ctx_pos
            )
        start = self.clip.layout.offset + ctx.shape[-2]
        with torch.no_grad():
            head = self.clip.token_embedding(tokens[0, : self.clip.layout.offset])  # (0|1, W)
            suffix = self.clip.token_embedding(tokens[:, start:])  # (C, S, W)
        prefix = torch.cat([head, ctx.to(head.dtype)], dim=0)  # ([1 +] n, W)
        return self.clip.encode_shared_prefix(prefix, suffix, tokens[:, start:], deep=deep)

    def encode_contexts(self, ctxs: Tensor, chunk: int | None = None) -> Tensor:
        """Per-image class features (B, C, D), normalised, under one context per image
        (CoCoOp): ctxs (B, n_ctx, W). On the shared-prefix path each image's [SOS] + context
        runs once and its C class suffixes attend to it; otherwise the B*C full prompts run
        batched. chunk: images per piece (bounds the chunk*C sequences held at once)."""
        b = ctxs.shape[0]
        tokens, ctx_pos = self.context_layout(ctxs[0])
        if self.uses_shared_prefix():
            off = self.clip.layout.offset
            start = off + ctxs.shape[-2]
            with torch.no_grad():
                head = self.clip.token_embedding(tokens[0, :off])  # (0|1, W)
                suffix = self.clip.token_embedding(tokens[:, start:])  # (C, S, W)
            heads = head.unsqueeze(0).expand(b, -1, -1)  # (B, 0|1, W)
            prefixes = torch.cat([heads, ctxs.to(head.dtype)], dim=1)  # (B, [1 +] n, W)
            return self.clip.encode_shared_prefixes(
                prefixes, suffix, tokens[:, start:], chunk=chunk
            )
        step = b if not chunk else max(1, int(chunk))
        out = []
        for a in range(0, b, step):
            piece = ctxs[a : a + step]  # (b', n, W)
            embeds = torch.stack([self.prompt_embeddings(c) for c in piece])  # (b', C, L, W)
            flat = embeds.flatten(0, 1)  # (b' * C, L, W)
            feats = self.clip.encode_prompted_text(flat, tokens.repeat(piece.shape[0], 1))
            out.append(feats.view(piece.shape[0], self.num_classes, -1))
        return torch.cat(out)  # (B, C, D)

    def text_features(self) -> Tensor:
        return self.encode_context(self.ctx)

    def initial_state(self) -> str:
        if not self.ctx_init:
            return "random context (not zero-shot)"
        if self.class_token_position == "end":
            return f"zero-shot, '{self.ctx_init} {{class}}.'"
        return f"the context '{self.ctx_init}', class name {self.class_token_position}"

    def reference_text(self, ctx: Tensor, deep: list[Tensor] | None = None) -> Tensor:
        """Normalised class features (C, D) under `ctx` (and deep prompts), the reference
        way: every class's full-length prompt (the layout padded back to the tokenizer's
        length as it pads, 77 tokens on CLIP), no truncation, no shared prefix."""
        tokens, ctx_pos = self.context_layout(ctx)
        length = self.clip.tokenize(["x"]).shape[1]
        full = torch.nn.functional.pad(
            tokens, (0, length - tokens.shape[1]), value=self.clip.layout.pad
        )
        embeds = self.prompt_embeddings(ctx, full)
        return self.clip.encode_prompted_text(
            embeds, full, truncate=False, deep=deep, deep_pos=ctx_pos
        )

    def reference_logits(self, images: Tensor) -> Tensor | None:
        """The image encoder and the full-length prompts at every step."""
        if self.multilabel:
            return None
        with torch.no_grad():
            f = self.clip.encode_image(images)
        return self.scores(f, self.reference_text(self.ctx))

    def shared_keys(self) -> list[str]:
        """The context (and the negative context of multi-label tasks)."""
        return ["ctx", "ctx_neg"] if self.multilabel else ["ctx"]


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
        self.templates = list(["a photo of a {}."] if templates is None else templates)
        self.negative_templates = list(
            ["a photo without a {}."] if negative_templates is None else negative_templates
        )
        for arg in ("templates", "negative_templates"):
            check_templates("ZeroShot", arg, getattr(self, arg), [POSITIONAL], [POSITIONAL])

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

    def shared_keys(self) -> list[str]:
        return []  # nothing is learnt

    def initial_state(self) -> str:
        shown = ", ".join(repr(t.replace("{}", "{class}")) for t in self.templates[:2])
        more = f" and {len(self.templates) - 2} more" if len(self.templates) > 2 else ""
        return f"zero-shot, {shown}{more}"
