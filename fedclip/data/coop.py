"""The CoOp benchmark: eleven classification data sets and four ImageNet variants, each read
from the on-disk layout of CoOp's DATASETS.md (Zhou et al., "Learning to Prompt for
Vision-Language Models", IJCV 2022; https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md).

`root` is CoOp's `$DATA`; each data set lives in its own folder under it:

    Caltech101      caltech-101/101_ObjectCategories/<class>/*.jpg
    OxfordPets      oxford_pets/images/*.jpg, oxford_pets/annotations/{trainval,test}.txt
    Flowers102      oxford_flowers/jpg/image_NNNNN.jpg, imagelabels.mat, cat_to_name.json
                    (setid.mat optional)
    Food101         food-101/images/<class>/*.jpg (meta/{classes,train,test}.txt optional)
    DTD             dtd/images/<class>/*.jpg (labels/{train1,val1,test1}.txt optional)
    EuroSAT         eurosat/2750/<Class>/*.jpg
    UCF101          ucf101/UCF-101-midframes/<Class_Name>/*.jpg
                    (ucfTrainTestlist/{classInd,trainlist01,testlist01}.txt optional)
    StanfordCars    stanford_cars/{cars_train,cars_test}/*.jpg, devkit/{cars_meta,
                    cars_train_annos}.mat, cars_test_annos_withlabels.mat
    FGVCAircraft    fgvc_aircraft/images/*.jpg, variants.txt, images_variant_{train,val,test}.txt
    SUN397          sun397/SUN397/<letter>/<class>[/<subclass>]/*.jpg
                    (ClassName.txt, Training_01.txt, Testing_01.txt optional)
    ImageNet        imagenet/images/{train,val}/<wnid>/*.JPEG, imagenet/classnames.txt
    ImageNetV2      imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg
    ImageNetSketch  imagenet-sketch/images/<wnid>/*.JPEG
    ImageNetA       imagenet-adversarial/imagenet-a/<wnid>/*.jpg
    ImageNetR       imagenet-rendition/imagenet-r/<wnid>/*.jpg

Splits. Where CoOp publishes a fixed split, `split_zhou_<Name>.json` in the data set's folder,
it is used as is: fedclip's train split is CoOp's train and its test split CoOp's test (CoOp's
val, which it uses for model selection, is not read); labels and class names come from the
file. Without it the reader takes the data set's own train/test lists where they exist (the
"optional" files above), and otherwise draws a seeded stratified 80/20 split that is saved as
`split_fedclip_<Class>.json` next to the data and reused (`files.seeded_split`). `key(split)`
names which of these was used, so cached features never mix them. FGVCAircraft and ImageNet
have no CoOp split file: CoOp reads their official lists, as these readers do. ImageNetV2,
-Sketch, -A and -R are for evaluation only (CoOp's domain-generalisation targets): their
train split is empty, and their labels index the ImageNet classes they contain.

Class names are CoOp's readable names with underscores turned into spaces: Caltech-101's
"Faces" is "face", EuroSAT's "AnnualCrop" is "Annual Crop Land", UCF101's "Apply_Eye_Makeup"
is "Apply Eye Makeup", SUN397's "/a/apartment_building/outdoor" is "outdoor apartment building".

Food101, EuroSAT and SUN397 take `download: true`: torchvision's download of these lands in
the layout above. For the others the missing-data error gives the official source.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.io
import torch
import torchvision
from scipy.io.matlab import MatReadError

from fedclip.data.datasets import SPLITS, DataError, DatasetSource, _check_split
from fedclip.data.files import ImageList, Item, missing, seeded_split

log = logging.getLogger(__name__)

_DATASETS_MD = "CoOp's DATASETS.md"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------------------------
# Small readers of folders, text lists and .mat files


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


# --------------------------------------------------------------------------------------------
# The shared base


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
                except (KeyError, ValueError, IndexError, TypeError) as e:
                    # A list naming an unknown class, a malformed line, ...: one line, no trace.
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


# --------------------------------------------------------------------------------------------
# The data sets


class Caltech101(_CoOpDataset):
    """Caltech-101: 100 object classes (CoOp drops BACKGROUND_Google and Faces_easy).

    Reads caltech-101/101_ObjectCategories/<class>/*.jpg and CoOp's split_zhou_Caltech101.json;
    without that file, a seeded 80/20 split saved as split_fedclip_Caltech101.json. Class names
    follow CoOp ("airplanes" -> "airplane", "Faces" -> "face", ...).

    Args:
        root: Folder holding caltech-101/ (CoOp's $DATA).
    """

    name = "caltech101"
    title = "Caltech-101"
    folder_name = "caltech-101"
    image_subdir = "101_ObjectCategories"
    zhou = "Caltech101"
    url = "https://data.caltech.edu/records/mzrjq-6wc02"
    renames = {
        "airplanes": "airplane",
        "Faces": "face",
        "Leopards": "leopard",
        "Motorbikes": "motorbike",
    }
    ignored = ("BACKGROUND_Google", "Faces_easy")

    def _scan(self) -> _Split:
        classes = [c for c in _subdirs(self.image_dir) if c not in self.ignored]
        return self._seeded(classes, _class_folder_items(self.image_dir, classes))


class OxfordPets(_CoOpDataset):
    """Oxford-IIIT Pets: 37 cat and dog breeds.

    Reads oxford_pets/images/*.jpg with CoOp's split_zhou_OxfordPets.json; without that file,
    the official annotations/trainval.txt (train) and test.txt (test).

    Args:
        root: Folder holding oxford_pets/ (CoOp's $DATA).
    """

    name = "oxford_pets"
    title = "Oxford-IIIT Pets"
    folder_name = "oxford_pets"
    image_subdir = "images"
    zhou = "OxfordPets"
    url = "https://www.robots.ox.ac.uk/~vgg/data/pets/"

    def _scan(self) -> _Split:
        names: dict[int, str] = {}
        parts: dict[str, list[Item]] = {}
        for split, file in (("train", "trainval.txt"), ("test", "test.txt")):
            parts[split] = []
            for line in self._lines(self.folder / "annotations" / file):
                image, class_id = line.split()[:2]  # "Abyssinian_100 1 1 1": name, class, ...
                label = int(class_id) - 1
                names.setdefault(label, image.rsplit("_", 1)[0].lower())  # the breed, as CoOp
                parts[split].append((f"{image}.jpg", label))
        return self._official(names, parts["train"], parts["test"])


class Flowers102(_CoOpDataset):
    """Oxford Flowers-102: 102 flower species.

    Reads oxford_flowers/jpg/image_NNNNN.jpg with CoOp's split_zhou_OxfordFlowers.json; without
    that file, labels from imagelabels.mat, names from CoOp's cat_to_name.json, and the official
    setid.mat split (train + val as train) if present, else a seeded 80/20 split.

    Args:
        root: Folder holding oxford_flowers/ (CoOp's $DATA).
    """

    name = "oxford_flowers"
    title = "Oxford Flowers-102"
    folder_name = "oxford_flowers"
    image_subdir = "jpg"
    zhou = "OxfordFlowers"
    url = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"

    def _scan(self) -> _Split:
        labels = self._loadmat(self.folder / "imagelabels.mat")["labels"].ravel()  # (N,), 1-based
        names_file = self.folder / "cat_to_name.json"
        if not names_file.is_file():
            raise self._missing(names_file)
        cat_to_name = json.loads(names_file.read_text())  # {"1": "pink primrose", ...}
        classnames = [cat_to_name[str(c)] for c in range(1, int(labels.max()) + 1)]

        def items(image_ids: np.ndarray) -> list[Item]:  # 1-based image numbers
            return [(f"image_{i:05d}.jpg", int(labels[i - 1]) - 1) for i in image_ids.tolist()]

        setid = self.folder / "setid.mat"
        if setid.is_file():
            ids = self._loadmat(setid)
            train = np.concatenate([ids["trnid"].ravel(), ids["valid"].ravel()])
            return self._official(classnames, items(train), items(ids["tstid"].ravel()))
        return self._seeded(classnames, items(np.arange(1, len(labels) + 1)))


class Food101(_Downloadable):
    """Food-101: 101 dishes, 101,000 images.

    Reads food-101/images/<class>/*.jpg with CoOp's split_zhou_Food101.json; without that file,
    the official meta/train.txt and meta/test.txt, else a seeded 80/20 split.

    Args:
        root: Folder holding (or to receive) food-101/ (CoOp's $DATA).
        download: Download the data into root if it is not there (needs internet; 5 GB).
    """

    name = "food101"
    title = "Food-101"
    folder_name = "food-101"
    image_subdir = "images"
    zhou = "Food101"
    url = "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/"
    _torchvision = torchvision.datasets.Food101
    _torchvision_root = ".."  # torchvision writes <its root>/food-101/

    def _scan(self) -> _Split:
        meta = self.folder / "meta"
        if not (meta / "classes.txt").is_file():
            classes = _subdirs(self.image_dir)
            return self._seeded(classes, _class_folder_items(self.image_dir, classes))
        classes = self._lines(meta / "classes.txt")
        index = {c: y for y, c in enumerate(classes)}
        train, test = (
            [(f"{s}.jpg", index[s.split("/")[0]]) for s in self._lines(meta / f"{split}.txt")]
            for split in SPLITS
        )  # lines "apple_pie/1005649"
        return self._official(classes, train, test)


class DTD(_CoOpDataset):
    """Describable Textures (DTD): 47 texture classes.

    Reads dtd/images/<class>/*.jpg with CoOp's split_zhou_DescribableTextures.json; without that
    file, the official split 1 (labels/train1.txt + val1.txt as train, test1.txt as test) if
    present, else a seeded 80/20 split.

    Args:
        root: Folder holding dtd/ (CoOp's $DATA).
    """

    name = "dtd"
    title = "DTD"
    folder_name = "dtd"
    image_subdir = "images"
    zhou = "DescribableTextures"
    url = "https://www.robots.ox.ac.uk/~vgg/data/dtd/"

    def _scan(self) -> _Split:
        classes = _subdirs(self.image_dir)
        lists = [self.folder / "labels" / f"{s}1.txt" for s in ("train", "val", "test")]
        if not all(p.is_file() for p in lists):
            return self._seeded(classes, _class_folder_items(self.image_dir, classes))
        index = {c: y for y, c in enumerate(classes)}
        train, val, test = (
            [(s, index[s.split("/")[0]]) for s in self._lines(p)] for p in lists
        )  # lines "banded/banded_0002.jpg"
        return self._official(classes, train + val, test)


class EuroSAT(_Downloadable):
    """EuroSAT: 10 land-use classes of Sentinel-2 satellite images (RGB, 64x64).

    Reads eurosat/2750/<Class>/*.jpg with CoOp's split_zhou_EuroSAT.json; without that file, a
    seeded 80/20 split. Class names follow CoOp ("AnnualCrop" -> "Annual Crop Land", ...).

    Args:
        root: Folder holding (or to receive) eurosat/ (CoOp's $DATA).
        download: Download the data into root if it is not there (needs internet; 90 MB).
    """

    name = "eurosat"
    title = "EuroSAT"
    folder_name = "eurosat"
    image_subdir = "2750"
    zhou = "EuroSAT"
    url = "https://github.com/phelber/EuroSAT"
    renames = {
        "AnnualCrop": "Annual Crop Land",
        "Forest": "Forest",
        "HerbaceousVegetation": "Herbaceous Vegetation Land",
        "Highway": "Highway or Road",
        "Industrial": "Industrial Buildings",
        "Pasture": "Pasture Land",
        "PermanentCrop": "Permanent Crop Land",
        "Residential": "Residential Buildings",
        "River": "River",
        "SeaLake": "Sea or Lake",
    }
    _torchvision = torchvision.datasets.EuroSAT
    _torchvision_root = ".."  # torchvision writes <its root>/eurosat/2750/

    def _scan(self) -> _Split:
        classes = _subdirs(self.image_dir)
        return self._seeded(classes, _class_folder_items(self.image_dir, classes))


def _ucf_folder(action: str) -> str:
    """CoOp's mid-frame folder of a UCF101 action: "ApplyEyeMakeup" -> "Apply_Eye_Makeup"."""
    return "_".join(re.findall("[A-Z][^A-Z]*", action))


class UCF101(_CoOpDataset):
    """UCF101: 101 human actions, one middle frame per video (CoOp's UCF-101-midframes).

    Reads ucf101/UCF-101-midframes/<Class_Name>/*.jpg with CoOp's split_zhou_UCF101.json;
    without that file, the official split 1 (ucfTrainTestlist/trainlist01.txt, testlist01.txt)
    if present, else a seeded 80/20 split.

    Args:
        root: Folder holding ucf101/ (CoOp's $DATA).
    """

    name = "ucf101"
    title = "UCF101"
    folder_name = "ucf101"
    image_subdir = "UCF-101-midframes"
    zhou = "UCF101"
    url = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md#ucf101"

    def _scan(self) -> _Split:
        lists = self.folder / "ucfTrainTestlist"
        files = [lists / f for f in ("classInd.txt", "trainlist01.txt", "testlist01.txt")]
        if not all(p.is_file() for p in files):
            classes = _subdirs(self.image_dir)
            return self._seeded(classes, _class_folder_items(self.image_dir, classes))
        index: dict[str, int] = {}
        for line in self._lines(files[0]):  # "1 ApplyEyeMakeup"
            class_id, action = line.split()
            index[action] = int(class_id) - 1

        def items(path: Path) -> list[Item]:  # "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"
            out = []
            for line in self._lines(path):
                action, video = line.split()[0].split("/")
                frame = f"{_ucf_folder(action)}/{Path(video).stem}.jpg"
                out.append((frame, index[action]))
            return out

        names = {y: _ucf_folder(a) for a, y in index.items()}
        return self._official(names, items(files[1]), items(files[2]))


def _year_first(name: str) -> str:
    """CoOp's Stanford Cars name: "AM General Hummer SUV 2000" -> "2000 AM General Hummer SUV"."""
    *model, year = name.split(" ")
    return " ".join([year, *model])


class StanfordCars(_CoOpDataset):
    """Stanford Cars: 196 car models (make, model, year).

    Reads stanford_cars/{cars_train,cars_test}/*.jpg with CoOp's split_zhou_StanfordCars.json
    (its paths start at stanford_cars/); without that file, the official annotations
    devkit/cars_train_annos.mat (train) and cars_test_annos_withlabels.mat (test), with names
    from devkit/cars_meta.mat, year first as in CoOp.

    Args:
        root: Folder holding stanford_cars/ (CoOp's $DATA).
    """

    name = "stanford_cars"
    title = "Stanford Cars"
    folder_name = "stanford_cars"
    image_subdir = ""
    zhou = "StanfordCars"
    url = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html"

    def _required(self) -> list[Path]:
        return [self.folder / "cars_train", self.folder / "cars_test"]

    def _scan(self) -> _Split:
        meta = self._loadmat(self.folder / "devkit" / "cars_meta.mat")["class_names"][0]  # (C,)
        classnames = [_year_first(str(n[0])) for n in meta]
        train = self._annotations("cars_train", self.folder / "devkit" / "cars_train_annos.mat")
        test = self._annotations("cars_test", self.folder / "cars_test_annos_withlabels.mat")
        return self._official(classnames, train, test)

    def _annotations(self, image_folder: str, path: Path) -> list[Item]:
        # A (1, N) struct array with fields bbox_x1 .. bbox_y2, class (1-based), fname.
        annotations = self._loadmat(path)["annotations"][0]
        return [(f"{image_folder}/{a['fname'][0]}", int(a["class"][0, 0]) - 1) for a in annotations]


class FGVCAircraft(_CoOpDataset):
    """FGVC-Aircraft: 100 aircraft variants.

    Reads fgvc_aircraft/images/*.jpg (the data/ folder of fgvc-aircraft-2013b) with the official
    lists, as CoOp does: images_variant_train.txt is train (with trainval, also
    images_variant_val.txt), images_variant_test.txt is test; class order is variants.txt.

    Args:
        root: Folder holding fgvc_aircraft/ (CoOp's $DATA).
        trainval: Train on the official train + val lists (6,667 images) instead of CoOp's
            train list (3,334 images).
    """

    name = "fgvc_aircraft"
    title = "FGVC-Aircraft"
    folder_name = "fgvc_aircraft"
    image_subdir = "images"
    url = "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/"

    def __init__(self, root: str = "data", trainval: bool = False):
        super().__init__(root)
        self.trainval = trainval

    def _key_extra(self) -> str:
        return "-trainval" if self.trainval else ""

    def _scan(self) -> _Split:
        classes = self._lines(self.folder / "variants.txt")
        index = {c: y for y, c in enumerate(classes)}

        def items(split: str) -> list[Item]:  # "1025794 707-320"; variants may contain spaces
            pairs = (
                s.split(" ", 1) for s in self._lines(self.folder / f"images_variant_{split}.txt")
            )
            return [(f"{image}.jpg", index[variant]) for image, variant in pairs]

        train = items("train") + (items("val") if self.trainval else [])
        return self._official(classes, train, items("test"))


def _sun_name(path: str) -> str:
    """CoOp's SUN397 name of a class path: "a/apartment_building/outdoor" ->
    "outdoor apartment_building" (letter dropped, qualifiers such as indoor/outdoor first)."""
    return " ".join(path.strip("/").split("/")[1:][::-1])


class SUN397(_Downloadable):
    """SUN397: 397 scene categories.

    Reads sun397/SUN397/<letter>/<class>[/<subclass>]/*.jpg with CoOp's split_zhou_SUN397.json;
    without that file, the official partition 1 (Training_01.txt, Testing_01.txt and
    ClassName.txt in sun397/) if present, else a seeded 80/20 split.

    Args:
        root: Folder holding (or to receive) sun397/ (CoOp's $DATA).
        download: Download the images into root/sun397 if they are not there (needs internet;
            37 GB). The partition files are not part of that download.
    """

    name = "sun397"
    title = "SUN397"
    folder_name = "sun397"
    image_subdir = "SUN397"
    zhou = "SUN397"
    url = "https://vision.princeton.edu/projects/2010/SUN/"
    _torchvision = torchvision.datasets.SUN397
    _torchvision_root = "."  # torchvision writes <its root>/SUN397/

    def _scan(self) -> _Split:
        # ClassName.txt ("/a/abbey" lines) sits in sun397/ (Partitions.zip) or in SUN397/ (the
        # image archive); without either, the class folders are the ones holding images.
        class_file = next(
            (
                p
                for p in (self.folder / "ClassName.txt", self.image_dir / "ClassName.txt")
                if p.is_file()
            ),
            None,
        )
        if class_file is not None:
            classes = [c.strip("/") for c in self._lines(class_file)]
        else:
            classes = sorted(
                Path(d).relative_to(self.image_dir).as_posix()
                for d, _, _ in os.walk(self.image_dir)
                if _images(Path(d))
            )
        index = {c: y for y, c in enumerate(classes)}
        names = [_sun_name(c) for c in classes]
        lists = [self.folder / "Training_01.txt", self.folder / "Testing_01.txt"]
        if not all(p.is_file() for p in lists):
            return self._seeded(names, _class_folder_items(self.image_dir, classes))
        train, test = (
            [(s.lstrip("/"), index[os.path.dirname(s.lstrip("/"))]) for s in self._lines(p)]
            for p in lists
        )  # lines "/a/abbey/sun_aaalbzqrimafwbiv.jpg"
        return self._official(names, train, test)


def _read_wnids(path: Path) -> tuple[list[str], list[str]]:
    """(wnids, names) of CoOp's ImageNet classnames.txt, lines "n01440764 tench"."""
    wnids, names = [], []
    with open(path) as f:
        for line in f:
            if line.strip():
                wnid, _, name = line.strip().partition(" ")
                wnids.append(wnid)
                names.append(name.strip())
    return wnids, names


class ImageNet(_CoOpDataset):
    """ImageNet (ILSVRC-2012): 1,000 classes; CoOp tests on the val set.

    Reads imagenet/images/train/<wnid>/*.JPEG (train) and imagenet/images/val/<wnid>/*.JPEG
    (test; val sorted into class folders) with CLIP's class names from CoOp's
    imagenet/classnames.txt, whose order (sorted wnids) gives the labels.

    Args:
        root: Folder holding imagenet/ (CoOp's $DATA).
    """

    name = "imagenet"
    title = "ImageNet"
    folder_name = "imagenet"
    image_subdir = "images"
    url = "https://image-net.org/download.php"

    def _required(self) -> list[Path]:
        return [self.image_dir / "train", self.image_dir / "val", self.folder / "classnames.txt"]

    def _scan(self) -> _Split:
        wnids, names = _read_wnids(self.folder / "classnames.txt")
        index = {w: y for y, w in enumerate(wnids)}
        parts = {}
        for split, sub in (("train", "train"), ("test", "val")):
            present = _subdirs(self.image_dir / sub)
            unknown = [w for w in present if w not in index]
            if unknown:
                raise DataError(
                    f"{self.image_dir / sub / unknown[0]} is not a class of "
                    f"{self.folder / 'classnames.txt'}; {_DATASETS_MD} describes the layout"
                )
            # Classes in classnames.txt order, which is the labels' order.
            parts[split] = [
                (f"{sub}/{w}/{f}", index[w])
                for w in sorted(present, key=index.__getitem__)
                for f in _images(self.image_dir / sub / w)
            ]
        return self._official(names, parts["train"], parts["test"])


class _ImageNetVariant(_CoOpDataset):
    """An evaluation-only ImageNet test set with CoOp's ImageNet class names."""

    def __init__(self, root: str = "data", classnames_file: str | None = None):
        super().__init__(root)
        self.classnames_file = classnames_file

    def _classnames_path(self) -> Path:
        """The explicit file, else the copy CoOp's DATASETS.md puts next to the images, else
        root/imagenet/classnames.txt."""
        if self.classnames_file is not None:
            return Path(os.path.abspath(os.path.expanduser(self.classnames_file)))
        copy = self.folder / "classnames.txt"
        return copy if copy.is_file() else Path(self.root) / "imagenet" / "classnames.txt"

    def _read_classnames(self) -> tuple[list[str], list[str]]:
        path = self._classnames_path()
        if not path.is_file():
            raise missing(
                f"ImageNet class names for {self.title}",
                path,
                "copy classnames.txt from CoOp's ImageNet instructions (see CoOp's DATASETS.md) "
                "there, or set data.dataset.init_args.classnames_file",
            )
        return _read_wnids(path)

    def _scan(self) -> _Split:
        wnids, names = self._read_classnames()
        index = {w: y for y, w in enumerate(wnids)}
        present = _subdirs(self.image_dir)
        unknown = [w for w in present if w not in index]
        if unknown:
            raise DataError(
                f"{self.image_dir / unknown[0]} is not a class of {self._classnames_path()}; "
                f"{_DATASETS_MD} describes the layout"
            )
        # Only the classes present (200 for -A and -R), in classnames.txt order.
        classes = sorted(present, key=index.__getitem__)
        test = _class_folder_items(self.image_dir, classes)
        return _Split([self._readable(names[index[w]]) for w in classes], [], test, "eval")


class ImageNetV2(_ImageNetVariant):
    """ImageNetV2 (matched frequency): 10,000 new test images of the 1,000 ImageNet classes.

    For evaluation only: the train split is empty. Reads
    imagenetv2/imagenetv2-matched-frequency-format-val/<i>/*.jpeg, where folder i holds class i
    of classnames.txt.

    Args:
        root: Folder holding imagenetv2/ (CoOp's $DATA).
        classnames_file: CoOp's ImageNet classnames.txt; default: imagenetv2/classnames.txt if
            there, else imagenet/classnames.txt under root.
    """

    name = "imagenetv2"
    title = "ImageNetV2"
    folder_name = "imagenetv2"
    image_subdir = "imagenetv2-matched-frequency-format-val"
    url = "https://github.com/modestyachts/ImageNetV2"

    def _scan(self) -> _Split:
        _, names = self._read_classnames()
        folders = [d for d in _subdirs(self.image_dir) if d.isdigit() and int(d) < len(names)]
        test = [
            (f"{d}/{f}", int(d))
            for d in sorted(folders, key=int)
            for f in _images(self.image_dir / d)
        ]
        return _Split([self._readable(n) for n in names], [], test, "eval")


class ImageNetSketch(_ImageNetVariant):
    """ImageNet-Sketch: 50,000 black-and-white sketches of the 1,000 ImageNet classes.

    For evaluation only: the train split is empty. Reads imagenet-sketch/images/<wnid>/*.JPEG.

    Args:
        root: Folder holding imagenet-sketch/ (CoOp's $DATA).
        classnames_file: CoOp's ImageNet classnames.txt; default: imagenet-sketch/classnames.txt
            if there, else imagenet/classnames.txt under root.
    """

    name = "imagenet_sketch"
    title = "ImageNet-Sketch"
    folder_name = "imagenet-sketch"
    image_subdir = "images"
    url = "https://github.com/HaohanWang/ImageNet-Sketch"


class ImageNetA(_ImageNetVariant):
    """ImageNet-A: 7,500 natural adversarial images of 200 ImageNet classes.

    For evaluation only: the train split is empty. Reads imagenet-adversarial/imagenet-a/
    <wnid>/*.jpg; labels index the 200 classes present, in classnames.txt order.

    Args:
        root: Folder holding imagenet-adversarial/ (CoOp's $DATA).
        classnames_file: CoOp's ImageNet classnames.txt; default:
            imagenet-adversarial/classnames.txt if there, else imagenet/classnames.txt under root.
    """

    name = "imagenet_a"
    title = "ImageNet-A"
    folder_name = "imagenet-adversarial"
    image_subdir = "imagenet-a"
    url = "https://github.com/hendrycks/natural-adv-examples"


class ImageNetR(_ImageNetVariant):
    """ImageNet-R: 30,000 renditions (art, cartoons, ...) of 200 ImageNet classes.

    For evaluation only: the train split is empty. Reads imagenet-rendition/imagenet-r/
    <wnid>/*.jpg; labels index the 200 classes present, in classnames.txt order.

    Args:
        root: Folder holding imagenet-rendition/ (CoOp's $DATA).
        classnames_file: CoOp's ImageNet classnames.txt; default:
            imagenet-rendition/classnames.txt if there, else imagenet/classnames.txt under root.
    """

    name = "imagenet_r"
    title = "ImageNet-R"
    folder_name = "imagenet-rendition"
    image_subdir = "imagenet-r"
    url = "https://github.com/hendrycks/imagenet-r"


COOP_DATASETS: tuple[type[_CoOpDataset], ...] = (
    Caltech101,
    OxfordPets,
    Flowers102,
    Food101,
    DTD,
    EuroSAT,
    UCF101,
    StanfordCars,
    FGVCAircraft,
    SUN397,
    ImageNet,
    ImageNetV2,
    ImageNetSketch,
    ImageNetA,
    ImageNetR,
)
"""Every reader of this module, in CoOp's order (ImageNet's variants last)."""
