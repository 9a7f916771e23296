"""The data-set contract (`DatasetSource`) every source follows, and the small wrappers the
federation feeds from it."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

SPLITS = ("train", "test")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class DatasetSource(abc.ABC):
    """A classification data set with a train and a test split.

    Contract, the same for every source so the federation never asks which one it has:
    - `classnames[c]` is the readable name of label c (spaces, not underscores).
    - `labels(split)` is an int64 array (N,) and must not decode images: partitioners call it.
    - `dataset(split, transform)[i]` is `(transform(PIL image), int label)` (the PIL image itself
      when transform is None), with `labels(split)[i]` as its label.
    - `key(split)` changes whenever the content of the split does; feature caches key on it.
    - `check()` raises `DataError` now, with a one-line fix, if the data is missing.
    """

    name: str
    multilabel: bool = False

    @property
    @abc.abstractmethod
    def classnames(self) -> list[str]:
        """Readable class names, index = label."""

    @abc.abstractmethod
    def labels(self, split: str) -> np.ndarray:
        """int64 labels (N,) of `split` ("train" or "test"), without decoding any image."""

    @abc.abstractmethod
    def dataset(self, split: str, transform: Callable | None) -> torch.utils.data.Dataset:
        """Item i -> (transform(PIL image) or the PIL image if transform is None, int label)."""

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def class_groups(self) -> list[int] | None:
        """Group id of every class (e.g. CIFAR-100's superclasses), or None: no grouping."""
        return None

    @property
    def domain_names(self) -> list[str] | None:
        """Names of the domains (index = domain id) of a multi-domain data set, else None."""
        return None

    def domains(self, split: str) -> np.ndarray | None:
        """int64 domain id (N,) of every sample of `split`, aligned with `labels(split)`, or
        None for a single-domain data set. Must not decode images."""
        return None

    def key(self, split: str) -> str:
        """Stable identity of a split: the name plus every argument that changes its content."""
        _check_split(split)
        return f"{self.name}/{split}"

    def planned_size(self, split: str) -> tuple[int, str] | None:
        """(samples of `split`, the init arg that sets it, as 'arg=value') when a data set
        knows its size before listing a label (one drawn on the fly), so that a size no
        memory can hold is refused before anything is allocated; None: it is read from
        disk (the default)."""
        return None

    def planned_pixels(self) -> tuple[int, str] | None:
        """(side in pixels of the images it draws, 'arg=value') for a data set that draws
        them, None (the default) for one that reads files."""
        return None

    def check(self) -> None:
        """Raise `DataError` now if the data is missing, rather than at the first batch."""
        for split in SPLITS:
            self.labels(split)


class IndexedSubset(torch.utils.data.Dataset):
    """Items `indices` of `dataset`, each returned with its index into `dataset`.

    Item j is `(image, label, int(indices[j]))`: the base index lets feature caches key by sample
    whatever client or subset the sample is seen through.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, indices: np.ndarray | list[int]):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {self.indices.shape}")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[Any, int, int]:
        i = int(self.indices[j])
        image, label = self.dataset[i]
        return image, label, i


class _Transformed(torch.utils.data.Dataset):
    """(image, label) pairs of `base` with `transform` applied to the image."""

    def __init__(self, base: torch.utils.data.Dataset, transform: Callable | None):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.base[i]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(label)
