"""FrozenCLIP: one frozen open_clip model per process, with the hooks prompt learners need.

Every simulated client shares the same instance: the backbone is never copied and never
trained. Learners reach it through `tokenize`, `token_embedding`, `encode_prompted_text`
(exact truncation, METHODS.md section 0), `encode_image` (optionally with extra visual prompt
tokens) and the frozen image-feature cache.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fedclip.errors import BackboneError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False
_LOADED: dict[tuple, FrozenCLIP] = {}


def register_model_configs() -> None:
    """Make fedclip's own small architectures (fedclip-tiny-vit, fedclip-tiny-rn and one per
    open_clip family, see `fedclip.families`) known to open_clip."""
    global _registered
    if not _registered:
        from fedclip.families import register_tiny_trunks

        register_tiny_trunks()
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


@dataclass
class BackboneConfig:
    """The frozen vision-language model.

    Args:
        model: open_clip architecture name, e.g. ViT-B-16-quickgelu, RN50, fedclip-tiny-vit.
        pretrained: open_clip pretrained tag (openai, laion2b_s34b_b79k, ...), a local
            checkpoint file, 'shapes' (fedclip's tiny models pre-trained offline on the
            built-in Shapes data, for the demo), or null for random weights (tests only).
        force_quick_gelu: use QuickGELU activations (needed by the openai weights when the
            model name has no -quickgelu suffix).
        cache_dir: where open_clip stores downloaded weights (default: its own cache).
    """

    model: str = "fedclip-tiny-vit"
    pretrained: str | None = None
    force_quick_gelu: bool = False
    cache_dir: str | None = None


def load_backbone(cfg: BackboneConfig) -> FrozenCLIP:
    """Return the process-wide FrozenCLIP for `cfg`, building it on first use.

    Building never touches the caller's random state (it runs under a forked RNG seeded
    with 0), so a run draws the same random numbers whether the backbone was cached or not,
    and random-weight backbones (`pretrained: null`) are the same in every run.
    """
    key = (cfg.model, cfg.pretrained, cfg.force_quick_gelu)
    if key not in _LOADED:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _LOADED[key] = FrozenCLIP.from_config(cfg)
    return _LOADED[key]


def _check_model_name(name: str) -> None:
    register_model_configs()
    if name.startswith(("hf-hub:", "local-dir:")):
        return
    known = open_clip.list_models()
    if name.replace("/", "-") not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
        raise BackboneError(f"unknown open_clip model '{name}'{hint}")


def _resolve_pretrained(cfg: BackboneConfig) -> str | None:
    tag = cfg.pretrained
    if tag is None or tag == "" or str(tag).lower() in {"none", "null", "random"}:
        return None
    from fedclip import tiny

    if tag == tiny.TAG:
        return tiny.shapes_weights(cfg.model, cfg.cache_dir)
    if open_clip.get_pretrained_cfg(cfg.model, tag):
        return tag
    path = Path(os.path.expanduser(tag))
    if path.is_file():
        return str(path)
    tags = open_clip.list_pretrained_tags_by_model(cfg.model)
    if any(ch in tag for ch in "/\\.") or not tags:
        raise BackboneError(
            f"pretrained '{tag}' for {cfg.model} is neither a known open_clip tag nor an existing "
            f"file; known tags: {', '.join(tags) or 'none'}"
        )
    raise BackboneError(
        f"unknown pretrained tag '{tag}' for {cfg.model}; known tags: {', '.join(tags)}"
    )


def _tokenizer(cfg: BackboneConfig):
    """open_clip's tokenizer of the model (a stand-in for fedclip's tiny SigLIP models)."""
    from fedclip.families import TINY_TOKENIZERS

    if cfg.model in TINY_TOKENIZERS:
        return TINY_TOKENIZERS[cfg.model]()
    try:
        return open_clip.get_tokenizer(cfg.model, cache_dir=cfg.cache_dir)
    except ImportError as e:  # SigLIP's and other Hugging Face tokenizers
        raise BackboneError(
            f"{cfg.model}: its tokenizer needs the '{e.name or 'transformers'}' package "
            "(pip install transformers sentencepiece) and the Hugging Face hub or a filled "
            "HF cache"
        ) from e
    except OSError as e:  # the tokenizer files could not be downloaded
        raise BackboneError(
            f"{cfg.model}: could not load its tokenizer ({str(e).splitlines()[0][:160]}); on "
            "a machine without internet, fill the Hugging Face cache elsewhere (HF_HOME)"
        ) from e


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


class _TextTower:
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


class FrozenCLIP(nn.Module):
    """A frozen open_clip model and the hooks prompt learners use.

    Build it with `load_backbone` (one instance per process). It is always in eval mode and
    none of its parameters require gradients; gradients still flow through it to prompts.
    """

    def __init__(self, model: nn.Module, tokenizer, preprocess_train, preprocess_val, name: str):
        super().__init__()
        model.eval().requires_grad_(False)
        self.model = model
        self.name = name
        self.tokenizer = tokenizer
        self.preprocess_train = preprocess_train
        self.preprocess_val = preprocess_val
        self.text = _TextTower(model, name)
        self.layout = TokenLayout.probe(tokenizer)
        tower = self.text
        log.info(
            "%s: %s text tower, '%s' pooling, %d tokens: %s",
            name,
            "causal" if tower.causal else "bidirectional",
            tower.pool_type,
            int(tower.positional_embedding.shape[0]),
            "prompts are cut after the end token and share their prefix (exact)"
            if tower.shared_prefix
            else "prompts are cut after the end token (exact)"
            if tower.truncatable
            else "prompts run at full length (cutting them would not be exact)",
        )
        self.images_encoded = 0  # frozen image-encoder passes, counted per sample
        self.text_sequences_encoded = 0  # prompted text sequences run through the tower
        self._feature_store: dict[str, tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_config(cls, cfg: BackboneConfig) -> FrozenCLIP:
        _check_model_name(cfg.model)
        pretrained = _resolve_pretrained(cfg)
        if pretrained is None:
            log.warning(
                "backbone %s has RANDOM weights (pretrained: null): fine for tests and the "
                "offline demo, meaningless for real experiments",
                cfg.model,
            )
        tokenizer = _tokenizer(cfg)  # before the model: a missing tokenizer fails fast
        try:
            model, pre_train, pre_val = open_clip.create_model_and_transforms(
                cfg.model,
                pretrained=pretrained,
                force_quick_gelu=cfg.force_quick_gelu,
                cache_dir=cfg.cache_dir,
            )
        except Exception as e:  # download failures surface from several libraries
            if pretrained is not None and not Path(pretrained).is_file():
                raise BackboneError(
                    f"could not download pretrained weights '{pretrained}' for {cfg.model} "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                    "on a machine without internet, download the checkpoint elsewhere and "
                    "set backbone.pretrained to its local path"
                ) from e
            raise BackboneError(
                f"could not build {cfg.model} from '{pretrained}': "
                f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            ) from e
        return cls(model, tokenizer, pre_train, pre_val, cfg.model)

    def train(self, mode: bool = True) -> FrozenCLIP:
        # The backbone stays in eval mode whatever the caller asks (dropout, norms frozen).
        return super().train(False)

    # ---- sizes -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def embed_dim(self) -> int:
        """D, the joint embedding width (read once from a frozen text pass)."""
        if getattr(self, "_embed_dim", None) is None:
            self._embed_dim = int(self.encode_text(["a"]).shape[-1])
        return self._embed_dim

    @property
    def text_width(self) -> int:
        return int(self.text.token_embedding.weight.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.text.positional_embedding.shape[0])

    @property
    def logit_scale(self) -> Tensor:
        """s = exp(logit_scale) of the frozen model (a scalar tensor)."""
        return self.model.logit_scale.exp()

    @property
    def logit_bias(self) -> Tensor:
        """b of models trained with a sigmoid loss (SigLIP: logits s * cos + b), else 0.

        The same b is added to every class's logit, so it changes no softmax, cross-entropy,
        ranking or average precision; it makes the logits the model's own calibrated ones."""
        bias = getattr(self.model, "logit_bias", None)
        return bias if bias is not None else torch.zeros((), device=self.device)

    # ---- text ----------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    def token_embedding(self, tokens: Tensor) -> Tensor:
        """(N, L) token ids -> (N, L, W) input embeddings of the frozen text tower."""
        return self.text.token_embedding(tokens)

    def encode_prompted_text(
        self, embeds: Tensor, tokens: Tensor, normalize: bool = True, truncate: bool = True
    ) -> Tensor:
        """Encode token embeddings in which some rows were replaced by learned prompts.

        embeds: (N, L, W) input embeddings; tokens: (N, L) the token ids that say where each
        sequence's pooled (EOT) token sits. With a causal tower, positions after the last EOT
        never influence it, so the sequences are cut to max(EOT) + 1 first (exact).
        """
        tower = self.text
        pool_at = tower.pool_index(tokens)  # (N,)
        length = tokens.shape[1]
        if truncate and tower.truncatable:
            length = int(pool_at.max()) + 1
        cast = tower.transformer.get_cast_dtype()
        x = embeds[:, :length].to(cast) + tower.positional_embedding[:length].to(cast)
        mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None
        x = tower.transformer(x, attn_mask=mask)  # (N, length, W)
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
        self, prefix: Tensor, suffix: Tensor, suffix_tokens: Tensor, normalize: bool = True
    ) -> Tensor:
        """Encode N sequences that all start with the same P input embeddings.

        prefix: (P, W) embeddings shared by every sequence (e.g. [SOS] + a learned context);
        suffix: (N, S, W) the rest of each sequence; suffix_tokens: (N, S) its token ids (the
        EOT must be in the suffix). Under the causal mask the prefix's hidden states do not
        depend on what follows, so they are computed once (batch of one) and every suffix
        attends to their keys and values layer by layer, as in the full sequence: the same
        features as `encode_prompted_text` on the concatenation, to float rounding, for a
        fraction of the work and activation memory. Needs `text.shared_prefix`.
        """
        tower = self.text
        if not tower.shared_prefix:
            raise BackboneError(f"{self.name}: its text tower has no exact shared-prefix path")
        p = prefix.shape[0]
        pool_at = tower.pool_index(suffix_tokens)  # (N,) inside the suffix
        s = int(pool_at.max()) + 1  # nothing after the last EOT reaches any EOT
        cast = tower.transformer.get_cast_dtype()
        pos = tower.positional_embedding.to(cast)
        xp = (prefix.to(cast) + pos[:p]).unsqueeze(0)  # (1, P, W)
        xs = suffix[:, :s].to(cast) + pos[p : p + s]  # (N, S, W)
        full = tower.attn_mask[: p + s, : p + s]
        mask_p = full[:p, :p]
        mask_s = full[p : p + s, : p + s]  # suffix rows: all of the prefix, causal within
        for block in tower.transformer.resblocks:
            hp, hs = block.ln_1(xp), block.ln_1(xs)
            xs = xs + block.ls_1(self._suffix_attention(block.attn, hp, hs, mask_s))
            xs = xs + block.ls_2(block.mlp(block.ln_2(xs)))
            xp = block(xp, attn_mask=mask_p)
        return self._pool_project(xs, pool_at, normalize)

    @staticmethod
    def _suffix_attention(attn: nn.MultiheadAttention, hp: Tensor, hs: Tensor, mask: Tensor):
        """Multi-head attention of the suffixes hs (N, S, W) over [prefix; own suffix], with
        open_clip's weights; the prefix hp (1, P, W) is projected to keys and values once,
        not once per sequence."""
        n, s, w = hs.shape
        h = attn.num_heads
        dh = w // h
        weight, bias = attn.in_proj_weight, attn.in_proj_bias
        wq, wk, wv = weight.split(w)
        bq, bk, bv = bias.split(w) if bias is not None else (None, None, None)

        def heads(x: Tensor) -> Tensor:  # (B, L, W) -> (B, h, L, dh)
            return x.view(x.shape[0], x.shape[1], h, dh).transpose(1, 2)

        q = heads(F.linear(hs, wq, bq))  # (N, h, S, dh)
        kp, vp = heads(F.linear(hp, wk, bk)), heads(F.linear(hp, wv, bv))  # (1, h, P, dh)
        k = torch.cat([kp.expand(n, -1, -1, -1), heads(F.linear(hs, wk, bk))], dim=2)
        v = torch.cat([vp.expand(n, -1, -1, -1), heads(F.linear(hs, wv, bv))], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))  # (N,h,S,dh)
        return attn.out_proj(out.transpose(1, 2).reshape(n, s, w))

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> Tensor:
        """Frozen text features of plain sentences, (N, D)."""
        tokens = self.tokenize(texts)
        return self.encode_prompted_text(self.token_embedding(tokens), tokens, normalize)

    # ---- images --------------------------------------------------------------------------
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

    def _vision_tower(self) -> tuple[str | None, str, str]:
        """(kind, tower, why not) of the vision tower.

        kind says how visual prompts are injected: 'openclip' (open_clip's VisionTransformer),
        'vit' or 'eva' (a TimmModel around timm's VisionTransformer or Eva, whose forward
        `encode_image_tokens` re-runs stage by stage); None when they cannot be, with the
        reason. A subclass that overrides the forward is refused: its stages are unknown.
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
        """Whether visual prompt tokens can be injected into the vision tower (FedMVP)."""
        return self._vision_tower()[0] is not None

    def _token_kind(self) -> str:
        """The tower's kind (see `_vision_tower`); a one-line BackboneError that names the
        model, its tower and the learners that do work on it when prompts cannot go in."""
        kind, tower, why = self._vision_tower()
        if kind is None:
            raise BackboneError(
                f"{self.name}: its vision tower ({tower}) {why}, so it cannot take visual "
                "prompt tokens (FedMVP); text-prompt learners work on it: TextualPrompt "
                "(CoOp, PromptFL), MixtureOfPrompts (pFedMoAP), ZeroShot"
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

    def patch_tokens(self, images: Tensor) -> FrozenCLIP.VisualTokens:
        """(B, 3, H, W) -> the tower's input tokens (B, num_prefix + N, V), made by the
        tower's own stages, as in its forward: patch embedding, prefix tokens, position
        embedding (EVA: and its rotary table), patch dropout (a no-op: always eval). The
        pre-norm is left to `encode_image_tokens`, which then covers the prompts too."""
        kind = self._token_kind()
        visual = self.model.visual
        if kind == "openclip":
            x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (B, V, g, g)
            x = x.flatten(2).transpose(1, 2)  # (B, N, V)
            cls_tok = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
            x = torch.cat([cls_tok.to(x.dtype), x], dim=1)  # (B, 1 + N, V)
            x = x + visual.positional_embedding.to(x.dtype)
            return self.VisualTokens(visual.patch_dropout(x), num_prefix=1)
        trunk = visual.trunk
        # (B, N, V), or (B, h, w, V) when the trunk takes dynamic image sizes
        x = trunk.patch_embed(images.to(next(trunk.parameters()).dtype))
        if kind == "eva":
            x, rope = trunk._pos_embed(x)  # (B, n_pre + N, V); EVA's patch dropout is in here
            return self.VisualTokens(x, trunk.num_prefix_tokens, rope)
        x = trunk.patch_drop(trunk._pos_embed(x))  # (B, n_pre + N, V)
        return self.VisualTokens(x, trunk.num_prefix_tokens)

    @staticmethod
    def _identity_rope(rope: Tensor, p: int) -> Tensor:
        """EVA's rotary table (..., N, 2R) extended by p rows [sin 0 | cos 1] -> (..., N + p,
        2R). timm rotates every token after the prefix and needs one row per token; these
        rows rotate by nothing (x cos + rot(x) sin = x exactly), so the appended prompts
        carry no position and the patches keep their own rotations."""
        shape = (*rope.shape[:-2], p, rope.shape[-1] // 2)
        identity = torch.cat([rope.new_zeros(shape), rope.new_ones(shape)], dim=-1)  # (.., p, 2R)
        return torch.cat([rope, identity], dim=-2)

    def encode_image_tokens(
        self,
        tokens: FrozenCLIP.VisualTokens,
        prompts: Tensor | None = None,
        normalize: bool = True,
    ) -> Tensor:
        """`patch_tokens` output plus visual prompts (B, P, V) -> (B, D) image features.

        The prompts are appended after all tokens, with no position embedding (EVA: identity
        rotary rows), and go through the pre-norm and the blocks with the image's tokens.
        Their outputs are then dropped, so the tower's own pooling (class token, average or
        MAP head, with its final norm) pools exactly the tokens it pools without prompts; the
        prompts act through attention (VPT's convention). Then the tower's head/projection.
        With no prompts this equals `encode_image`. Differentiable w.r.t. the prompts only:
        no backbone parameter requires a gradient.
        """
        kind = self._token_kind()
        visual = self.model.visual
        x = tokens.tokens
        b, _, v = x.shape
        self.images_encoded += int(b)
        p = 0
        if prompts is not None:
            if prompts.dim() != 3 or prompts.shape[0] != b or prompts.shape[2] != v:
                raise ValueError(
                    f"visual prompts must be (B={b}, P, V={v}), got {tuple(prompts.shape)}"
                )
            p = int(prompts.shape[1])
            x = torch.cat([x, prompts.to(x.dtype)], dim=1)  # (B, n_pre + N + P, V)
        keep = x.shape[1] - p  # the tower's own tokens: the prompt outputs are not pooled
        if kind == "openclip":
            x = visual.transformer(visual.ln_pre(x))
            x, _ = visual._pool(x[:, :keep])  # (B, V'), with ln_post where the tower has it
            if visual.proj is not None:
                x = x @ visual.proj
        else:
            trunk = visual.trunk
            x = trunk.norm_pre(x)
            if kind == "vit":
                x = trunk.blocks(x)
            else:
                rope = tokens.rope
                if rope is not None and p:
                    rope = self._identity_rope(rope, p)
                # per-depth rope ('mixed'): one table per block, as in Eva.forward_features
                mixed = rope is not None and getattr(trunk, "rope_mixed", False)
                for i, block in enumerate(trunk.blocks):
                    x = block(x, rope=rope[i] if mixed else rope)
            # trunk.norm is per token, so dropping the prompts first changes nothing
            x = visual.head(trunk.forward_head(trunk.norm(x[:, :keep])))  # (B, D)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(
        self, images: Tensor, prompts: Tensor | None = None, normalize: bool = True
    ) -> Tensor:
        """(B, 3, H, W) -> (B, D) image features. Without prompts, the tower's own forward;
        `prompts` (B, P, V) are injected as visual prompt tokens (see `encode_image_tokens`)."""
        if prompts is None:
            self.images_encoded += int(images.shape[0])
            x = self.model.visual(images)
            return F.normalize(x, dim=-1) if normalize else x
        return self.encode_image_tokens(self.patch_tokens(images), prompts, normalize)

    # ---- frozen image-feature cache ------------------------------------------------------
    @torch.no_grad()
    def cached_image_features(
        self,
        key: str,
        dataset: Dataset,
        indices: np.ndarray,
        batch_size: int = 128,
        num_workers: int = 0,
    ) -> Tensor:
        """Frozen, normalised features (len(indices), D) of samples `indices` of `dataset`.

        Each sample is encoded at most once per process for a given `key` (the data split's
        identity): valid whenever the image path is not changed by a learner and no random
        augmentation is applied.
        """
        from fedclip.data import IndexedSubset  # local import: data does not import backbone

        n = len(dataset)
        if key not in self._feature_store:
            dim = self.embed_dim
            self._feature_store[key] = (
                torch.zeros(n, dim, device=self.device),
                torch.zeros(n, dtype=torch.bool, device=self.device),
            )
        feats, have = self._feature_store[key]
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64), device=self.device)
        missing = idx[~have[idx]].unique().cpu().numpy()
        if len(missing):
            from fedclip.interrupt import ignore_stop_signals

            # its own generator: filling the cache must not draw from the global RNG, or a
            # resumed process (which fills it later) would drift from an uninterrupted one
            loader = DataLoader(
                IndexedSubset(dataset, missing),
                batch_size=batch_size,
                num_workers=num_workers,
                generator=torch.Generator().manual_seed(0),
                worker_init_fn=ignore_stop_signals,
            )
            for images, _, sample_ids in loader:
                out = self.encode_image(images.to(self.device)).float()
                sample_ids = sample_ids.to(self.device)
                feats[sample_ids] = out
                have[sample_ids] = True
        return feats[idx]

    def clear_feature_cache(self) -> None:
        self._feature_store.clear()
