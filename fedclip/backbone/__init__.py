"""The frozen vision-language backbone: `FrozenCLIP`, its config and loader, the registries.

clip.py      FrozenCLIP (one per process, shared by every client) and load_backbone
config.py    BackboneConfig; how model names, pretrained tags and tokenizers resolve
registry.py  what builds offline: architectures, weights, tokenizers
text.py      token layout, prompted text encoding (exact truncation, shared prefix)
vision.py    pooled image features, visual prompt tokens
dense.py     dense image tokens (every output token in the joint space)
cache.py     the frozen pooled and dense feature caches
families.py  open_clip's families built tiny for offline tests (registered on import)
tiny.py      the offline 'shapes' weights of the tiny CLIP models (registered on import)
"""

from __future__ import annotations

from fedclip.backbone import families, tiny  # noqa: F401  (fill the offline registries)
from fedclip.backbone.clip import FrozenCLIP, load_backbone
from fedclip.backbone.config import BackboneConfig
from fedclip.backbone.families import CONFIG_DIR, FAMILIES, Family, LayoutTokenizer
from fedclip.backbone.registry import (
    OfflineModel,
    OfflineWeights,
    list_offline_models,
    list_offline_weights,
    register_model_configs,
    register_offline_model,
    register_offline_tokenizer,
    register_offline_weights,
)
from fedclip.backbone.text import TokenLayout
from fedclip.backbone.vision import VisualTokens
from fedclip.errors import BackboneError

__all__ = [
    "CONFIG_DIR",
    "FAMILIES",
    "BackboneConfig",
    "BackboneError",
    "Family",
    "FrozenCLIP",
    "LayoutTokenizer",
    "OfflineModel",
    "OfflineWeights",
    "TokenLayout",
    "VisualTokens",
    "list_offline_models",
    "list_offline_weights",
    "load_backbone",
    "register_model_configs",
    "register_offline_model",
    "register_offline_tokenizer",
    "register_offline_weights",
]
