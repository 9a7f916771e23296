"""Multi-domain image data sets, for domain shift among clients and leave-one-domain-out.

Each is a `DatasetSource` whose samples also carry a domain: `domain_names` lists the domains
used (index = domain id) and `domains(split)` gives every sample's domain id, aligned with
`labels(split)`; the domain partitioners (`ByDomain`, `DomainDirichlet`, `LeaveOneDomainOut`)
read both. Every data set is read from its published folder layout under `root`:

- `DomainNet`: root/domainnet/<domain>/<class>/*.jpg and the official lists
  root/domainnet/<domain>_{train,test}.txt; 6 domains, 345 classes (10 by default).
- `OfficeCaltech10`: root/office_caltech_10/<domain>/<class>/*.jpg; 4 domains, 10 classes.
- `PACS`: root/pacs/<domain>/<class>/*.jpg, with the official lists
  root/pacs/splits/<domain>_{train,test}_kfold.txt when present; 4 domains, 7 classes.
- `OfficeHome`: root/office_home/<Domain>/<Class>/*.jpg; 4 domains, 65 classes.
- `VLCS`: root/VLCS/<Domain>/<class>/*.jpg (DomainBed); 4 domains, 5 classes.
- `TerraIncognita`: root/terra_incognita/<location>/<class>/*.jpg (DomainBed); 4 domains,
  10 classes.

Where a data set publishes no train/test split, each domain is split 80/20, stratified by
class with seed 0, and the split is saved as JSON next to the data (`files.seeded_split`).

Labels are global: one class list for all the domains used, a class missing from a domain
simply has no samples there. Class order follows label ids: those of the split files where
there are any, else the sorted class folder names; a split file whose label ids disagree with
the class folders of its images is an error, so an image's label is always its folder's.
"""

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


# --------------------------------------------------------------------------------------------

FEDBN10 = (
    "bird",
    "feather",
    "headphones",
    "ice_cream",
    "teapot",
    "tiger",
    "whale",
    "windmill",
    "wine_glass",
    "zebra",
)


class DomainNet(DomainFolders):
    """DomainNet (Peng et al., ICCV 2019): 345 classes in 6 domains, official train/test lists.

    Layout: root/domainnet/<domain>/<class>/*.jpg with the lists
    root/domainnet/<domain>_train.txt and <domain>_test.txt (lines
    "clipart/aircraft_carrier/clipart_001_000018.jpg 0"), from http://ai.bu.edu/M3SDA/.
    Labels are the lists' label ids, renumbered 0.. over the classes used in id order.

    Args:
        root: Folder holding domainnet/.
        domains: Domains to use (default all): clipart, infograph, painting, quickdraw,
            real, sketch.
        classes: "fedbn10", the 10 classes of FedBN and pFedMoAP (bird, feather, headphones,
            ice cream, teapot, tiger, whale, windmill, wine glass, zebra); "all", the 345; or
            a list of class names (folder names; spaces may stand for underscores).
    """

    name = "domainnet"
    title = "DomainNet"
    folder_name = "domainnet"
    all_domains = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
    source_hint = "http://ai.bu.edu/M3SDA/ (images and the <domain>_train/_test.txt lists)"

    def __init__(
        self,
        root: str = "data",
        domains: list[str] | None = None,
        classes: str | list[str] = "fedbn10",
    ):
        super().__init__(root, domains)
        if isinstance(classes, str):
            if classes not in ("fedbn10", "all"):
                raise ConfigError(
                    f"DomainNet: classes must be 'fedbn10', 'all' or a list of class names, "
                    f"got {classes!r}"
                )
            self.classes: str | list[str] = classes
        else:
            if not _is_list(classes) or not all(isinstance(c, str) for c in classes):
                raise ConfigError(
                    f"DomainNet: classes must be 'fedbn10', 'all' or a list of class names, "
                    f"got {classes!r}"
                )
            names = [c.strip().replace(" ", "_") for c in classes]
            if not names or any(not c for c in names):
                raise ConfigError(f"DomainNet: classes must be a non-empty list, got {classes!r}")
            if len(set(names)) != len(names):
                raise ConfigError(f"DomainNet: classes has repeats: {list(classes)}")
            self.classes = names

    @property
    def layout(self) -> str:
        return "domainnet/<domain>/<class>/<image>.jpg with domainnet/<domain>_{train,test}.txt"

    def _read_domain(self, domain: str) -> tuple[Listing, dict[str, int]]:
        if not (self.folder / domain).is_dir():
            raise missing(f"DomainNet domain {domain!r}", self.folder / domain, self._how())
        listing, ids = {}, {}
        for split in SPLITS:
            listing[split], split_ids = self._read_list(
                self.folder / f"{domain}_{split}.txt", domain
            )
            for cls, i in split_ids.items():
                if ids.setdefault(cls, i) != i:
                    raise DataError(
                        f"DomainNet: class {cls!r} has label {i} in {domain}_{split}.txt but "
                        f"{ids[cls]} in the train list"
                    )
        return listing, ids

    def _select_classes(self, classes: list[str]) -> list[str]:
        if self.classes == "all":
            return classes
        wanted = FEDBN10 if self.classes == "fedbn10" else self.classes
        absent = [c for c in wanted if c not in classes]
        if absent:
            raise DataError(
                f"DomainNet: class {absent[0]!r} of classes={self.classes!r} is not in the lists "
                f"under {self.folder} ({len(absent)} of {len(wanted)} missing); check the "
                "spelling (folder names, e.g. ice_cream) or the downloaded lists"
            )
        return [c for c in classes if c in set(wanted)]

    def key(self, split: str) -> str:
        tag = self.classes if isinstance(self.classes, str) else f"{len(self.classes)}cls"
        base, rest = super().key(split).split("/", 1)
        return f"{base}-{tag}/{rest}"

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, classes={self.classes!r})"


