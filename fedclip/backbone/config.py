"""The backbone's config and how its names resolve: architecture, weights, tokenizer.

Every name is looked up in the offline registries first (`fedclip.backbone.registry`:
fedclip's tiny architectures, their Shapes weights, the SigLIP tokenizer stand-in), then
asked of open_clip; a name neither knows is a one-line BackboneError that says what to do.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
from torch import nn

from fedclip.backbone.registry import (
    offline_tokenizer,
    offline_weights,
    register_model_configs,
)
from fedclip.errors import BackboneError


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


def check_model_name(name: str) -> None:
    """A BackboneError with the closest known names unless open_clip can build `name`."""
    register_model_configs()
    schema, _ = open_clip.factory.parse_model_name(name)
    if schema is not None:  # a Hugging Face hub or local-folder reference: open_clip's call
        return
    known = open_clip.list_models()
    if name.replace("/", "-") not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
        raise BackboneError(f"unknown open_clip model '{name}'{hint}")


def resolve_pretrained(cfg: BackboneConfig) -> str | None:
    """What open_clip is given as `pretrained`: None (random weights), one of its tags, or
    a local file (an offline tag's checkpoint or the path the user gave)."""
    tag = cfg.pretrained
    if tag is None or tag == "" or str(tag).lower() in {"none", "null", "random"}:
        return None
    offline = offline_weights(tag)
    if offline is not None:
        if cfg.model not in offline.models:
            raise BackboneError(
                f"pretrained '{tag}' exists only for {', '.join(offline.models)}, not {cfg.model}"
            )
        return offline.resolve(cfg.model, cfg.cache_dir)
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


def make_tokenizer(cfg: BackboneConfig):
    """The model's tokenizer: a registered offline one, else open_clip's."""
    factory = offline_tokenizer(cfg.model)
    if factory is not None:
        return factory()
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


class _RandomInitNotice(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly": fedclip
    builds its models without open_clip's weights and then loads its own (the offline
    `shapes` weights), or says itself that the weights are random (`pretrained: null`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextlib.contextmanager
def quiet_random_init():
    """Within the block, open_clip's random-initialisation notice is not shown (open_clip
    logs it on the root logger)."""
    notice = _RandomInitNotice()
    loggers = [logging.getLogger(), logging.getLogger("open_clip")]
    for logger in loggers:
        logger.addFilter(notice)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(notice)


def open_model(cfg: BackboneConfig, pretrained: str | None) -> tuple[nn.Module, object, object]:
    """open_clip's (model, train transform, eval transform) of `cfg`, every failure one
    BackboneError line (a failed download says how to work offline)."""
    try:
        return open_clip.create_model_and_transforms(
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


def cache_bytes_per_image(cfg: BackboneConfig, inputs) -> int:
    """Bytes the frozen-feature cache keeps per image for a learner declaring `inputs`
    (`fedclip.batch.Input` values), from the model's open_clip config, before the model
    is built: float32 pooled features (D), float16 dense tokens ((1 + M) x D), both pooled
    features of the image and its flip; 0 when the config is unknown."""
    register_model_configs()
    schema, name = open_clip.factory.parse_model_name(cfg.model)
    model_cfg = open_clip.get_model_config(name) if schema is None else None  # not a hub's
    if not model_cfg or "embed_dim" not in model_cfg:
        return 0
    dim = int(model_cfg["embed_dim"])
    names = {getattr(i, "value", i) for i in inputs}
    total = dim * 4 if "features" in names else 0
    if "flip_targets" in names:
        total += 2 * dim * 4
    vision = model_cfg.get("vision_cfg") or {}
    side, patch = vision.get("image_size"), vision.get("patch_size")
    if "tokens" in names and isinstance(side, int) and isinstance(patch, int) and patch > 0:
        total += (1 + (side // patch) ** 2) * dim * 2
    return total
