"""CIFAR-10 and CIFAR-100 through torchvision, from the published python-pickle batches, with
torchvision's errors mapped to one-line `DataError`s."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torchvision

from fedclip.data.source import DatasetSource, _check_split, _Transformed
from fedclip.errors import DataError

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


class _CIFAR(DatasetSource):
    """Shared code of CIFAR10 and CIFAR100: torchvision reads the pickles, we map its errors."""

    _torchvision: type[torchvision.datasets.CIFAR10]
    _title: str  # as the dataset's authors write it, for messages

    def __init__(self, root: str = "data", download: bool = False):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.download = download
        self._splits: dict[str, torchvision.datasets.CIFAR10] = {}

    @property
    def folder(self) -> str:
        return os.path.join(self.root, self._torchvision.base_folder)

    def _load(self, split: str) -> torchvision.datasets.CIFAR10:
        _check_split(split)
        if split not in self._splits:
            self._splits[split] = self._open(split)
        return self._splits[split]

    def _open(self, split: str) -> torchvision.datasets.CIFAR10:
        where = f"{self._torchvision.base_folder}/"
        fix = f"point root at a folder holding {where} from {_CIFAR_URL}"
        try:
            return self._torchvision(self.root, train=split == "train", download=self.download)
        except OSError as e:  # no network, refused, disk full ... (URLError is an OSError)
            reason = (str(e).splitlines() or [""])[0]
            raise DataError(
                f"{self._title} download to {self.root} failed ({type(e).__name__}: {reason}); "
                f"check the internet connection or {fix}"
            ) from None
        except RuntimeError:  # torchvision: "Dataset not found or corrupted ..."
            if self.download:
                raise DataError(
                    f"{self._title} under {self.root} is corrupted after download; "
                    f"delete {self.folder} and retry, or {fix}"
                ) from None
            if not os.path.isdir(self.folder):
                raise DataError(
                    f"{self._title} not found under {self.root} (looked for {where}); "
                    f"set data.dataset.init_args.download=true to fetch it (needs internet) "
                    f"or {fix}"
                ) from None
            raise DataError(
                f"{self._title} under {self.root} is corrupt or incomplete ({self._damage()}); "
                f"delete {self.folder} and set data.dataset.init_args.download=true to fetch it "
                f"again (needs internet), or {fix}"
            ) from None
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
            # files that pass the integrity check but do not unpickle into CIFAR batches
            reason = (str(e).splitlines() or [""])[0]
            raise DataError(
                f"{self._title} under {self.root} is corrupt: {self.folder} holds files that are "
                f"not CIFAR python batches ({type(e).__name__}: {reason[:120]}); {fix}"
            ) from None

    def _damage(self) -> str:
        """Which of the published files are missing from the folder or fail their checksum."""
        tv = self._torchvision
        expected = [*tv.train_list, *tv.test_list, [tv.meta["filename"], tv.meta["md5"]]]
        missing_files, bad = [], []
        for filename, md5 in expected:
            path = os.path.join(self.folder, filename)
            if not os.path.isfile(path):
                missing_files.append(filename)
            elif not torchvision.datasets.cifar.check_integrity(path, md5):
                bad.append(filename)
        parts = []
        if bad:
            parts.append(f"{', '.join(bad)} in {self.folder} fail the published checksums")
        if missing_files:
            parts.append(f"{', '.join(missing_files)} missing from {self.folder}")
        return "; ".join(parts) or f"torchvision cannot read {self.folder}"

    @property
    def classnames(self) -> list[str]:
        return [c.replace("_", " ") for c in self._load("test").classes]

    def labels(self, split: str) -> np.ndarray:
        return np.asarray(self._load(split).targets, dtype=np.int64)

    def dataset(self, split: str, transform: Callable | None) -> torch.utils.data.Dataset:
        return _Transformed(self._load(split), transform)


class CIFAR10(_CIFAR):
    """CIFAR-10: 60,000 32x32 images of 10 classes (50,000 train, 10,000 test), via torchvision.

    Args:
        root: Folder holding (or to receive) cifar-10-batches-py/.
        download: Download the data into root if it is not there (needs internet).
    """

    name = "cifar10"
    _torchvision = torchvision.datasets.CIFAR10
    _title = "CIFAR-10"


class CIFAR100(_CIFAR):
    """CIFAR-100: 60,000 32x32 images of 100 classes in 20 superclasses, via torchvision.

    `coarse_labels(split)` gives the superclass of every image (for two-level partitions).

    Args:
        root: Folder holding (or to receive) cifar-100-python/.
        download: Download the data into root if it is not there (needs internet).
    """

    name = "cifar100"
    _torchvision = torchvision.datasets.CIFAR100
    _title = "CIFAR-100"

    def __init__(self, root: str = "data", download: bool = False):
        super().__init__(root, download)
        self._coarse: dict[str, np.ndarray] = {}

    def coarse_labels(self, split: str) -> np.ndarray:
        """int64 superclass labels (N,) of `split`, aligned with `labels(split)`."""
        if split not in self._coarse:
            dataset = self._load(split)  # checks the files, downloads them if asked
            # torchvision keeps only the fine labels, so read the split's pickle once more.
            filename = (dataset.train_list if split == "train" else dataset.test_list)[0][0]
            entry = self._unpickle(filename)
            try:
                self._coarse[split] = np.asarray(entry["coarse_labels"], dtype=np.int64)
            except (KeyError, TypeError, ValueError):
                raise self._not_batches(filename, "no coarse_labels") from None
        return self._coarse[split]

    @property
    def class_groups(self) -> list[int]:
        """Superclass of every fine class, read from the labels (-1 for a class with no
        image in either split)."""
        groups = np.full(len(self.classnames), -1, dtype=np.int64)
        for split in ("test", "train"):
            groups[self.labels(split)] = self.coarse_labels(split)
        return groups.tolist()

    @property
    def coarse_classnames(self) -> list[str]:
        """Readable superclass names, index = coarse label."""
        self._load("test")
        meta = self._unpickle("meta")
        try:
            return [c.replace("_", " ") for c in meta["coarse_label_names"]]
        except (KeyError, TypeError, AttributeError):
            raise self._not_batches("meta", "no coarse_label_names") from None

    def _unpickle(self, filename: str) -> Any:
        """One of the published pickles, read again (torchvision keeps only the fine labels);
        torchvision has already checked that it is there."""
        try:
            with open(os.path.join(self.folder, filename), "rb") as f:
                return pickle.load(f, encoding="latin1")
        except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
            raise self._not_batches(filename, f"{type(e).__name__}: {e}") from None

    def _not_batches(self, filename: str, reason: str) -> DataError:
        reason = (reason.splitlines() or [""])[0][:120]
        return DataError(
            f"{self._title} under {self.root} is corrupt: {os.path.join(self.folder, filename)} "
            f"is not a CIFAR-100 python batch ({reason}); {_CIFAR_URL}"
        )