class OfficeCaltech10(DomainFolders):
    """Office-Caltech10 (Gong et al., CVPR 2012): the 10 classes shared by Office-31 and
    Caltech-256, in 4 domains. No official split: 80/20 per domain, seeded, saved.

    Layout: root/office_caltech_10/<domain>/<class>/*.jpg (domains amazon, caltech, dslr,
    webcam; classes back_pack, bike, calculator, headphones, keyboard, laptop_computer,
    monitor, mouse, mug, projector).

    Args:
        root: Folder holding office_caltech_10/.
        domains: Domains to use (default all): amazon, caltech, dslr, webcam.
    """

    name = "office_caltech10"
    title = "Office-Caltech10"
    folder_name = "office_caltech_10"
    all_domains = ("amazon", "caltech", "dslr", "webcam")
    source_hint = (
        "https://github.com/jindongwang/transferlearning/tree/master/data#office-caltech10"
    )


class PACS(DomainFolders):
    """PACS (Li et al., ICCV 2017): 7 classes in 4 styles, with the official kfold lists.

    Layout: root/pacs/<domain>/<class>/*.jpg (the "kfold" images) and, when present, the
    official lists root/pacs/splits/<domain>_train_kfold.txt and <domain>_test_kfold.txt
    (lines "art_painting/dog/pic_001.jpg 1", labels from 1). The official test list holds the
    whole domain (train and validation images), for leave-one-domain-out; the test split here
    is its images that are not in the train list (the official validation images), so train
    and test never share an image. A domain without lists is split 80/20, seeded, saved.

    Args:
        root: Folder holding pacs/.
        domains: Domains to use (default all): art_painting, cartoon, photo, sketch.
    """

    name = "pacs"
    title = "PACS"
    folder_name = "pacs"
    all_domains = ("art_painting", "cartoon", "photo", "sketch")
    source_hint = "https://domaingeneralization.github.io/#data"

    def _read_domain(self, domain: str) -> tuple[Listing, dict[str, int]]:
        lists = {s: self.folder / "splits" / f"{domain}_{s}_kfold.txt" for s in SPLITS}
        have = [s for s in SPLITS if lists[s].is_file()]
        if not have:
            return self._seeded(domain), {}
        if len(have) == 1:
            other = next(s for s in SPLITS if s not in have)
            raise missing(f"PACS {other} list of {domain}", lists[other], self._how())
        if not (self.folder / domain).is_dir():
            raise missing(f"PACS domain {domain!r}", self.folder / domain, self._how())
        train, ids = self._read_list(lists["train"], domain, first_label=1)
        test, test_ids = self._read_list(lists["test"], domain, first_label=1)
        for cls, i in test_ids.items():
            if ids.setdefault(cls, i) != i:
                raise DataError(
                    f"PACS: class {cls!r} has label {i + 1} in {lists['test'].name} but "
                    f"{ids[cls] + 1} in {lists['train'].name}"
                )
        seen = {rel for rel, _ in train}
        return {"train": train, "test": [it for it in test if it[0] not in seen]}, ids


class OfficeHome(DomainFolders):
    """Office-Home (Venkateswara et al., CVPR 2017): 65 classes of office and home objects in
    4 domains. No official split: 80/20 per domain, seeded, saved.

    Layout: root/office_home/<Domain>/<Class>/*.jpg (domains Art, Clipart, Product,
    Real World).

    Args:
        root: Folder holding office_home/.
        domains: Domains to use (default all): Art, Clipart, Product, Real World.
    """

    name = "office_home"
    title = "Office-Home"
    folder_name = "office_home"
    all_domains = ("Art", "Clipart", "Product", "Real World")
    source_hint = "https://www.hemanthdv.org/officeHomeDataset.html"


class VLCS(DomainFolders):
    """VLCS (Fang et al., ICCV 2013): 5 classes in 4 photo data sets, as DomainBed stores it.
    No official split: 80/20 per domain, seeded, saved.

    Layout: root/VLCS/<Domain>/<class>/*.jpg (domains Caltech101, LabelMe, SUN09, VOC2007;
    classes bird, car, chair, dog, person).

    Args:
        root: Folder holding VLCS/.
        domains: Domains to use (default all): Caltech101, LabelMe, SUN09, VOC2007.
    """

    name = "vlcs"
    title = "VLCS"
    folder_name = "VLCS"
    all_domains = ("Caltech101", "LabelMe", "SUN09", "VOC2007")
    source_hint = "DomainBed's download script (https://github.com/facebookresearch/DomainBed)"


class TerraIncognita(DomainFolders):
    """Terra Incognita (Beery et al., ECCV 2018): camera-trap photos of 10 classes at 4
    locations, as DomainBed stores it. No official split: 80/20 per domain, seeded, saved.

    Layout: root/terra_incognita/<location>/<class>/*.jpg (domains location_100,
    location_38, location_43, location_46).

    Args:
        root: Folder holding terra_incognita/.
        domains: Domains to use (default all): location_100, location_38, location_43,
            location_46.
    """

    name = "terra_incognita"
    title = "TerraIncognita"
    folder_name = "terra_incognita"
    all_domains = ("location_100", "location_38", "location_43", "location_46")
    source_hint = "DomainBed's download script (https://github.com/facebookresearch/DomainBed)"
