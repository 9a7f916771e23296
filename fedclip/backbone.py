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

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False
_LOADED: dict[tuple, FrozenCLIP] = {}


class BackboneError(ValueError):
    """The backbone cannot be built as configured; the message is one line with the fix."""


def register_model_configs() -> None:
    """Make fedclip's own small architectures (fedclip-tiny-vit, fedclip-tiny-rn) known to open_clip."""
    global _registered
    if not _registered:
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
        tokenizer = open_clip.get_tokenizer(cfg.model)
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
    @property
    def accepts_visual_prompts(self) -> bool:
        return isinstance(self.model.visual, open_clip.transformer.VisionTransformer)

    def _check_visual_prompts(self) -> None:
        if not self.accepts_visual_prompts:
            raise BackboneError(
                f"{self.name}: its vision tower ({type(self.model.visual).__name__}) cannot "
                "take visual prompt tokens; use a ViT model (e.g. ViT-B-16) for visual prompts"
            )

    @property
    def vision_width(self) -> int:
        """V, the width of the vision transformer's tokens."""
        self._check_visual_prompts()
        return int(self.model.visual.conv1.out_channels)

    def patch_tokens(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1 + N, V): the class token and the N patch embeddings with
        their positional embedding, as they enter the vision transformer (before ln_pre)."""
        self._check_visual_prompts()
        visual = self.model.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (B, V, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, N, V)
        cls_tok = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
        return torch.cat([cls_tok.to(x.dtype), x], dim=1) + visual.positional_embedding.to(x.dtype)

    def encode_image_tokens(
        self, tokens: Tensor, prompts: Tensor | None = None, normalize: bool = True
    ) -> Tensor:
        """`patch_tokens` output (B, 1 + N, V) plus visual prompts (B, P, V), appended after
        the patches with no positional embedding -> (B, D) image features."""
        visual = self.model.visual
        self.images_encoded += int(tokens.shape[0])
        x = tokens if prompts is None else torch.cat([tokens, prompts.to(tokens.dtype)], dim=1)
        x = visual.ln_pre(x)  # (B, 1 + N + P, V)
        x = visual.transformer(x)
        x, _ = visual._pool(x)
        if visual.proj is not None:
            x = x @ visual.proj
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(
        self, images: Tensor, prompts: Tensor | None = None, normalize: bool = True
    ) -> Tensor:
        """(B, 3, H, W) -> (B, D) image features; `prompts` (B, P, V) are appended after the
        patch tokens (no positional embedding), before ln_pre, as visual prompt tokens."""
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
