"""FederatedData: a data set plus a partitioner, turned into each client's train/test splits."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedclip.batch import Batch, Input
from fedclip.data.datasets import DatasetSource, IndexedSubset, Shapes
from fedclip.data.holdout import check_val_fraction, hold_out, split_summary
from fedclip.data.memory import check_data_plan
from fedclip.data.multi import base_classes, dataset_shares, resolve_num_clients
from fedclip.data.partition import Dirichlet, Partitioner
from fedclip.errors import ConfigError
from fedclip.interrupt import ignore_stop_signals


@dataclass
class DataConfig:
    """Where the clients' samples come from.

    Args:
        dataset: the data set (class_path + init_args), e.g. fedclip.data.Shapes,
            fedclip.data.CIFAR100.
        partitioner: how training samples are split among clients (fedclip.data.IID,
            Dirichlet, TwoLevelDirichlet, Pathological, FewShot). Each client's test split follows its
            training label distribution.
        num_clients: number of simulated clients; null: as many as the partitioner makes
            (`ClassChunks`: one per chunk of classes).
        batch_size: local training batch size.
        eval_batch_size: evaluation batch size.
        num_workers: DataLoader worker processes for image decoding.
        augment: random-resized-crop training transform of open_clip instead of the
            deterministic evaluation transform; disables the frozen image-feature cache.
        base_to_novel: the base-to-novel protocol: clients train on the first half of the
            classes (base, ceil(C / 2)); every client is evaluated on its own classes
            (local), on a share of the test images of all base classes and on a share of
            those of the other classes (novel). Over several data sets (`MultiDataset`):
            the first half of EACH data set's classes, base and novel per data set.
        val_fraction: in [0, 1): of the n training samples of each label a client holds,
            floor(f * n + 1/2) (rounded half up) are held out, seeded, as its validation
            split (multi-label: by each image's rarest label), evaluated alongside the test
            split (`val/*` metrics, for `federation.select: val` and sweeps); the test splits
            are the same as with 0 (`fedclip.data.holdout`).
    """

    dataset: DatasetSource = field(default_factory=Shapes)
    partitioner: Partitioner = field(default_factory=Dirichlet)
    num_clients: int | None = 4
    batch_size: int = 32
    eval_batch_size: int = 256
    num_workers: int = 0
    augment: bool = False
    base_to_novel: bool = False
    val_fraction: float = 0.0


def _collate(items: list) -> Batch:
    images, labels, index = zip(*items, strict=True)
    if isinstance(labels[0], torch.Tensor):  # multi-label targets (C,)
        targets = torch.stack([t.float() for t in labels])
    else:
        targets = torch.as_tensor(labels, dtype=torch.long)
    return Batch(
        labels=targets,
        index=torch.as_tensor(index, dtype=torch.long),
        images=torch.stack(images),
    )


def _rows_of(idx: np.ndarray, sample_ids: torch.Tensor) -> torch.Tensor:
    """(B,) positions in `idx` (distinct sample ids, in any order) of `sample_ids`."""
    by_id = np.argsort(idx, kind="stable")
    pos = np.searchsorted(idx[by_id], sample_ids.cpu().numpy())
    return torch.as_tensor(by_id[pos])


class _Flipped(torch.utils.data.Dataset):
    """A data set of image tensors, flipped horizontally (the last axis)."""

    def __init__(self, base: torch.utils.data.Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return image.flip(-1), label


class FederatedData:
    """Client splits of one data set: pure functions of the labels and the seed."""

    def __init__(self, cfg: DataConfig, seed: int, cache_bytes_per_image: int = 0) -> None:
        resolve_num_clients(cfg)
        if cfg.num_clients < 1:
            raise ConfigError(f"data.num_clients must be >= 1, got {cfg.num_clients}")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {cfg.num_workers}")
        check_val_fraction(cfg.val_fraction)
        # a size no memory can hold fails here, before a label is listed (`fedclip.data.memory`;
        # cache_bytes_per_image: what the frozen-feature cache keeps per image)
        check_data_plan(cfg, cache_bytes_per_image)
        self.cfg = cfg
        self.seed = seed
        self.source = cfg.dataset
        self.source.check()
        self.all_classnames = list(self.source.classnames)
        self.train_labels = np.asarray(self.source.labels("train"), dtype=np.int64)
        self.test_labels = np.asarray(self.source.labels("test"), dtype=np.int64)
        # multi-label: labels are each image's rarest label (the partition key), targets
        # the (N, C) 0/1 matrices the learners train and are scored on
        self.multilabel = bool(getattr(self.source, "multilabel", False))
        self.targets = {}
        if self.multilabel:
            if cfg.base_to_novel:
                raise ConfigError("data.base_to_novel is for single-label data sets")
            self.targets = {
                split: torch.as_tensor(np.asarray(self.source.targets(split)), dtype=torch.float32)
                for split in ("train", "test")
            }
        self.partitioner = cfg.partitioner.bind(self.source)
        num_classes = len(self.all_classnames)
        # the data set of every class and the member names (None: a single data set)
        owner = getattr(self.source, "class_dataset", None)
        self.class_dataset = np.asarray(owner or [0] * num_classes, dtype=np.int64)
        self.dataset_names = list(self.source.names) if owner is not None else None
        self.is_base = base_classes(self.class_dataset, cfg.base_to_novel)  # (C,) bool
        self.train_classes = np.flatnonzero(self.is_base)  # ids, ascending
        self.num_base = len(self.train_classes)
        # what clients train on (a single data set: the first ceil(C / 2) classes, or all)
        self.classnames = [self.all_classnames[c] for c in self.train_classes]
        # partition the training samples of the training classes only
        pool = np.flatnonzero(self.is_base[self.train_labels])
        self.train_domains = self.source.domains("train")
        self.test_domains = self.source.domains("test")
        parts = self.partitioner(
            self.train_labels[pool],
            cfg.num_clients,
            seed,
            domains=None if self.train_domains is None else self.train_domains[pool],
        )
        # the partition's parts; the test splits follow them (`train_parts` is what stays
        # for training after the validation hold-out)
        self.client_parts = self.train_parts = [pool[p] for p in parts]
        # each client's own class list (ids), when the partitioner gives clients one
        chooser = getattr(self.partitioner, "client_classes", None)
        self.own_classes = (
            None if chooser is None else chooser(self.train_labels[pool], cfg.num_clients)
        )
        self.test_parts = self.partitioner.split_test(
            self.train_parts,
            self.train_labels,
            self.test_labels,
            seed,
            train_domains=self.train_domains,
            test_domains=self.test_domains,
        )
        if cfg.base_to_novel:  # local evaluation stays on the training classes
            self.test_parts = [p[self.is_base[self.test_labels[p]]] for p in self.test_parts]
        self.parts = {"train": self.train_parts, "test": self.test_parts}
        if self.dataset_names is not None:  # per data set: base/<d>, novel/<d> or global/<d>
            self.parts.update(dataset_shares(self, seed))
        elif cfg.base_to_novel:  # an even, seeded share of each class set's test images
            rng = np.random.default_rng([seed, 1])
            for name, mask in (
                ("base", self.test_labels < self.num_base),
                ("novel", self.test_labels >= self.num_base),
            ):
                shares = np.array_split(rng.permutation(np.flatnonzero(mask)), cfg.num_clients)
                self.parts[name] = [np.sort(p) for p in shares]
            self.parts["global"] = self.parts["base"]
        else:  # the global protocol: an even, seeded share of the whole test set per client
            rng = np.random.default_rng([seed, 3])
            shares = np.array_split(rng.permutation(len(self.test_labels)), cfg.num_clients)
            self.parts["global"] = [np.sort(p) for p in shares]
        self.val_parts: list[np.ndarray] | None = None
        if cfg.val_fraction > 0:  # after the test splits: those do not change
            self.train_parts, self.val_parts = hold_out(
                self.client_parts, self.train_labels, cfg.val_fraction, seed
            )
            self.parts.update(train=self.train_parts, val=self.val_parts)
        self.train_set = self.test_set = self.val_set = None
        self.clip = None
        self.transfer: dict[str, DatasetSource] = {}  # other data sets' test splits

    def add_transfer(self, name: str, source: DatasetSource) -> None:
        """Evaluate on `source`'s test split too (cross-dataset, e.g. ImageNet -> ImageNet-V2):
        its test images are split evenly (seeded) among the clients as split `name`."""
        if self.multilabel or getattr(source, "multilabel", False):
            raise ConfigError("cross-dataset evaluation is for single-label data sets")
        source.check()
        labels = np.asarray(source.labels("test"), dtype=np.int64)
        rng = np.random.default_rng([self.seed, 2])
        shares = np.array_split(rng.permutation(len(labels)), self.num_clients)
        self.parts[name] = [np.sort(p) for p in shares]
        self.transfer[name] = source
        self._transfer_labels = {**getattr(self, "_transfer_labels", {}), name: labels}
        self._transfer_sets = getattr(self, "_transfer_sets", {})
        if self.clip is not None:
            self._transfer_sets[name] = source.dataset("test", self.clip.preprocess_val)

    def split_classnames(self, split: str) -> list[str]:
        """Class names of the labels of `split` (another data set's for a transfer split)."""
        return self.transfer[split].classnames if split in self.transfer else self.all_classnames

    @property
    def num_clients(self) -> int:
        return self.cfg.num_clients

    def bind(self, clip, inputs: Iterable[Input]) -> None:
        """Attach the backbone and the inputs the learner declares (`PromptLearner.inputs`).

        FEATURES: cached frozen pooled features; TOKENS: cached frozen dense token features
        (`FrozenCLIP.cached_dense_features`, float16 on the CPU, float32 in the batch);
        IMAGES: the preprocessed images (no image is loaded without it, unless random
        augmentation is on: then training batches hold the augmented images, and declared
        features and tokens are computed from them per batch, not cached; declared with
        IMAGES, features of unaugmented images are the cached ones); FLIP_TARGETS:
        the frozen features of each training image and of its horizontal flip (cached, so
        only without random augmentation)."""
        self.clip = clip
        self.inputs = frozenset(Input(i) for i in inputs)
        self.flip_targets = Input.FLIP_TARGETS in self.inputs and not self.cfg.augment
        self.use_test_cache = Input.IMAGES not in self.inputs
        self.use_train_cache = self.use_test_cache and not self.cfg.augment
        train_tf = clip.preprocess_train if self.cfg.augment else clip.preprocess_val
        self.train_set = self.source.dataset("train", train_tf)
        # the validation split: training images, never augmented
        self.val_set = (
            self.source.dataset("train", clip.preprocess_val)
            if self.cfg.augment
            else self.train_set
        )
        self.test_set = self.source.dataset("test", clip.preprocess_val)
        self._transfer_sets = {
            name: src.dataset("test", clip.preprocess_val) for name, src in self.transfer.items()
        }

    def num_train(self, k: int) -> int:
        return len(self.train_parts[k])

    def steps_per_epoch(self, k: int) -> int:
        return math.ceil(self.num_train(k) / self.cfg.batch_size)

    def batches(self, k: int, split: str, epoch_seed: int | None = None) -> Iterator[Batch]:
        """Client k's batches of `split`; shuffled by `epoch_seed` (None: in order). They
        hold the inputs given to `bind`, labels and sample ids."""
        if split not in self.parts:
            raise ValueError(f"no split {split!r} (have {sorted(self.parts)})")
        parts = self.parts[split]
        # the validation split: training images under the evaluation transform
        source_split = "train" if split in ("train", "val") else "test"
        dataset = {"train": self.train_set, "val": self.val_set}.get(split, self.test_set)
        labels = self.train_labels if source_split == "train" else self.test_labels
        cached = self.use_train_cache if split == "train" else self.use_test_cache
        bs = self.cfg.batch_size if split == "train" else self.cfg.eval_batch_size
        key = self.source.key(source_split)
        if split in self.transfer:
            dataset, labels = self._transfer_sets[split], self._transfer_labels[split]
            key = self.transfer[split].key("test")
        idx = parts[k]
        if len(idx) == 0:
            return
        order = np.arange(len(idx))
        if epoch_seed is not None:
            order = np.random.default_rng(epoch_seed).permutation(len(idx))
        # dense tokens of augmented training images differ at every step: computed per batch
        dense_per_batch = Input.TOKENS in self.inputs and split == "train" and self.cfg.augment
        tokens = None
        if Input.TOKENS in self.inputs and not dense_per_batch:
            bs_eval, nw = self.cfg.eval_batch_size, self.cfg.num_workers
            tokens = self.clip.cached_dense_features(
                key, dataset, idx, bs_eval, nw
            )  # (n_k, 1+M, D)
        targets = None
        if split == "train" and self.flip_targets:
            targets = self._flip_targets(key, dataset, idx)  # (n_k, 2, D)
        # pooled features next to the images: cached, unless the images are augmented
        feats_per_batch = not cached and Input.FEATURES in self.inputs
        feats_per_batch = feats_per_batch and split == "train" and self.cfg.augment
        feats = None
        if not cached and Input.FEATURES in self.inputs and not feats_per_batch:
            bs_eval, nw = self.cfg.eval_batch_size, self.cfg.num_workers
            feats = self.clip.cached_image_features(key, dataset, idx, bs_eval, nw)  # (n_k, D)
        if cached:
            yield from self._cached_batches(
                split, idx, labels, order, bs, key, dataset, tokens, targets
            )
            return
        if targets is not None:
            sorted_ids = torch.as_tensor(idx, device=targets.device)
        loader = DataLoader(
            IndexedSubset(dataset, idx[order]),
            batch_size=bs,
            num_workers=self.cfg.num_workers,
            collate_fn=_collate,
            # worker seeds follow the epoch's seed, not the global RNG's state
            generator=torch.Generator().manual_seed(epoch_seed or 0),
            worker_init_fn=ignore_stop_signals,
        )
        for batch in loader:
            if targets is not None:  # parts are sorted: find each sample's row
                rows = torch.searchsorted(sorted_ids, batch.index.to(sorted_ids.device))
                batch.targets = targets[rows]
            if feats is not None:
                batch.features = feats[_rows_of(idx, batch.index).to(feats.device)]
            elif feats_per_batch:
                with torch.no_grad():
                    batch.features = self.clip.encode_image(batch.images.to(self.clip.device))
            if tokens is not None:
                batch.tokens = tokens[_rows_of(idx, batch.index)].float()
            elif dense_per_batch:
                with torch.no_grad():
                    batch.tokens = self.clip.encode_dense(batch.images.to(self.clip.device)).float()
            yield batch

    def _cached_batches(self, split, idx, labels, order, bs, key, dataset, tokens, targets):
        """Batches of cached inputs only (no image loaded), in the order `order` of `idx`."""
        feats = None
        raw = Input.RAW_FEATURES in self.inputs
        if Input.FEATURES in self.inputs or raw:
            feats = self.clip.cached_image_features(
                key, dataset, idx, self.cfg.eval_batch_size, self.cfg.num_workers, not raw
            )  # (n_k, D)
        device = feats.device if feats is not None else self.clip.device
        if self.multilabel:
            lab = self.targets["train" if split in ("train", "val") else "test"][idx].to(device)
        else:
            lab = torch.as_tensor(labels[idx], device=device)
        ids = torch.as_tensor(idx, device=device)
        for s in range(0, len(idx), bs):
            sel = torch.as_tensor(order[s : s + bs], device=device)
            yield Batch(
                labels=lab[sel],
                index=ids[sel],
                features=None if feats is None else feats[sel],
                targets=None if targets is None else targets[sel.to(targets.device)],
                tokens=None if tokens is None else tokens[sel.cpu()].float(),
            )

    def local_classes(self, k: int) -> list[int]:
        """The classes of client k's part of the partition (its training and validation
        samples; what its test split follows), ascending."""
        return np.unique(self.train_labels[self.client_parts[k]]).tolist()

    def client_classes(self, k: int) -> list[int] | None:
        """Client k's own class list (ids) when the partitioner gives each client one
        (`ClassChunks`): it trains and is evaluated locally over it; None: every client
        classifies among all training classes."""
        return None if self.own_classes is None else list(self.own_classes[k])

    def train_label_map(self, k: int) -> torch.Tensor | None:
        """Class id -> position in client k's training class list (its own list, or the
        training classes), -1 elsewhere; None when that is the identity."""
        classes = self.client_classes(k)
        classes = self.train_classes.tolist() if classes is None else classes
        if classes == list(range(len(classes))):
            return None
        remap = torch.full((len(self.all_classnames),), -1, dtype=torch.long)
        remap[torch.as_tensor(classes, dtype=torch.long)] = torch.arange(len(classes))
        return remap

    def dataset_classes(self, d: int, which: str = "all") -> list[int]:
        """The class ids of data set d: 'all', 'base' (its training classes) or 'novel'."""
        mine = self.class_dataset == d
        mask = {"all": mine, "base": mine & self.is_base, "novel": mine & ~self.is_base}[which]
        return np.flatnonzero(mask).tolist()

    def client_dataset(self, k: int) -> str | None:
        """The data set client k trains on (most of its training samples), or None for a
        single data set."""
        if self.dataset_names is None or len(self.client_parts[k]) == 0:
            return None
        owner = self.class_dataset[self.train_labels[self.client_parts[k]]]
        return self.dataset_names[int(np.bincount(owner).argmax())]

    def _flip_targets(self, key: str, dataset, idx: np.ndarray) -> torch.Tensor:
        """Frozen features of samples `idx` and of their horizontal flips, (n, 2, D), in the
        order of `idx` (both cached once per sample)."""
        bs, nw = self.cfg.eval_batch_size, self.cfg.num_workers
        plain = self.clip.cached_image_features(key, dataset, idx, bs, nw)
        flipped = self.clip.cached_image_features(f"{key}/hflip", _Flipped(dataset), idx, bs, nw)
        return torch.stack([plain, flipped], dim=1)

    def client_domains(self) -> list[str | None]:
        """Each client's domain: the most common domain among its training samples (None
        for single-domain data)."""
        names = self.source.domain_names
        domains = self.train_domains if names else None
        if domains is None:
            return [None] * self.num_clients
        owner = self.partitioner.domain_of_clients(domains, self.num_clients)
        if owner is not None:
            return [names[d] if d is not None and d >= 0 else None for d in owner]
        out: list[str | None] = []
        for part in self.client_parts:
            counts = np.bincount(domains[part], minlength=len(names)) if len(part) else None
            out.append(names[int(counts.argmax())] if counts is not None else None)
        return out

    def summary(self) -> dict:
        """Per-client sample and class counts of every split (and domain, if any):
        `fedclip.data.holdout.split_summary`."""
        return split_summary(self)
