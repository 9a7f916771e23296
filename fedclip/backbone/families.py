"""open_clip's model families, built small for offline tests: registry and stand-ins.

Every family open_clip builds differently gets a tiny random-weight architecture under
`fedclip/backbone/model_configs/` (64 wide, 2 layers, 64 px): the families' own text settings
(causal or not, pooling, context length, logit bias) and vision towers. open_clip passes no
size arguments to timm, so the small timm trunks are registered here under new names whose
builders call timm's own ones (the families' real blocks, embeddings and pooling) with small
sizes.

SigLIP's tokenizers live on the Hugging Face hub (and need `transformers`), so the tiny
SigLIP architectures use `LayoutTokenizer`: open_clip's word pieces in SigLIP's layout (no
start token, the end token appended, padded to 64). What prompt learning depends on (where
the content starts and ends, the pad id, the length) is then the real one.

Importing this module registers every tiny architecture and the stand-in tokenizers in the
offline registries (`fedclip.backbone.registry`); nothing is built until a model is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import Tensor

from fedclip.backbone.registry import register_offline_model, register_offline_tokenizer

CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_tiny_trunks() -> None:
    """Register the small timm trunks of the tiny timm-tower families (once per process)."""
    global _registered
    if _registered:
        return
    from timm.models import eva, fastvit, register_model
    from timm.models import vision_transformer as vit
    from timm.models import vision_transformer_hybrid as hybrid
    from torch import nn

    small = {"img_size": 64, "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2}

    @register_model
    def fedclip_tiny_siglip_vit(pretrained=False, **kw):  # SigLIP/SigLIP2: MAP head, no CLS
        return vit.vit_base_patch16_siglip_224(pretrained=False, **{**small, **kw})

    @register_model
    def fedclip_tiny_eva02_vit(pretrained=False, **kw):  # EVA02: rope, SwiGLU, CLS
        return eva.eva02_base_patch16_clip_224(
            pretrained=False, **{**small, "ref_feat_shape": (4, 4), **kw}
        )

    @register_model
    def fedclip_tiny_pe_vit(pretrained=False, **kw):  # PE-Core: rope, pre-norm, CLS, MAP
        return eva.vit_pe_core_base_patch16_224(
            pretrained=False, **{**small, "ref_feat_shape": (4, 4), "attn_pool_num_heads": 2, **kw}
        )

    @register_model
    def fedclip_tiny_mci_vit(pretrained=False, **kw):  # MobileCLIP-B: conv stem ViT
        stem = hybrid.ConvStem(
            channels=(16, 16, 64),
            stride=(4, 2, 2),
            kernel_size=(4, 2, 2),
            padding=0,
            in_chans=3,
            act_layer=nn.GELU,
        )
        args = {**small, "no_embed_class": True, **kw}
        args.pop("patch_size")
        return hybrid._create_vision_transformer_hybrid(
            "vit_base_mci_224", backbone=stem, embed_args={"proj": False}, pretrained=False, **args
        )

    @register_model
    def fedclip_tiny_fastvit(pretrained=False, **kw):  # MobileCLIP-S: FastViT, no tokens
        return fastvit.fastvit_mci0(
            pretrained=False, **{"layers": (1, 1, 1, 1), "embed_dims": (8, 16, 32, 64), **kw}
        )

    _registered = True


class LayoutTokenizer:
    """A tokenizer in SigLIP's layout made of open_clip's word pieces (offline stand-in).

    No start token; the end token `eos` follows the content; `pad` fills up to
    `context_length`; text is cleaned like SigLIP's ('canonicalize': lower case, no
    punctuation).
    """

    def __init__(self, context_length: int, eos: int, pad: int) -> None:
        self.base = open_clip.SimpleTokenizer(context_length=context_length, clean="canonicalize")
        self.context_length, self.eos, self.pad = context_length, eos, pad

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        out = torch.full((len(texts), length), self.pad, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.base.encode(text)[: length - 1] + [self.eos]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


# the tiny SigLIP architectures' stand-ins: T5 (c4-en) ends and pads with 1, Gemma pads with 0
TINY_TOKENIZERS = {
    "fedclip-tiny-siglip": lambda: LayoutTokenizer(64, eos=1, pad=1),
    "fedclip-tiny-siglip2": lambda: LayoutTokenizer(64, eos=1, pad=0),
}


@dataclass(frozen=True)
class Family:
    """One open_clip family: its tiny offline architecture and real examples."""

    name: str
    tiny: str
    examples: str


FAMILIES = (
    Family("CLIP ViT (OpenAI, LAION)", "fedclip-tiny-vit", "ViT-B-32, ViT-B-16, ViT-L-14"),
    Family("CLIP ResNet (OpenAI)", "fedclip-tiny-rn", "RN50, RN101"),
    Family("SigLIP", "fedclip-tiny-siglip", "ViT-B-16-SigLIP, ViT-SO400M-14-SigLIP"),
    Family("SigLIP2", "fedclip-tiny-siglip2", "ViT-B-16-SigLIP2, ViT-SO400M-16-SigLIP2-384"),
    Family("EVA02", "fedclip-tiny-eva02", "EVA02-B-16, EVA02-L-14"),
    Family("PE-Core", "fedclip-tiny-pecore", "PE-Core-B-16, PE-Core-L-14-336"),
    Family("MobileCLIP-B", "fedclip-tiny-mobileclip-b", "MobileCLIP-B, MobileCLIP2-B"),
    Family("MobileCLIP-S (FastViT)", "fedclip-tiny-mobileclip-s", "MobileCLIP-S1, MobileCLIP2-S2"),
)


for _family in FAMILIES:
    register_offline_model(
        _family.tiny,
        CONFIG_DIR / f"{_family.tiny}.json",
        setup=register_tiny_trunks,  # the timm towers' configs name trunks registered here
        description=f"{_family.name}, tiny, offline (like {_family.examples})",
    )
for _model, _factory in TINY_TOKENIZERS.items():
    register_offline_tokenizer(_model, _factory)
