"""The multi-domain data sets: DomainNet, Office-Caltech10, PACS, Office-Home, VLCS, TerraIncognita."""

from __future__ import annotations

from fedclip.data.domains.base import DomainFolders, Listing, _is_list
from fedclip.data.files import missing
from fedclip.data.source import SPLITS
from fedclip.errors import ConfigError, DataError

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
