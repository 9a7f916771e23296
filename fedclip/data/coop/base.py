"""The shared code of the CoOp readers (`_CoOpDataset`): CoOp's split files, the fallback
splits (the data set's own lists or a saved seeded one), downloads through torchvision, keys
and the one-line missing-data errors; and the small readers of folders and lists they use."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.io
import torch
import torchvision
from scipy.io.matlab import MatReadError

from fedclip.data.files import ImageList, Item, missing, seeded_split
from fedclip.data.source import SPLITS, DatasetSource, _check_split
from fedclip.errors import DataError

log = logging.getLogger(__name__)

_DATASETS_MD = "CoOp's DATASETS.md"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _subdirs(path: Path) -> list[str]:
    """Sorted names of the visible sub-folders of `path`; labels follow this order."""
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _images(path: Path) -> list[str]:
    """Sorted names of the image files directly in `path` (no README.txt, no hidden files)."""
    with os.scandir(path) as entries:
        return sorted(
            e.name
            for e in entries
            if e.is_file()
            and not e.name.startswith(".")
            and e.name.lower().endswith(_IMAGE_SUFFIXES)
        )


def _class_folder_items(image_dir: Path, classes: Sequence[str]) -> list[Item]:
    """("<class>/<file>", label) for every image in image_dir/<classes[label]>/."""
    return [(f"{c}/{f}", label) for label, c in enumerate(classes) for f in _images(image_dir / c)]


def _by_label(names: dict[int, str], where: str | Path) -> list[str]:
    """The class names of a {label: name} map as a list, checking the labels run 0..C-1."""
    absent = [y for y in range(len(names)) if y not in names]
    if absent:
        raise DataError(
            f"{where}: class labels must run from 0 to {len(names) - 1}, "
            f"but label {absent[0]} has no sample (labels present: {min(names)}..{max(names)})"
        )
    return [names[y] for y in range(len(names))]


@dataclass
class _Split:
    """What a reader found on disk.

    `protocol` says where the split came from: "zhou" (CoOp's split file), "official" (the
    data set's own lists), "seeded" (fedclip's saved random split) or "eval" (no train split).
    """

    classnames: list[str]
    train: list[Item]
    test: list[Item]
    protocol: str
    labels: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.labels = {
            split: np.fromiter((y for _, y in items), dtype=np.int64, count=len(items))
            for split, items in (("train", self.train), ("test", self.test))
        }

    def items(self, split: str) -> list[Item]:
        return self.train if split == "train" else self.test


class _CoOpDataset(DatasetSource):
    """Shared code of the CoOp readers: CoOp's split file, the fallback splits, the image list,
    keys and the one-line missing-data errors.

    A subclass names its folders and source and implements `_scan()`, which reads the data
    set's raw layout when CoOp's split file is absent.
    """

    title: ClassVar[str]  # the data set's name as its authors write it, for messages
    folder_name: ClassVar[str]  # CoOp's folder under root
    image_subdir: ClassVar[str]  # image folder inside it ("" = itself); split-file paths start here
    url: ClassVar[str]  # the official source, for the missing-data message
    zhou: ClassVar[str | None] = None  # <Name> of CoOp's split_zhou_<Name>.json; None: none
    renames: ClassVar[dict[str, str]] = {}  # raw class name -> CoOp's readable name
    # torchvision data set whose download lands in this layout, and the root to give it
    # (relative to ours): only set where that is true.
    _torchvision: ClassVar[type[torchvision.datasets.VisionDataset] | None] = None
    _torchvision_root: ClassVar[str] = "."

    def __init__(self, root: str = "data"):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.download = False
        self._split: _Split | None = None

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.folder_name

    @property
    def image_dir(self) -> Path:
        return self.folder / self.image_subdir

    def _required(self) -> list[Path]:
        """Paths that must exist before anything is read; the first missing one is reported."""
        return [self.image_dir]

    # ---------------------------------------------------------------- the DatasetSource API

    @property
    def classnames(self) -> list[str]:
        return list(self._load().classnames)

    def labels(self, split: str) -> np.ndarray:
        _check_split(split)
        return self._load().labels[split].copy()  # callers may sort or edit theirs

    def dataset(self, split: str, transform: Callable | None) -> torch.utils.data.Dataset:
        _check_split(split)
        return ImageList(self.image_dir, self._load().items(split), transform)

    def key(self, split: str) -> str:
        _check_split(split)
        s = self._load()
        return (
            f"{self.name}-{s.protocol}{self._key_extra()}-c{len(s.classnames)}"
            f"-n{len(s.items(split))}/{split}"
        )

    def check(self) -> None:
        self._load()

    def _key_extra(self) -> str:
        """Constructor arguments that change the content, for `key`."""
        return ""

    # ---------------------------------------------------------------- loading

    def _load(self) -> _Split:
        if self._split is None:
            self._ensure_present()
            split_file = self.folder / f"split_zhou_{self.zhou}.json" if self.zhou else None
            if split_file is not None and split_file.is_file():
                split = self._read_split_file(split_file)
            else:
                try:
                    split = self._scan()
                except DataError:
                    raise
                except (KeyError, ValueError, IndexError, TypeError, OSError) as e:
                    # A list naming an unknown class, a malformed line, an unreadable folder
                    # ...: one line, no trace.
                    reason = (str(e).splitlines() or [""])[0]
                    raise DataError(
                        f"cannot read {self.title} under {self.folder} "
                        f"({type(e).__name__}: {reason}); check its layout against {_DATASETS_MD}"
                    ) from None
                if split_file is not None:
                    log.warning(
                        "%s: no %s in %s, so using the %s split, not CoOp's (see %s)",
                        self.title,
                        split_file.name,
                        self.folder,
                        split.protocol,
                        _DATASETS_MD,
                    )
            for name in ("test",) if split.protocol == "eval" else SPLITS:
                if not split.items(name):
                    raise DataError(
                        f"{self.title}: no {name} images found under {self.folder}; "
                        f"check its layout against {_DATASETS_MD}"
                    )
            self._split = split
        return self._split

    def _ensure_present(self) -> None:
        absent = next((p for p in self._required() if not p.exists()), None)
        if absent is not None and self.download:
            self._fetch()
            absent = next((p for p in self._required() if not p.exists()), None)
        if absent is not None:
            raise self._missing(absent)

    def _how(self) -> str:
        """How to get the data, for the missing-data message."""
        how = f"get it from {self.url} and lay it out under {self.folder} as {_DATASETS_MD} says"
        if self.zhou:
            how += f" (with split_zhou_{self.zhou}.json for CoOp's exact split)"
        if self._torchvision is not None:
            how = f"set data.dataset.init_args.download=true to fetch it (needs internet), or {how}"
        return how

    def _missing(self, path: Path) -> DataError:
        return missing(self.title, path, self._how())

    def _fetch(self) -> None:
        """Download through torchvision (only called where `_torchvision` is set)."""
        assert self._torchvision is not None
        where = os.path.normpath(self.folder / self._torchvision_root)
        os.makedirs(where, exist_ok=True)
        manual = f"get it from {self.url} and lay it out under {self.folder} as {_DATASETS_MD} says"
        try:
            self._torchvision(where, download=True)
        except OSError as e:  # no network, refused, disk full ... (URLError is an OSError)
            reason = (str(e).splitlines() or [""])[0]
            raise DataError(
                f"{self.title} download to {where} failed ({type(e).__name__}: {reason}); "
                f"check the internet connection or {manual}"
            ) from None
        except RuntimeError as e:  # torchvision: checksum mismatch, "Dataset not found" ...
            reason = (str(e).splitlines() or [""])[0]
            raise DataError(
                f"{self.title} under {where} is corrupted after download ({reason}); "
                f"delete it and retry, or {manual}"
            ) from None

    def _read_split_file(self, path: Path) -> _Split:
        """CoOp's split file: {"train"|"val"|"test": [[path, label, classname], ...]}."""
        try:
            raw = json.loads(path.read_text())
            parts = {
                split: [(str(p), int(y), str(c)) for p, y, c in raw[split]] for split in SPLITS
            }
        except (OSError, ValueError, KeyError, TypeError) as e:
            reason = (str(e).splitlines() or [""])[0]
            raise DataError(
                f"{path} is not a CoOp split file ({type(e).__name__}: {reason}); "
                f"get it again as {_DATASETS_MD} says, or delete it to use fedclip's split"
            ) from None
        names: dict[int, str] = {}
        for _, y, c in parts["train"] + parts["test"]:
            name = self._readable(c)
            if names.setdefault(y, name) != name:
                raise DataError(f"{path}: label {y} is both {names[y]!r} and {name!r}")
        return _Split(
            _by_label(names, path),
            [(rel, y) for rel, y, _ in parts["train"]],
            [(rel, y) for rel, y, _ in parts["test"]],
            "zhou",
        )

    def _readable(self, raw: str) -> str:
        """CoOp's name of a raw class name, underscores as spaces (what the prompts read)."""
        return self.renames.get(raw, raw).replace("_", " ").strip()

    def _seeded(self, raw_classnames: Sequence[str], items: Sequence[Item]) -> _Split:
        """fedclip's stratified split of `items`, saved next to the data and reused."""
        parts = seeded_split(self.folder, f"split_fedclip_{type(self).__name__}.json", items)
        names = [self._readable(c) for c in raw_classnames]
        return _Split(names, parts["train"], parts["test"], "seeded")

    def _official(
        self, raw_names: dict[int, str] | Sequence[str], train: list[Item], test: list[Item]
    ) -> _Split:
        names = raw_names if isinstance(raw_names, dict) else dict(enumerate(raw_names))
        readable = {y: self._readable(c) for y, c in names.items()}
        return _Split(_by_label(readable, self.folder), train, test, "official")

    def _lines(self, path: Path) -> list[str]:
        """Stripped, non-empty, non-comment lines of a text list (CRLF or LF)."""
        if not path.is_file():
            raise self._missing(path)
        with open(path) as f:
            return [s for s in (line.strip() for line in f) if s and not s.startswith("#")]

    def _loadmat(self, path: Path) -> dict[str, Any]:
        if not path.is_file():
            raise self._missing(path)
        try:
            return scipy.io.loadmat(path)
        except (OSError, ValueError, MatReadError) as e:
            reason = (str(e).splitlines() or [""])[0]
            raise DataError(f"cannot read {path} ({type(e).__name__}: {reason})") from None

    def _scan(self) -> _Split:
        """Read the raw layout (CoOp's split file is absent)."""
        raise NotImplementedError


class _Downloadable(_CoOpDataset):
    """A CoOp reader whose data torchvision can download into the expected layout."""

    def __init__(self, root: str = "data", download: bool = False):
        super().__init__(root)
        self.download = download
