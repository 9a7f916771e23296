"""The ten CoOp data sets other than ImageNet, each read from CoOp's layout."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torchvision

from fedclip.data.coop.base import (
    _class_folder_items,
    _CoOpDataset,
    _Downloadable,
    _images,
    _Split,
    _subdirs,
)
from fedclip.data.files import Item
from fedclip.data.source import SPLITS


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
