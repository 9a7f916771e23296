"""`DomainFolders`: the shared reader of data sets stored as <folder>/<domain>/<class>/<image>
(domain ids, seeded or listed splits, keys, one-line errors)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedclip.data.files import ImageList, missing, seeded_split
from fedclip.data.source import SPLITS, DatasetSource, _check_split
from fedclip.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
TEST_FRACTION = 0.2  # of every class of every domain, where no official split exists
SPLIT_SEED = 0

# (image path relative to the data set folder, class folder name), per split
Listing = dict[str, list[tuple[str, str]]]


@dataclass
class _Loaded:
    classes: list[str]  # class folder names, index = label
    items: dict[str, list[tuple[str, int]]]  # split -> (relative path, label)
    labels: dict[str, np.ndarray]
    domains: dict[str, np.ndarray]
    digest: dict[str, str]


def _is_list(value: object) -> bool:
    """A list or tuple (of names): what a YAML list becomes; a string is not one."""
    return isinstance(value, (list, tuple))


class DomainFolders(DatasetSource):
    """A data set stored as <folder>/<domain>/<class>/<image>, one sub-folder per domain.

    Subclasses name the data set and its domains, and how to get it; they override
    `_read_domain` when the data set publishes its own split lists (the default scans the
    class folders and splits each domain with `seeded_split`) and `_select_classes` when only
    some classes are used. Files are read once, on first use: constructing a source never
    touches the disk.

    Args:
        root: Folder holding the data set's folder.
        domains: The domains to use (default: all), kept in the data set's order; domain ids
            index this list.
    """

    name: str
    title: str  # as its authors write it, for messages
    folder_name: str  # under root
    all_domains: tuple[str, ...]
    source_hint: str  # where to get it, for the missing-data message

    def __init__(self, root: str = "data", domains: list[str] | None = None):
        self.root = os.path.abspath(os.path.expanduser(root))
        self._domains = self._pick_domains(domains)
        self._loaded: _Loaded | None = None

    def _pick_domains(self, domains: Sequence[str] | None) -> list[str]:
        if domains is None:
            return list(self.all_domains)
        if not _is_list(domains) or len(domains) == 0:
            raise ConfigError(f"{self.title}: domains must be a non-empty list, got {domains!r}")
        unknown = [d for d in domains if d not in self.all_domains]
        if unknown:
            raise ConfigError(
                f"{self.title}: unknown domain {unknown[0]!r}; its domains are "
                f"{', '.join(self.all_domains)}"
            )
        if len(set(domains)) != len(domains):
            raise ConfigError(f"{self.title}: domains has repeats: {list(domains)}")
        return [d for d in self.all_domains if d in domains]

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.folder_name

    @property
    def layout(self) -> str:
        """The expected layout, for messages."""
        return f"{self.folder_name}/<domain>/<class>/<image>.jpg"

    def _how(self) -> str:
        return f"get it from {self.source_hint} and unpack it as {self.root}/{self.layout}"

    # -- reading ------------------------------------------------------------------------------

    def _scan(self, domain: str) -> list[tuple[str, str]]:
        """(relative path, class folder) of every image of `domain`, sorted."""
        where = self.folder / domain
        if not where.is_dir():
            raise missing(f"{self.title} domain {domain!r}", where, self._how())
        items = []
        for cls in sorted(e.name for e in os.scandir(where) if e.is_dir()):
            if cls.startswith("."):
                continue
            for f in sorted(os.listdir(where / cls)):
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                    items.append((f"{domain}/{cls}/{f}", cls))
        if not items:
            raise DataError(
                f"{self.title}: no images under {where} (expected {domain}/<class>/<image>.jpg)"
            )
        return items

    def _seeded(self, domain: str) -> Listing:
        """The domain's images, split by `seeded_split` (saved next to the data)."""
        items = self._scan(domain)
        class_of = dict(items)
        local = {c: i for i, c in enumerate(sorted(set(class_of.values())))}
        split = seeded_split(
            self.folder,
            f"fedclip_split_{domain.replace(' ', '_')}.json",
            [(rel, local[c]) for rel, c in items],
            TEST_FRACTION,
            SPLIT_SEED,
        )
        return {s: [(rel, class_of[rel]) for rel, _ in split[s]] for s in SPLITS}

    def _read_list(
        self, path: Path, domain: str, first_label: int = 0
    ) -> tuple[list[tuple[str, str]], dict[str, int]]:
        """Lines "<domain>/<class>/<image> <label>" -> (path, class folder) items and the
        label id of every class, counted from `first_label`."""
        if not path.is_file():
            raise missing(f"{self.title} split list", path, self._how())
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            reason = (str(e).splitlines() or [""])[0]
            raise DataError(f"cannot read {path} ({type(e).__name__}: {reason})") from None
        items, ids = [], {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            fields = line.rsplit(None, 1)
            parts = fields[0].split("/")
            try:
                label = int(fields[1]) - first_label
            except (IndexError, ValueError):
                label = -1
            if len(fields) != 2 or label < 0 or len(parts) < 3 or parts[0] != domain:
                raise DataError(
                    f"{path}:{n}: expected '{domain}/<class>/<image> <label>' with labels from "
                    f"{first_label}, got {line.strip()!r}"
                )
            cls = parts[-2]
            if ids.setdefault(cls, label) != label:
                raise DataError(
                    f"{path}:{n}: class {cls!r} has label {label + first_label} here but "
                    f"{ids[cls] + first_label} above; the list does not match its image folders"
                )
            items.append((fields[0], cls))
        return items, ids

    def _read_domain(self, domain: str) -> tuple[Listing, dict[str, int]]:
        """Both splits of `domain` and the label id of each class its split lists give ({}
        when the data set has no lists)."""
        return self._seeded(domain), {}

    def _select_classes(self, classes: list[str]) -> list[str]:
        """The classes used, in label order, out of all those found (in label order)."""
        return classes

    def _load(self) -> _Loaded:
        if self._loaded is not None:
            return self._loaded
        if not self.folder.is_dir():
            raise missing(self.title, self.folder, self._how())
        listings, ids = {}, {}
        for d in self._domains:
            listings[d], domain_ids = self._read_domain(d)
            for cls, i in domain_ids.items():
                if ids.setdefault(cls, i) != i:
                    raise DataError(
                        f"{self.title}: class {cls!r} has label {i} in the lists of {d} but "
                        f"{ids[cls]} in another domain's"
                    )
        by_id = {}
        for cls, i in ids.items():
            if by_id.setdefault(i, cls) != cls:
                raise DataError(
                    f"{self.title}: label {i} names both {by_id[i]!r} and {cls!r} in the split "
                    "lists; they do not match the image folders"
                )
        found = sorted({c for lst in listings.values() for s in SPLITS for _, c in lst[s]})
        # classes with a label id first, by id, then the others by name
        found.sort(key=lambda c: (0, ids[c], c) if c in ids else (1, 0, c))
        classes = self._select_classes(found)
        index = {c: i for i, c in enumerate(classes)}
        items, labels, domains, digest = {}, {}, {}, {}
        for split in SPLITS:
            rows = [
                (rel, index[c], d)
                for d, name in enumerate(self._domains)
                for rel, c in listings[name][split]
                if c in index
            ]
            items[split] = [(rel, y) for rel, y, _ in rows]
            labels[split] = np.array([y for _, y, _ in rows], dtype=np.int64)
            domains[split] = np.array([d for _, _, d in rows], dtype=np.int64)
            counts = np.bincount(domains[split], minlength=len(self._domains))
            if counts.min() == 0:
                raise DataError(
                    f"{self.title}: domain {self._domains[counts.argmin()]!r} has no {split} "
                    "images of the classes used"
                )
            h = hashlib.sha1("\n".join(classes).encode())
            h.update("\n".join(f"{rel}\t{y}\t{d}" for rel, y, d in rows).encode())
            digest[split] = h.hexdigest()[:12]
        self._loaded = _Loaded(classes, items, labels, domains, digest)
        return self._loaded

    # -- DatasetSource ------------------------------------------------------------------------

    @property
    def classnames(self) -> list[str]:
        return [c.replace("_", " ") for c in self._load().classes]

    @property
    def domain_names(self) -> list[str]:
        return list(self._domains)

    def labels(self, split: str) -> np.ndarray:
        _check_split(split)
        return self._load().labels[split].copy()

    def domains(self, split: str) -> np.ndarray:
        _check_split(split)
        return self._load().domains[split].copy()

    def dataset(self, split: str, transform: Callable | None) -> torch.utils.data.Dataset:
        _check_split(split)
        return ImageList(self.folder, self._load().items[split], transform)

    def key(self, split: str) -> str:
        """Name, domains used and a digest of the split's (path, label, domain) list."""
        _check_split(split)
        used = "" if self._domains == list(self.all_domains) else "-" + "+".join(self._domains)
        return f"{self.name}{used}/{split}-{self._load().digest[split]}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r}, domains={self._domains!r})"
