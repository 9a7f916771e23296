"""FrozenCLIP's caches of frozen image features: pooled (B, D) and dense (B, 1 + M, D).

The backbone is frozen, so an image's features never change while its transform is
deterministic: each sample is encoded once per process and cache key (the data split's
identity). Filling a cache never draws from the global RNG (its DataLoader has its own
generator), so a resumed process, which fills it later, stays bitwise on an uninterrupted
one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


def _loader(dataset: Dataset, missing: np.ndarray, batch_size: int, num_workers: int):
    from fedclip.data import IndexedSubset  # local import: data does not import backbone
    from fedclip.interrupt import ignore_stop_signals

    # its own generator: filling the cache must not draw from the global RNG, or a
    # resumed process (which fills it later) would drift from an uninterrupted one
    return DataLoader(
        IndexedSubset(dataset, missing),
        batch_size=batch_size,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=ignore_stop_signals,
    )


class _DenseStore:
    """Dense features of the samples of one data split that were asked for so far: float16
    rows on the CPU, (1 + M) * D * 2 bytes per image, grown as samples come (a split's
    size times that would not fit for large data sets)."""

    def __init__(self, n: int) -> None:
        self.slot = torch.full((n,), -1, dtype=torch.long)  # sample id -> row, -1: missing
        self.rows: Tensor | None = None  # (capacity, 1 + M, D) float16
        self.used = 0

    def add(self, ids: Tensor, feats: Tensor) -> None:
        """Store feats (n, 1 + M, D) of the samples ids (n,)."""
        n = int(ids.shape[0])
        if self.rows is None:
            self.rows = torch.empty((max(n, 1), *feats.shape[1:]), dtype=torch.float16)
        if self.used + n > self.rows.shape[0]:  # double: amortised O(1) copies per row
            grown = torch.empty(
                (max(2 * self.rows.shape[0], self.used + n), *self.rows.shape[1:]),
                dtype=torch.float16,
            )
            grown[: self.used] = self.rows[: self.used]
            self.rows = grown
        self.rows[self.used : self.used + n] = feats.to("cpu", torch.float16)
        self.slot[ids] = torch.arange(self.used, self.used + n)
        self.used += n


class FeatureCache:
    """FrozenCLIP's cache methods (a mixin: needs `encode_image`, `encode_dense`,
    `embed_dim`, `device`)."""

    def _init_caches(self) -> None:
        self._feature_store: dict[str, tuple[Tensor, Tensor]] = {}
        self._dense_store: dict[str, _DenseStore] = {}

    @torch.no_grad()
    def cached_image_features(
        self,
        key: str,
        dataset: Dataset,
        indices: np.ndarray,
        batch_size: int = 128,
        num_workers: int = 0,
        normalize: bool = True,
    ) -> Tensor:
        """Frozen, normalised features (len(indices), D) of samples `indices` of `dataset`
        (`normalize=False`: before the normalisation; the cache keeps those).

        Each sample is encoded at most once per process for a given `key` (the data split's
        identity): valid whenever the image path is not changed by a learner and no random
        augmentation is applied.
        """
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
            for images, _, sample_ids in _loader(dataset, missing, batch_size, num_workers):
                out = self.encode_image(images.to(self.device), normalize=False).float()
                sample_ids = sample_ids.to(self.device)
                feats[sample_ids] = out
                have[sample_ids] = True
        return F.normalize(feats[idx], dim=-1) if normalize else feats[idx]

    @torch.no_grad()
    def cached_dense_features(
        self,
        key: str,
        dataset: Dataset,
        indices: np.ndarray,
        batch_size: int = 128,
        num_workers: int = 0,
    ) -> Tensor:
        """Frozen dense features (len(indices), 1 + M, D) of samples `indices` of `dataset`
        (`encode_dense`), float16 on the CPU: (1 + M) * D * 2 bytes per image, e.g.
        197 * 512 * 2 = 201,728 bytes for ViT-B/16 at 224 px. Each sample is encoded at most
        once per process for a given `key`, with the same validity as
        `cached_image_features`; only the samples asked for are stored."""
        if key not in self._dense_store:
            self._dense_store[key] = _DenseStore(len(dataset))
        store = self._dense_store[key]
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        missing = idx[store.slot[idx] < 0].unique().numpy()
        if len(missing):
            self._dense_kind()  # a tower without tokens fails before any image is loaded
            for images, _, sample_ids in _loader(dataset, missing, batch_size, num_workers):
                store.add(sample_ids.cpu(), self.encode_dense(images.to(self.device)))
        if store.rows is None:  # nothing asked for yet (no index given): no shape known
            return torch.empty((0, 0, 0), dtype=torch.float16)
        return store.rows[store.slot[idx]]

    def clear_feature_cache(self) -> None:
        """Forget every cached feature, pooled and dense."""
        self._feature_store.clear()
        self._dense_store.clear()
