"""FederatedData: a data set plus a partitioner, turned into each client's train/test splits."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedclip.data.datasets import DatasetSource, IndexedSubset, Shapes
from fedclip.data.partition import Dirichlet, Partitioner, partition_summary, split_like
from fedclip.learners.base import Batch


@dataclass
class DataConfig:
    """Where the clients' samples come from.

    Args:
        dataset: the data set (class_path + init_args), e.g. fedclip.data.Shapes,
            fedclip.data.CIFAR100.
        partitioner: how training samples are split among clients (fedclip.data.IID,
            Dirichlet, TwoLevelDirichlet, Pathological, FewShot). Each client's test split follows its
            training label distribution.
        num_clients: number of simulated clients.
        batch_size: local training batch size.
        eval_batch_size: evaluation batch size.
        num_workers: DataLoader worker processes for image decoding.
        augment: random-resized-crop training transform of open_clip instead of the
            deterministic evaluation transform; disables the frozen image-feature cache.
    """

    dataset: DatasetSource = field(default_factory=Shapes)
    partitioner: Partitioner = field(default_factory=Dirichlet)
    num_clients: int = 4
    batch_size: int = 32
    eval_batch_size: int = 256
    num_workers: int = 0
    augment: bool = False


def _collate(items: list) -> Batch:
    images, labels, index = zip(*items, strict=True)
    return Batch(
        labels=torch.as_tensor(labels, dtype=torch.long),
        index=torch.as_tensor(index, dtype=torch.long),
        images=torch.stack(images),
    )


class FederatedData:
    """Client splits of one data set: pure functions of the labels and the seed."""

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        if cfg.num_clients < 1:
            raise ValueError(f"data.num_clients must be >= 1, got {cfg.num_clients}")
        if cfg.batch_size < 1 or cfg.eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be >= 1")
        self.cfg = cfg
        self.seed = seed
        self.source = cfg.dataset
        self.source.check()
        self.classnames = list(self.source.classnames)
        self.train_labels = np.asarray(self.source.labels("train"), dtype=np.int64)
        self.test_labels = np.asarray(self.source.labels("test"), dtype=np.int64)
        self.partitioner = cfg.partitioner.bind(self.source)
        self.train_parts = self.partitioner(self.train_labels, cfg.num_clients, seed)
        self.test_parts = split_like(self.train_parts, self.train_labels, self.test_labels, seed)
        self.train_set = self.test_set = None
        self.clip = None

    @property
    def num_clients(self) -> int:
        return self.cfg.num_clients

    def bind(self, clip, use_cache: bool) -> None:
        """Attach the backbone's transforms; `use_cache` feeds frozen features, not images."""
        self.clip = clip
        self.use_train_cache = use_cache and not self.cfg.augment
        self.use_test_cache = use_cache
        train_tf = clip.preprocess_train if self.cfg.augment else clip.preprocess_val
        self.train_set = self.source.dataset("train", train_tf)
        self.test_set = self.source.dataset("test", clip.preprocess_val)

    def num_train(self, k: int) -> int:
        return len(self.train_parts[k])

    def steps_per_epoch(self, k: int) -> int:
        return math.ceil(self.num_train(k) / self.cfg.batch_size)

    def batches(self, k: int, split: str, epoch_seed: int | None = None) -> Iterator[Batch]:
        """Client k's batches of `split`; shuffled by `epoch_seed` (None: in order)."""
        parts = self.train_parts if split == "train" else self.test_parts
        dataset = self.train_set if split == "train" else self.test_set
        labels = self.train_labels if split == "train" else self.test_labels
        cached = self.use_train_cache if split == "train" else self.use_test_cache
        bs = self.cfg.batch_size if split == "train" else self.cfg.eval_batch_size
        idx = parts[k]
        if len(idx) == 0:
            return
        order = np.arange(len(idx))
        if epoch_seed is not None:
            order = np.random.default_rng(epoch_seed).permutation(len(idx))
        if cached:
            feats = self.clip.cached_image_features(
                self.source.key(split), dataset, idx, self.cfg.eval_batch_size, self.cfg.num_workers
            )  # (n_k, D)
            lab = torch.as_tensor(labels[idx], device=feats.device)
            ids = torch.as_tensor(idx, device=feats.device)
            for s in range(0, len(idx), bs):
                sel = torch.as_tensor(order[s : s + bs], device=feats.device)
                yield Batch(labels=lab[sel], index=ids[sel], features=feats[sel])
        else:
            loader = DataLoader(
                IndexedSubset(dataset, idx[order]),
                batch_size=bs,
                num_workers=self.cfg.num_workers,
                collate_fn=_collate,
            )
            yield from loader

    def summary(self) -> dict:
        """Per-client sample and class counts of both splits."""
        n_cls = len(self.classnames)
        train = partition_summary(self.train_parts, self.train_labels, n_cls)
        test = partition_summary(self.test_parts, self.test_labels, n_cls)
        return {
            "clients": [
                {
                    "client": k,
                    "train": int(train[k].sum()),
                    "test": int(test[k].sum()),
                    "classes": int((train[k] > 0).sum()),
                }
                for k in range(self.num_clients)
            ],
            "train_counts": train.tolist(),
            "test_counts": test.tolist(),
        }
