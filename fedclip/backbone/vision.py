"""The vision path of FrozenCLIP: pooled image features, visual prompt tokens.

The token towers (open_clip's VisionTransformer, timm's VisionTransformer and Eva trunks)
are re-run stage by stage, exactly as their own forwards run them, so prompt tokens can be
appended to the sequence; `fedclip.backbone.dense` reads every output token of the same
staged forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor

from fedclip.errors import BackboneError


@dataclass(frozen=True)
class VisualTokens:
    """A batch's input tokens of the vision transformer, as the tower's own forward
    builds them: after the position embedding, before the pre-norm.

    tokens: (B, num_prefix + N, V), first the prefix tokens (class and register tokens:
    1 in open_clip's ViT, EVA02 and PE-Core, 0 in SigLIP), then the N patch tokens.
    rope: an EVA tower's rotary table for the N patches, (N, 2R) or, with per-depth
    rope, (depth, heads, N, 2R); None for towers without rotary embeddings.
    """

    tokens: Tensor
    num_prefix: int
    rope: Tensor | None = None

    @property
    def patches(self) -> Tensor:
        """(B, N, V): the patch tokens alone, without the prefix tokens."""
        return self.tokens[:, self.num_prefix :]


class VisionPath:
    """FrozenCLIP's image methods (a mixin: needs `self.model`, `self.name` and the
    counter `self.images_encoded`)."""

    VisualTokens = VisualTokens  # FrozenCLIP.VisualTokens, as before the package split

    def _vision_tower(self) -> tuple[str | None, str, str]:
        """(kind, tower, why not) of the vision tower.

        kind says how the tower's tokens are re-run: 'openclip' (open_clip's
        VisionTransformer), 'vit' or 'eva' (a TimmModel around timm's VisionTransformer or
        Eva, whose forward `encode_image_tokens` re-runs stage by stage); None when they
        cannot be, with the reason. A subclass that overrides the forward is refused: its
        stages are unknown.
        """
        from open_clip.timm_model import TimmModel
        from timm.models.eva import Eva
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        visual = self.model.visual
        oc_vit = open_clip.transformer.VisionTransformer
        not_mirrored = "builds its tokens in a forward of its own that fedclip does not mirror"
        if isinstance(visual, oc_vit):
            cls = type(visual)
            ok = cls.forward is oc_vit.forward and cls._embeds is oc_vit._embeds
            return ("openclip" if ok else None), cls.__name__, not_mirrored
        if isinstance(visual, TimmModel):
            trunk = visual.trunk
            cls = type(trunk)
            tower = f"timm {cls.__name__}"
            for base, kind in ((TimmViT, "vit"), (Eva, "eva")):
                if isinstance(trunk, base):
                    ok = (
                        type(visual).forward is TimmModel.forward
                        and cls.forward is base.forward
                        and cls.forward_features is base.forward_features
                    )
                    return (kind if ok else None), tower, not_mirrored
            return None, tower, "has no token sequence"
        return None, type(visual).__name__, "has no token sequence"

    @property
    def accepts_visual_prompts(self) -> bool:
        """Whether visual prompt tokens can be injected into the vision tower."""
        return self._vision_tower()[0] is not None

    def _token_kind(self) -> str:
        """The tower's kind (see `_vision_tower`); a one-line BackboneError that names the
        model, its tower and what it lacks when prompts cannot go in. (It names no learner:
        which learners prompt the image is the method registry's business.)"""
        kind, tower, why = self._vision_tower()
        if kind is None:
            raise BackboneError(
                f"{self.name}: its vision tower ({tower}) {why}, so it cannot take visual "
                "prompt tokens; learners that only prompt the text work on it"
            )
        return kind

    def check_visual_prompts(self) -> None:
        """Raise the one-line BackboneError of `_token_kind` unless the vision tower can take
        visual prompt tokens (learners call this at setup, before any training)."""
        self._token_kind()

    @property
    def vision_width(self) -> int:
        """V, the width of the vision transformer's tokens (and of visual prompts)."""
        if self._token_kind() == "openclip":
            return int(self.model.visual.conv1.out_channels)
        return int(self.model.visual.trunk.embed_dim)

    def patch_tokens(self, images: Tensor) -> VisualTokens:
        """(B, 3, H, W) -> the tower's input tokens (B, num_prefix + N, V), made by the
        tower's own stages, as in its forward: patch embedding, prefix tokens, position
        embedding (EVA: and its rotary table), patch dropout (a no-op: always eval). The
        pre-norm is left to `encode_image_tokens`, which then covers the prompts too."""
        return self._patch_tokens(images, self._token_kind())

    def _patch_tokens(self, images: Tensor, kind: str) -> VisualTokens:
        visual = self.model.visual
        if kind == "openclip":
            x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (B, V, g, g)
            x = x.flatten(2).transpose(1, 2)  # (B, N, V)
            cls_tok = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
            x = torch.cat([cls_tok.to(x.dtype), x], dim=1)  # (B, 1 + N, V)
            x = x + visual.positional_embedding.to(x.dtype)
            return VisualTokens(visual.patch_dropout(x), num_prefix=1)
        trunk = visual.trunk
        # (B, N, V), or (B, h, w, V) when the trunk takes dynamic image sizes
        x = trunk.patch_embed(images.to(next(trunk.parameters()).dtype))
        if kind == "eva":
            x, rope = trunk._pos_embed(x)  # (B, n_pre + N, V); EVA's patch dropout is in here
            return VisualTokens(x, trunk.num_prefix_tokens, rope)
        x = trunk.patch_drop(trunk._pos_embed(x))  # (B, n_pre + N, V)
        return VisualTokens(x, trunk.num_prefix_tokens)

    @staticmethod
    def _identity_rope(rope: Tensor, p: int) -> Tensor:
        """EVA's rotary table (..., N, 2R) extended by p rows [sin 0 | cos 1] -> (..., N + p,
        2R). timm rotates every token after the prefix and needs one row per token; these
        rows rotate by nothing (x cos + rot(x) sin = x exactly), so the appended prompts
        carry no position and the patches keep their own rotations."""
        shape = (*rope.shape[:-2], p, rope.shape[-1] // 2)
        identity = torch.cat([rope.new_zeros(shape), rope.new_ones(shape)], dim=-1)  # (.., p, 2R)
        return torch.cat([rope, identity], dim=-2)

    def _blocks(self, kind: str) -> list:
        """The vision tower's blocks, in order (each takes and returns (B, L, V))."""
        visual = self.model.visual
        if kind == "openclip":
            transformer = visual.transformer
            if not getattr(transformer, "batch_first", True):
                raise BackboneError(f"{self.name}: its vision transformer is not batch-first")
            return list(transformer.resblocks)
        return list(visual.trunk.blocks)

    @property
    def vision_layers(self) -> int:
        """The number of blocks of the vision transformer (the deepest prompt depth)."""
        return len(self._blocks(self._token_kind()))

    def _run_blocks(
        self,
        kind: str,
        tokens: VisualTokens,
        x: Tensor,
        prompts: Tensor | None,
        deep: list[Tensor],
        after_norm: bool,
    ) -> Tensor:
        """The tower's pre-norm and blocks over the image's tokens x (B, L, V) with the
        prompts (B, P, V) appended (before the pre-norm, or after it with `after_norm`) and,
        before block i = 1 .. len(deep), the prompt rows replaced by deep[i - 1] (B, P, V)
        (EVA: the prompts get identity rotary rows) -> the last block's output (B, L + P, V)."""
        visual = self.model.visual
        norm = visual.ln_pre if kind == "openclip" else visual.trunk.norm_pre
        p = 0 if prompts is None else int(prompts.shape[1])
        if p and not after_norm:
            x = norm(torch.cat([x, prompts.to(x.dtype)], dim=1))  # (B, L + P, V)
        else:
            x = norm(x)
            if p:
                x = torch.cat([x, prompts.to(x.dtype)], dim=1)  # (B, L + P, V)
        blocks = self._blocks(kind)
        if kind == "openclip" and not deep:
            return visual.transformer(x)
        if kind == "vit" and not deep:
            return visual.trunk.blocks(x)
        rope = tokens.rope
        if rope is not None and p:
            rope = self._identity_rope(rope, p)
        # per-depth rope ('mixed'): one table per block, as in Eva.forward_features
        mixed = rope is not None and getattr(visual.trunk, "rope_mixed", False)
        for i, block in enumerate(blocks):
            if 1 <= i <= len(deep):  # deep prompts: hidden states of the prompt slots
                x = torch.cat([x[:, : x.shape[1] - p], deep[i - 1].to(x.dtype)], dim=1)
            if kind == "eva":
                x = block(x, rope=rope[i] if mixed else rope)
            else:
                x = block(x)
        return x

    def _pool_head(self, kind: str, x: Tensor) -> Tensor:
        """The last block's output of the tower's own tokens (B, n_pre + N, V) -> (B, D):
        the tower's final norm, pooling and head/projection, as its forward applies them."""
        visual = self.model.visual
        if kind == "openclip":
            x, _ = visual._pool(x)  # (B, V'), with ln_post where the tower has it
            return x @ visual.proj if visual.proj is not None else x
        trunk = visual.trunk
        # trunk.norm is per token, so dropping prompts before it changes nothing
        return visual.head(trunk.forward_head(trunk.norm(x)))  # (B, D)

    @staticmethod
    def _per_image(prompts: Tensor, b: int, v: int, what: str) -> Tensor:
        """Prompts (P, V) broadcast over the batch, or (B, P, V) as they are -> (B, P, V)."""
        if prompts.dim() == 2:
            prompts = prompts.unsqueeze(0).expand(b, -1, -1)
        if prompts.dim() != 3 or prompts.shape[0] != b or prompts.shape[2] != v:
            raise ValueError(
                f"{what} must be (P, V={v}) or (B={b}, P, V={v}), got {tuple(prompts.shape)}"
            )
        return prompts

    def encode_image_tokens(
        self,
        tokens: VisualTokens,
        prompts: Tensor | None = None,
        normalize: bool = True,
        deep: list[Tensor] | tuple[Tensor, ...] | None = None,
        after_norm: bool = False,
    ) -> Tensor:
        """`patch_tokens` output plus visual prompts -> (B, D) image features.

        prompts: (P, V), the same for every image, or (B, P, V). They are appended after all
        tokens, with no position embedding (EVA: identity rotary rows), before the tower's
        pre-norm (MaPLe, IVLP, VPT) or, with `after_norm`, after it (FedTPG's VLP), and go
        through the blocks with the image's tokens. deep: deep prompts, one (P, V) or
        (B, P, V) tensor per block 1 .. len(deep) (0-based): before that block the P prompt
        rows are replaced by it (hidden states: no norm, no position). The prompt outputs
        are then dropped, so the tower's own pooling (class token, average or MAP head, with
        its final norm) pools exactly the tokens it pools without prompts; the prompts act
        through attention (VPT's convention). Then the tower's head/projection. With no
        prompts this equals `encode_image`. Differentiable w.r.t. the prompts only: no
        backbone parameter requires a gradient.
        """
        kind = self._token_kind()
        x = tokens.tokens
        b, _, v = x.shape
        self.images_encoded += int(b)
        deep = list(deep or [])
        if prompts is not None:
            prompts = self._per_image(prompts, b, v, "visual prompts")
        elif deep:
            raise ValueError("deep visual prompts need prompts at the input")
        p = 0 if prompts is None else int(prompts.shape[1])
        if deep:
            layers = len(self._blocks(kind))
            if len(deep) > layers - 1:
                raise ValueError(
                    f"{len(deep)} deep visual prompt layers, but {self.name}'s vision tower has "
                    f"{layers} blocks (at most {layers - 1} after the first)"
                )
            deep = [self._per_image(d, b, v, "deep visual prompts") for d in deep]
            if any(d.shape[1] != p for d in deep):
                raise ValueError(f"deep visual prompts must have P={p} tokens like the input's")
        keep = x.shape[1]  # the tower's own tokens: the prompt outputs are not pooled
        x = self._run_blocks(kind, tokens, x, prompts, deep, after_norm)
        x = self._pool_head(kind, x[:, :keep])
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(
        self,
        images: Tensor,
        prompts: Tensor | None = None,
        normalize: bool = True,
        deep: list[Tensor] | tuple[Tensor, ...] | None = None,
        after_norm: bool = False,
    ) -> Tensor:
        """(B, 3, H, W) -> (B, D) image features. Without prompts, the tower's own forward;
        with `prompts` (and `deep`), visual prompt tokens (see `encode_image_tokens`)."""
        if prompts is None and not deep:
            self.images_encoded += int(images.shape[0])
            x = self.model.visual(images)
            return F.normalize(x, dim=-1) if normalize else x
        return self.encode_image_tokens(
            self.patch_tokens(images), prompts, normalize, deep=deep, after_norm=after_norm
        )
