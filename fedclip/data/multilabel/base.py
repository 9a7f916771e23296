"""The multi-label source contract (`MultiLabelSource`) and the shared code of the on-disk
readers (`_OnDisk`)."""

from __future__ import annotations

import abc
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from fedclip.data.files import missing
from fedclip.data.source import SPLITS, DatasetSource, _check_split
from fedclip.errors import DataError

log = logging.getLogger(__name__)


def rarest_labels(targets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each row's rarest positive class: int64 (N,) from 0/1 `targets` (N, C) and the number
    of positive images of every class `counts` (C,). Ties go to the lower class id; a row with
    no positive gets -1."""
    targets = np.asarray(targets)
    counts = np.asarray(counts)
    if targets.ndim != 2 or counts.shape != (targets.shape[1],):
        raise ValueError(
            f"targets (N, C) and counts (C,) expected, got {targets.shape}, {counts.shape}"
        )
    C = targets.shape[1]
    rank = np.empty(C, dtype=np.int32)
    rank[np.lexsort((np.arange(C), counts))] = np.arange(C, dtype=np.int32)  # 0 = rarest
    masked = np.where(targets != 0, rank, np.int32(C))  # (N, C); C marks "absent"
    labels = masked.argmin(axis=1).astype(np.int64)
    labels[masked.min(axis=1, initial=C) == C] = -1
    return labels


@dataclass
class _Loaded:
    refs: list[Any]  # what `_image` needs to produce image i (a relative path, an index, ...)
    targets: np.ndarray  # uint8 (N, C)


class MultiLabelSource(DatasetSource):
    """A multi-label data set with a train and a test split.

    Contract, on top of `DatasetSource`'s:
    - `multilabel` is True.
    - `targets(split)` is a uint8 array (N, C), 1 where class c is present in image i; like
      `labels`, it must not decode images.
    - `labels(split)` is int64 (N,): each image's rarest positive class, rarity being the number
      of positive train images per class (`positive_counts("train")`), ties to the lower class
      id. It is the one-integer key partitioners split on.
    - `dataset(split, transform)[i]` is `(transform(PIL RGB image), float tensor (C,))` (the PIL
      image itself when transform is None), with `targets(split)[i]` as the tensor.
    - Images with no positive class are not part of the split; how many were left out is
      logged once per split.

    A subclass gives `title`, `classnames`, `_read(split)` (every image's reference and its
    targets, before the no-label filter) and `_image(split, ref)`; the splits are read once, on
    first use, and kept. Subclasses must call `super().__init__()`.
    """

    multilabel = True
    title: ClassVar[str]  # the data set's name as its authors write it, for messages

    def __init__(self) -> None:
        self._splits: dict[str, _Loaded] = {}
        self._labels: dict[str, np.ndarray] = {}
        self._digests: dict[str, str] = {}

    @abc.abstractmethod
    def _read(self, split: str) -> tuple[list[Any], np.ndarray]:
        """(reference of every image, 0/1 targets (N, C)) of `split`, images without a positive
        included: the base class leaves them out. Must not decode images."""

    @abc.abstractmethod
    def _image(self, split: str, ref: Any) -> Image.Image:
        """The RGB PIL image of reference `ref` of `split`."""

    def _loaded(self, split: str) -> _Loaded:
        _check_split(split)
        if split not in self._splits:
            refs, targets = self._read(split)
            refs = list(refs)
            targets = (np.asarray(targets) != 0).astype(np.uint8)
            if targets.shape != (len(refs), self.num_classes):
                raise ValueError(
                    f"{self.title} {split}: targets of shape {targets.shape} for {len(refs)} "
                    f"images and {self.num_classes} classes"
                )
            keep = targets.any(axis=1)
            if not keep.all():
                log.info(
                    "%s %s: left out %d of %d images with no positive label",
                    self.title,
                    split,
                    int((~keep).sum()),
                    len(refs),
                )
                refs = [r for r, k in zip(refs, keep.tolist(), strict=True) if k]
                targets = targets[keep]
            if not refs:
                raise DataError(f"{self.title}: no {split} image has a label{self._where()}")
            self._splits[split] = _Loaded(refs, targets)
        return self._splits[split]

    def _where(self) -> str:
        """Where the data is, for messages: " under <folder>", or "" for drawn data."""
        return ""

    # ---------------------------------------------------------------- the DatasetSource API

    def targets(self, split: str) -> np.ndarray:
        """uint8 targets (N, C) of `split`: 1 where the class is in the image."""
        return self._loaded(split).targets.copy()  # callers may edit theirs

    def positive_counts(self, split: str) -> np.ndarray:
        """int64 (C,): the number of images of `split` that show each class."""
        return self._loaded(split).targets.sum(axis=0, dtype=np.int64)

    def labels(self, split: str) -> np.ndarray:
        """int64 (N,): each image's rarest positive class by train frequency (ties: lower id)."""
        _check_split(split)
        if split not in self._labels:
            counts = self.positive_counts("train")
            self._labels[split] = rarest_labels(self._loaded(split).targets, counts)
        return self._labels[split].copy()

    def dataset(self, split: str, transform: Callable | None) -> torch.utils.data.Dataset:
        loaded = self._loaded(split)
        return _MultiLabelImages(self, split, loaded.refs, loaded.targets, transform)

    def key(self, split: str) -> str:
        """Name and a digest of the split's class names, image references and targets."""
        _check_split(split)
        if split not in self._digests:
            loaded = self._loaded(split)
            h = hashlib.sha1("\n".join(self.classnames).encode())
            h.update("\n".join(map(str, loaded.refs)).encode())
            h.update(np.ascontiguousarray(loaded.targets).tobytes())
            self._digests[split] = h.hexdigest()[:12]
        return f"{self.name}/{split}-{self._digests[split]}"

    def check(self) -> None:
        for split in SPLITS:
            self._loaded(split)


class _MultiLabelImages(torch.utils.data.Dataset):
    """(transform(image), float targets (C,)) of one split of a `MultiLabelSource`."""

    def __init__(
        self,
        source: MultiLabelSource,
        split: str,
        refs: list[Any],
        targets: np.ndarray,
        transform: Callable | None,
    ):
        self.source, self.split, self.refs, self.targets = source, split, refs, targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        if not 0 <= i < len(self.refs):
            raise IndexError(f"index {i} out of range for {len(self.refs)} items")
        image = self.source._image(self.split, self.refs[i])
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.from_numpy(self.targets[i].astype(np.float32))


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise DataError(f"cannot read image {path} ({e})") from None


class _OnDisk(MultiLabelSource):
    """Shared code of the readers: the folder, the one-line missing-data error, image files.

    Image references are paths relative to `folder`.
    """

    folder_name: ClassVar[str]  # under root
    layout: ClassVar[str]  # what must be under root, for messages
    url: ClassVar[str]  # the official source

    def __init__(self, root: str = "data"):
        super().__init__()
        self.root = os.path.abspath(os.path.expanduser(root))

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.folder_name

    def _where(self) -> str:
        return f" under {self.folder}"

    def _how(self) -> str:
        return f"get it from {self.url} and unpack it under {self.root} as {self.layout}"

    def _require(self, *paths: Path) -> None:
        absent = next((p for p in paths if not p.exists()), None)
        if absent is not None:
            raise missing(self.title, absent, self._how())

    def _lines(self, path: Path) -> list[str]:
        """Stripped, non-empty lines of a text file (CRLF or LF)."""
        self._require(path)
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return [s for s in (line.strip() for line in f) if s]
        except OSError as e:  # a folder where the file should be, no permission, ...
            reason = (str(e).splitlines() or [""])[0]
            raise DataError(f"cannot read {path} ({type(e).__name__}: {reason})") from None

    def _image(self, split: str, ref: str) -> Image.Image:
        return _open_rgb(self.folder / ref)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r})"
