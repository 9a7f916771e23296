"""The text path of FrozenCLIP: token layout, the tower's hooks, prompted text encoding.

Learners replace rows of the token embeddings by learned prompts and encode them here:
with exact truncation after the end token and the shared-prefix path where the tower allows
them (METHODS.md section 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedclip.errors import BackboneError


@dataclass(frozen=True)
class TokenLayout:
    """Where a tokenizer puts things, read from what it makes of '' and 'x'.

    bos: the start token (None when there is none, as in SigLIP); offset: where the content
    starts (1 with a start token); eos: the token that ends the content; pad: what fills
    the rest up to the context length (SigLIP's T5 pads with its end token).
    """

    bos: int | None
    eos: int
    pad: int

    @property
    def offset(self) -> int:
        return int(self.bos is not None)

    @classmethod
    def probe(cls, tokenizer) -> TokenLayout:
        empty, one = tokenizer([""])[0], tokenizer(["x"])[0]
        bos = int(empty[0]) if int(empty[0]) == int(one[0]) else None
        return cls(bos=bos, eos=int(empty[int(bos is not None)]), pad=int(empty[-1]))

    def content_end(self, tokens: Tensor) -> Tensor:
        """(N, L) token ids -> (N,) index of each row's end token (first eos after the
        start), i.e. offset + the number of content tokens."""
        after = torch.arange(tokens.shape[1], device=tokens.device) >= self.offset
        return ((tokens == self.eos) & after).int().argmax(dim=-1)


class TextTower:
    """Uniform view of an open_clip text transformer (built-in CLIP or TextTransformer)."""

    def __init__(self, model: nn.Module, name: str):
        owner = model.text if hasattr(model, "text") else model
        missing = [
            a
            for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")
            if not hasattr(owner, a)
        ]
        if missing:
            raise BackboneError(
                f"{name}: its text tower ({type(owner).__name__}) has no token-level hooks "
                f"({', '.join(missing)}), so textual prompts cannot be injected"
            )
        if getattr(owner, "cls_emb", None) is not None or getattr(owner, "use_pad_mask", False):
            raise BackboneError(
                f"{name}: text towers with a class token or padding mask are not supported "
                "by prompted text encoding yet"
            )
        self.owner = owner
        self.token_embedding = owner.token_embedding
        self.positional_embedding = owner.positional_embedding
        self.transformer = owner.transformer
        self.ln_final = owner.ln_final
        self.text_projection = owner.text_projection
        self.attn_mask = getattr(owner, "attn_mask", None)
        self.pool_type = getattr(owner, "text_pool_type", None) or getattr(
            owner, "pool_type", "argmax"
        )
        self.eos_id = getattr(owner, "text_eos_id", None) or getattr(owner, "eos_id", None)
        self.causal = self.attn_mask is not None
        # Truncating after the pooled token is exact only when no earlier position can see
        # later ones (causal mask) and the output is read at a token index.
        self.truncatable = self.causal and self.pool_type in {"argmax", "eos"}
        # The shared-prefix path re-runs open_clip's blocks piecewise; only for the plain
        # pre-norm CLIP block layout, batch-first.
        blocks = list(getattr(self.transformer, "resblocks", []))
        self.shared_prefix = (
            self.truncatable
            and bool(blocks)
            and getattr(self.transformer, "batch_first", False)
            and all(
                type(b) is open_clip.transformer.ResidualAttentionBlock
                and not hasattr(b, "ln_1_kv")
                and isinstance(b.attn, nn.MultiheadAttention)
                and b.attn._qkv_same_embed_dim
                and b.attn.batch_first
                and b.attn.dropout == 0
                for b in blocks
            )
        )

    def pool_index(self, tokens: Tensor) -> Tensor:
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "last":
            return torch.full_like(tokens[:, 0], tokens.shape[1] - 1)
        if self.pool_type == "first":
            return torch.zeros_like(tokens[:, 0])
        raise BackboneError(f"text pooling '{self.pool_type}' is not supported")


class TextPath:
    """FrozenCLIP's text methods (a mixin: needs `self.text`, a TextTower, and
    `self.tokenizer`, `self.device`, `self.text_sequences_encoded`)."""

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    def token_embedding(self, tokens: Tensor) -> Tensor:
        """(N, L) token ids -> (N, L, W) input embeddings of the frozen text tower."""
        return self.text.token_embedding(tokens)

    @property
    def text_layers(self) -> int:
        """The number of blocks of the text transformer (the deepest prompt depth)."""
        return len(self._text_blocks())

    def _text_blocks(self) -> list:
        transformer = self.text.transformer
        blocks = getattr(transformer, "resblocks", None)
        if blocks is None or not getattr(transformer, "batch_first", False):
            raise BackboneError(
                f"{self.name}: its text transformer ({type(transformer).__name__}) is not a "
                "batch-first stack of blocks, so deep text prompts cannot be injected"
            )
        return list(blocks)

    def _check_deep(self, deep: Sequence[Tensor]) -> list[Tensor]:
        deep = list(deep)
        layers = len(self._text_blocks())
        if len(deep) > layers - 1:
            raise ValueError(
                f"{len(deep)} deep text prompt layers, but {self.name}'s text tower has "
                f"{layers} blocks (at most {layers - 1} after the first)"
            )
        return deep

    def encode_prompted_text(
        self,
        embeds: Tensor,
        tokens: Tensor,
        normalize: bool = True,
        truncate: bool = True,
        deep: Sequence[Tensor] | None = None,
        deep_pos: Tensor | None = None,
    ) -> Tensor:
        """Encode token embeddings in which some rows were replaced by learned prompts.

        embeds: (N, L, W) input embeddings; tokens: (N, L) the token ids that say where each
        sequence's pooled (EOT) token sits. With a causal tower, positions after the last EOT
        never influence it, so the sequences are cut to max(EOT) + 1 first (exact).
        deep: deep text prompts, one (n, W) or (N, n, W) tensor per block 1 .. len(deep)
        (0-based): before that block the hidden states at `deep_pos` (N, n), the context's
        positions, are replaced by it (no position embedding: they are hidden states).
        """
        tower = self.text
        pool_at = tower.pool_index(tokens)  # (N,)
        length = tokens.shape[1]
        if truncate and tower.truncatable:
            length = int(pool_at.max()) + 1
        cast = tower.transformer.get_cast_dtype()
        x = embeds[:, :length].to(cast) + tower.positional_embedding[:length].to(cast)
        mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None
        if not deep:
            x = tower.transformer(x, attn_mask=mask)  # (N, length, W)
            return self._pool_project(x, pool_at, normalize)
        deep = self._check_deep(deep)
        if deep_pos is None:
            raise ValueError("deep text prompts need deep_pos, the context positions (N, n)")
        n, w = x.shape[0], x.shape[-1]
        index = deep_pos.to(x.device).unsqueeze(-1).expand(n, -1, w)  # (N, n, W)
        for i, block in enumerate(self._text_blocks()):
            if 1 <= i <= len(deep):
                rows = deep[i - 1].to(x.dtype)
                rows = rows.expand(n, -1, -1) if rows.dim() == 2 else rows  # (N, n, W)
                x = x.scatter(1, index, rows)
            x = block(x, attn_mask=mask)
        return self._pool_project(x, pool_at, normalize)

    def _pool_project(self, x: Tensor, pool_at: Tensor, normalize: bool) -> Tensor:
        """Transformer output (N, L, W) -> (N, D): ln_final, the pooled row, the projection."""
        tower = self.text
        x = tower.ln_final(x)
        if tower.pool_type in {"argmax", "eos"}:
            x = x[torch.arange(x.shape[0], device=x.device), pool_at]  # (N, W)
        elif tower.pool_type == "last":
            x = x[:, -1]
        else:
            x = x[:, 0]
        proj = tower.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        self.text_sequences_encoded += int(x.shape[0])
        return F.normalize(x, dim=-1) if normalize else x

    def encode_shared_prefix(
        self,
        prefix: Tensor,
        suffix: Tensor,
        suffix_tokens: Tensor,
        normalize: bool = True,
        deep: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Encode N sequences that all start with the same P input embeddings.

        prefix: (P, W) embeddings shared by every sequence (e.g. [SOS] + a learned context);
        suffix: (N, S, W) the rest of each sequence; suffix_tokens: (N, S) its token ids (the
        EOT must be in the suffix). Under the causal mask the prefix's hidden states do not
        depend on what follows, so they are computed once (batch of one) and every suffix
        attends to their keys and values layer by layer, as in the full sequence: the same
        features as `encode_prompted_text` on the concatenation, to float rounding, for a
        fraction of the work and activation memory. Needs `text.shared_prefix`.
        deep: deep text prompts, one (n, W) tensor per block 1 .. len(deep): before that
        block the prefix's last n rows (the context) are replaced by it; the prefix stays
        class-independent at every layer, so this is exact too.
        """
        return self.encode_shared_prefixes(
            prefix.unsqueeze(0), suffix, suffix_tokens, normalize, deep
        )[0]

    def encode_shared_prefixes(
        self,
        prefixes: Tensor,
        suffix: Tensor,
        suffix_tokens: Tensor,
        normalize: bool = True,
        deep: Sequence[Tensor] | None = None,
        chunk: int | None = None,
    ) -> Tensor:
        """`encode_shared_prefix` for G prefixes at once (CoCoOp: one context per image).

        prefixes: (G, P, W); suffix: (C, S, W) and suffix_tokens (C, S), the same C suffixes
        after every prefix -> (G, C, D): the G prefixes run once, as a batch, and each of the
        G*C suffixes attends to its own prefix's keys and values. deep: one (n, W) or
        (G, n, W) tensor per block 1 .. len(deep) replacing the prefixes' last n rows.
        chunk: prefixes per piece (bounds the G*C suffix activations held at once).
        """
        tower = self.text
        if not tower.shared_prefix:
            raise BackboneError(f"{self.name}: its text tower has no exact shared-prefix path")
        deep = self._check_deep(deep or [])
        g, p, _ = prefixes.shape
        c = suffix.shape[0]
        pool_at = tower.pool_index(suffix_tokens)  # (C,) inside the suffix
        s = int(pool_at.max()) + 1  # nothing after the last EOT reaches any EOT
        cast = tower.transformer.get_cast_dtype()
        pos = tower.positional_embedding.to(cast)
        full = tower.attn_mask[: p + s, : p + s]
        mask_p = full[:p, :p]
        mask_s = full[p : p + s, : p + s]  # suffix rows: all of the prefix, causal within
        xs0 = suffix[:, :s].to(cast) + pos[p : p + s]  # (C, S, W)
        step = g if not chunk else max(1, int(chunk))
        out = []
        for a in range(0, g, step):
            piece = prefixes[a : a + step]
            b = piece.shape[0]
            xp = piece.to(cast) + pos[:p]  # (b, P, W)
            xs = xs0.unsqueeze(0).expand(b, -1, -1, -1).reshape(b * c, s, -1)  # (b*C, S, W)
            for i, block in enumerate(tower.transformer.resblocks):
                if 1 <= i <= len(deep):
                    rows = deep[i - 1].to(cast)
                    rows = rows[a : a + step] if rows.dim() == 3 else rows.expand(b, -1, -1)
                    n = rows.shape[1]
                    xp = torch.cat([xp[:, : p - n], rows], dim=1)  # (b, P, W)
                hp, hs = block.ln_1(xp), block.ln_1(xs)
                xs = xs + block.ls_1(self._suffix_attention(block.attn, hp, hs, mask_s))
                xs = xs + block.ls_2(block.mlp(block.ln_2(xs)))
                xp = block(xp, attn_mask=mask_p)
            feats = self._pool_project(xs, pool_at.repeat(b), normalize)  # (b*C, D)
            out.append(feats.view(b, c, -1))
        return torch.cat(out)  # (G, C, D)

    @staticmethod
    def _suffix_attention(attn: nn.MultiheadAttention, hp: Tensor, hs: Tensor, mask: Tensor):
        """Multi-head attention of the suffixes hs (G*n, S, W) over [own prefix; own
        suffix], with open_clip's weights; each of the G prefixes hp (G, P, W) is projected
        to keys and values once, not once per sequence."""
        n, s, w = hs.shape
        g, p = hp.shape[0], hp.shape[1]
        h = attn.num_heads
        dh = w // h
        weight, bias = attn.in_proj_weight, attn.in_proj_bias
        wq, wk, wv = weight.split(w)
        bq, bk, bv = bias.split(w) if bias is not None else (None, None, None)

        def heads(x: Tensor) -> Tensor:  # (B, L, W) -> (B, h, L, dh)
            return x.view(x.shape[0], x.shape[1], h, dh).transpose(1, 2)

        def per_sequence(x: Tensor) -> Tensor:  # (G, h, P, dh) -> (G*n/G, h, P, dh)
            return x.unsqueeze(1).expand(g, n // g, h, p, dh).reshape(n, h, p, dh)

        q = heads(F.linear(hs, wq, bq))  # (N, h, S, dh)
        kp, vp = heads(F.linear(hp, wk, bk)), heads(F.linear(hp, wv, bv))  # (G, h, P, dh)
        k = torch.cat([per_sequence(kp), heads(F.linear(hs, wk, bk))], dim=2)
        v = torch.cat([per_sequence(vp), heads(F.linear(hs, wv, bv))], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))  # (N,h,S,dh)
        return attn.out_proj(out.transpose(1, 2).reshape(n, s, w))

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> Tensor:
        """Frozen text features of plain sentences, (N, D)."""
        tokens = self.tokenize(texts)
        return self.encode_prompted_text(self.token_embedding(tokens), tokens, normalize)
