"""What a learner is fed: the `Batch` of one step, and the `Input`s a learner declares.

A learner declares the inputs its batches must hold (`PromptLearner.inputs`); the data
layer then caches and feeds exactly those, so a method that needs, say, cached dense patch
tokens needs no edit to the data layer or the round loop.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields

import torch
from torch import Tensor


class Input(enum.Enum):
    """What a batch can carry besides labels and sample ids.

    FEATURES: the frozen, L2-normalised pooled image features (B, D), cached once per image.
    RAW_FEATURES: the same features before the L2 normalisation, in `Batch.features` (for
        learners that read the feature's scale, e.g. an adapter on the raw image feature).
    TOKENS: the frozen dense per-token projected image features (B, N, D) (patch tokens
        through the tower's final norm and projection, L2-normalised per token), cached
        once per image in float16 (`FrozenCLIP.encode_dense`).
    IMAGES: the preprocessed images (B, 3, H, W), for learners that change the image path.
    FLIP_TARGETS: the frozen pooled features of each training image and of its horizontal
        flip (B, 2, D), cached once per image (only without random augmentation).
    """

    FEATURES = "features"
    RAW_FEATURES = "raw_features"
    TOKENS = "tokens"
    IMAGES = "images"
    FLIP_TARGETS = "flip_targets"


@dataclass
class Batch:
    """One mini-batch: the declared inputs, labels and sample ids."""

    labels: Tensor  # (B,) int64 class ids; multi-label: (B, C) float 0/1 targets
    index: Tensor  # (B,) sample ids in the base data set
    images: Tensor | None = None  # (B, 3, H, W)
    features: Tensor | None = None  # (B, D) frozen image features (normalised unless RAW_)
    # (B, 2, D) frozen features of the image and of its horizontal flip (consistency targets)
    targets: Tensor | None = None
    tokens: Tensor | None = None  # (B, N, D) normalised frozen dense token features

    def to(self, device: torch.device) -> Batch:
        moved = {
            f.name: None
            if (t := getattr(self, f.name)) is None
            else t.to(device, non_blocking=True)
            for f in fields(self)
        }
        return Batch(**moved)

    def __len__(self) -> int:
        return int(self.labels.shape[0])
