"""Dense image tokens: every output token of the frozen vision tower in the joint space.

Hook H1 of METHODS-ZOO.md section 0 (FedOTP matches prompts to patches). For each image,
(1 + M, D): token 0 is the image's pooled feature, exactly what `encode_image` computes
(to float rounding), and tokens 1..M are the M patch (ViT) or grid (ResNet) tokens, each
through the tower's own per-token final norm and projection. Every token is L2-normalised.

What token 0 is, tower by tower: the class token's output where the tower pools its class
token (CLIP ViT, EVA02, MobileCLIP-B); the attention pool's output where a ResNet pools the
mean token by attention (CLIP RN, re-run here with every grid token as a query too); the
pooled feature itself, which is no single token's output, where the tower averages its
patches or pools them with a MAP head (SigLIP, PE-Core). Class and register tokens that a
tower does not pool are not returned. The patches of MAP-pooled towers skip the MAP head
(it has no per-token form), so they are less aligned with text than token 0 there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fedclip.errors import BackboneError


class DensePath:
    """FrozenCLIP's dense-token method (a mixin over `VisionPath`)."""

    def _dense_kind(self) -> str:
        """'openclip', 'vit', 'eva' (see `_vision_tower`) or 'resnet' (open_clip's
        ModifiedResNet); a one-line BackboneError naming the model and its tower otherwise."""
        from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet

        kind, tower, why = self._vision_tower()
        visual = self.model.visual
        if kind == "openclip" and (visual.attn_pool is not None or visual.pool_type == "none"):
            kind, why = None, "pools with an attentional pooler, which has no per-token output"
        elif kind in ("vit", "eva") and hasattr(visual.head, "pool"):
            kind, why = None, "pools in its head, which has no per-token output"
        elif (
            kind is None
            and type(visual).forward is ModifiedResNet.forward
            and type(visual.attnpool) is AttentionPool2d
        ):
            kind = "resnet"
        if kind is None:
            raise BackboneError(
                f"{self.name}: its vision tower ({tower}) {why}, so it has no dense image tokens"
            )
        return kind

    @property
    def has_dense_tokens(self) -> bool:
        """Whether `encode_dense` works on this tower."""
        try:
            self._dense_kind()
        except BackboneError:
            return False
        return True

    def encode_dense(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1 + M, D) dense image features, each token L2-normalised.

        Token 0 equals `encode_image(images)` to float rounding on every tower; tokens 1..M
        are the patch tokens projected into the joint space (see the module docstring for
        what each family's tokens are). M: (H / patch)^2 for a ViT, the last feature map's
        h * w for a ResNet. Not differentiable in anything: the backbone is frozen and no
        prompt goes in. A BackboneError naming the model for towers without tokens
        (FastViT, ...)."""
        kind = self._dense_kind()
        self.images_encoded += int(images.shape[0])
        if kind == "resnet":
            x = self._resnet_dense(images)
        else:
            tokens = self._patch_tokens(images, kind)
            hidden = self._run_blocks(
                kind, tokens, tokens.tokens, None, [], False
            )  # (B, n_pre + M, V)
            pooled = self._pool_head(kind, hidden)  # (B, D)
            patches = self._project_tokens(kind, hidden[:, tokens.num_prefix :])  # (B, M, D)
            x = torch.cat([pooled.unsqueeze(1), patches], dim=1)  # (B, 1 + M, D)
        return F.normalize(x, dim=-1)

    def _project_tokens(self, kind: str, x: Tensor) -> Tensor:
        """Last-block outputs (B, M, V) -> (B, M, D): the tower's final norm and projection
        applied to each token on its own, without the pooling."""
        visual = self.model.visual
        if kind == "openclip":
            x = visual.ln_post(x)
            return x @ visual.proj if visual.proj is not None else x
        trunk = visual.trunk
        # forward_head without the pool: fc_norm, head dropout (eval: none), classifier
        x = trunk.head(trunk.head_drop(trunk.fc_norm(trunk.norm(x))))
        return visual.head(x)

    def _resnet_dense(self, images: Tensor) -> Tensor:
        """ModifiedResNet: the attention pool re-run with all 1 + hw tokens as queries (the
        mean token, which the tower itself pools, then the grid tokens) over the usual keys
        and values, then c_proj -> (B, 1 + hw, D)."""
        visual = self.model.visual
        x = images.to(visual.conv1.weight.dtype)
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))
        pool = visual.attnpool
        x = x.flatten(2).permute(2, 0, 1)  # (B, C, h, w) -> (hw, B, C)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (1 + hw, B, C)
        x = x + pool.positional_embedding[:, None, :].to(x.dtype)
        x, _ = F.multi_head_attention_forward(
            query=x,
            key=x,
            value=x,
            embed_dim_to_check=x.shape[-1],
            num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight,
            k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight,
            out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True,
            training=False,
            need_weights=False,
        )  # (1 + hw, B, D)
        return x.transpose(0, 1)  # (B, 1 + hw, D)
