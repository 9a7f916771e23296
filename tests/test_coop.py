"""CoOp's data sets, each read from a tiny fake tree in its real on-disk layout.

Every image of class y is a solid COLOURS[y] square, so an image's pixels say which label it
must come with.
"""

from __future__ import annotations

import inspect
import json
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torchvision
from PIL import Image

from fedclip.data.coop import (
    COOP_DATASETS,
    DTD,
    SUN397,
    UCF101,
    Caltech101,
    EuroSAT,
    FGVCAircraft,
    Flowers102,
    Food101,
    ImageNet,
    ImageNetA,
    ImageNetR,
    ImageNetSketch,
    ImageNetV2,
    OxfordPets,
    StanfordCars,
)
from fedclip.data.datasets import SPLITS, DataError

COLOURS = [(220, 40, 40), (40, 190, 60), (50, 70, 220)]  # by label

Pair = tuple[Path, int]  # (absolute image path, label)


def img(path: Path, label: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), COLOURS[label]).save(path, format="JPEG", quality=95)


def lines(path: Path, rows: list[str], newline: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(r + newline for r in rows).encode())


def class_tree(
    image_dir: Path, classes: list[str], name: Callable[[str, int], str], n: int = 4
) -> list[tuple[str, int]]:
    """n images per class at image_dir/name(class, k), k = 1..n; (relative path, label)."""
    items = []
    for label, c in enumerate(classes):
        for k in range(1, n + 1):
            img(image_dir / name(c, k), label)
            items.append((name(c, k), label))
    return items


ROLES = ("train", "train", "val", "test")  # of the items of a class, in turn


def roles(items: list[tuple[str, int]]) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for j, it in enumerate(items):
        out[ROLES[j % 4]].append(it)
    return out


@dataclass
class Truth:
    """What the reader must find: names, the split's origin, and each split's (path, label)
    in order (None for a seeded split, whose order is the reader's; `all` is then its union)."""

    classnames: list[str]
    protocol: str
    train: list[Pair] | None = None
    test: list[Pair] | None = None
    all: list[Pair] | None = None


def absolute(image_dir: Path, items: list[tuple[str, int]]) -> list[Pair]:
    return [(image_dir / rel, y) for rel, y in items]


def write_zhou(
    folder: Path, name: str, image_dir: Path, items: list[tuple[str, int]], cnames: list[str]
) -> Truth:
    """CoOp's split_zhou_<name>.json over `items`: per class 2 train, 1 val, 1 test."""
    parts = roles(items)
    split = {s: [[rel, y, cnames[y]] for rel, y in parts[s]] for s in parts}
    (folder / f"split_zhou_{name}.json").write_text(json.dumps(split))
    readable = [c.replace("_", " ") for c in cnames]
    return Truth(
        readable, "zhou", absolute(image_dir, parts["train"]), absolute(image_dir, parts["test"])
    )


def official(classnames, image_dir, train, test) -> Truth:
    return Truth(classnames, "official", absolute(image_dir, train), absolute(image_dir, test))


def seeded(classnames, image_dir, items) -> Truth:
    return Truth(classnames, "seeded", all=absolute(image_dir, items))


# ---------------------------------------------------------------------------------------------
# Fake trees, one writer per data set and split origin


def caltech(root: Path, zhou: bool) -> Truth:
    image_dir = root / "caltech-101" / "101_ObjectCategories"
    if zhou:
        items = class_tree(image_dir, ["Faces", "Leopards", "accordion"], caltech_name)
        cnames = ["face", "leopard", "accordion"]  # CoOp's file has the renamed classes
        return write_zhou(root / "caltech-101", "Caltech101", image_dir, items, cnames)
    for dropped in ("BACKGROUND_Google", "Faces_easy"):
        img(image_dir / dropped / "image_0001.jpg", 0)
    items = class_tree(image_dir, ["Faces", "Leopards", "airplanes"], caltech_name)
    return seeded(["face", "leopard", "airplane"], image_dir, items)


def caltech_name(c: str, k: int) -> str:
    return f"{c}/image_{k:04d}.jpg"


PETS = ["Abyssinian", "american_bulldog", "Bengal"]


def pets(root: Path, zhou: bool) -> Truth:
    folder = root / "oxford_pets"
    image_dir = folder / "images"
    items = class_tree(image_dir, PETS, lambda c, k: f"{c}_{k}.jpg")
    if zhou:
        cnames = ["abyssinian", "american_bulldog", "bengal"]
        return write_zhou(folder, "OxfordPets", image_dir, items, cnames)
    parts = roles(items)
    train, test = parts["train"] + parts["val"], parts["test"]
    for file, part in (("trainval.txt", train), ("test.txt", test)):
        # "Abyssinian_100 1 1 1": image, class id (1-based), species (1 cat, 2 dog), breed id
        rows = [f"{rel[:-4]} {y + 1} {2 if y == 1 else 1} {y + 1}" for rel, y in part]
        lines(folder / "annotations" / file, rows)
    return official(["abyssinian", "american bulldog", "bengal"], image_dir, train, test)


FLOWERS = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]


def flowers(root: Path, how: str) -> Truth:
    folder = root / "oxford_flowers"
    image_dir = folder / "jpg"
    items = []
    for i in range(1, 13):  # labels interleaved, as in the real imagelabels.mat
        items.append((f"image_{i:05d}.jpg", (i - 1) % 3))
        img(image_dir / items[-1][0], items[-1][1])
    if how == "zhou":
        return write_zhou(folder, "OxfordFlowers", image_dir, items, FLOWERS)
    labels = np.array([[y + 1 for _, y in items]], dtype=np.uint8)  # (1, N), 1-based
    scipy.io.savemat(folder / "imagelabels.mat", {"labels": labels})
    (folder / "cat_to_name.json").write_text(
        json.dumps({str(y + 1): n for y, n in enumerate(FLOWERS)})
    )
    if how == "seeded":
        return seeded(FLOWERS, image_dir, items)
    ids = {
        "trnid": np.array([[1, 2, 3]], dtype=np.uint16),
        "valid": np.array([[4, 5, 6]], dtype=np.uint16),
        "tstid": np.array([[7, 8, 9, 10, 11, 12]], dtype=np.uint16),
    }
    scipy.io.savemat(folder / "setid.mat", ids)
    return official(FLOWERS, image_dir, items[:6], items[6:])


FOOD = ["apple_pie", "baby_back_ribs", "baklava"]


def food(root: Path, how: str) -> Truth:
    folder = root / "food-101"
    image_dir = folder / "images"
    items = class_tree(image_dir, FOOD, lambda c, k: f"{c}/{1000 + k}.jpg")
    if how == "zhou":
        return write_zhou(folder, "Food101", image_dir, items, FOOD)
    names = ["apple pie", "baby back ribs", "baklava"]
    if how == "seeded":
        return seeded(names, image_dir, items)
    parts = roles(items)
    train, test = parts["train"] + parts["val"], parts["test"]
    lines(folder / "meta" / "classes.txt", FOOD)
    for split, part in (("train", train), ("test", test)):
        lines(folder / "meta" / f"{split}.txt", [rel[:-4] for rel, _ in part])
        # torchvision's Food101 reads the .json twins of the lists
        grouped = {c: [rel[:-4] for rel, y in part if y == FOOD.index(c)] for c in FOOD}
        (folder / "meta" / f"{split}.json").write_text(json.dumps(grouped))
    return official(names, image_dir, train, test)


TEXTURES = ["banded", "blotchy", "braided"]


def dtd(root: Path, how: str) -> Truth:
    folder = root / "dtd"
    image_dir = folder / "images"
    items = class_tree(image_dir, TEXTURES, lambda c, k: f"{c}/{c}_{k:04d}.jpg")
    if how == "zhou":
        return write_zhou(folder, "DescribableTextures", image_dir, items, TEXTURES)
    if how == "seeded":
        return seeded(TEXTURES, image_dir, items)
    parts = roles(items)
    for split in ("train", "val", "test"):
        lines(folder / "labels" / f"{split}1.txt", [rel for rel, _ in parts[split]])
    return official(TEXTURES, image_dir, parts["train"] + parts["val"], parts["test"])


def eurosat(root: Path, zhou: bool) -> Truth:
    folder = root / "eurosat"
    image_dir = folder / "2750"
    raw = ["AnnualCrop", "Forest", "SeaLake"]
    items = class_tree(image_dir, raw, lambda c, k: f"{c}/{c}_{k}.jpg")
    names = ["Annual Crop Land", "Forest", "Sea or Lake"]
    if zhou:
        return write_zhou(folder, "EuroSAT", image_dir, items, names)
    return seeded(names, image_dir, items)


ACTIONS = ["ApplyEyeMakeup", "ApplyLipstick", "Archery"]
ACTION_FOLDERS = ["Apply_Eye_Makeup", "Apply_Lipstick", "Archery"]


def ucf(root: Path, how: str) -> Truth:
    folder = root / "ucf101"
    image_dir = folder / "UCF-101-midframes"

    def name(c: str, k: int) -> str:
        return f"{c}/v_{ACTIONS[ACTION_FOLDERS.index(c)]}_g{k:02d}_c01.jpg"

    items = class_tree(image_dir, ACTION_FOLDERS, name)
    names = ["Apply Eye Makeup", "Apply Lipstick", "Archery"]
    if how == "zhou":
        return write_zhou(folder, "UCF101", image_dir, items, ACTION_FOLDERS)
    if how == "seeded":
        return seeded(names, image_dir, items)
    lists = folder / "ucfTrainTestlist"  # the official lists have CRLF line ends

    def video(rel: str, y: int) -> str:
        return f"{ACTIONS[y]}/{rel.split('/')[1][:-4]}.avi"

    parts = roles(items)
    train, test = parts["train"] + parts["val"], parts["test"]
    lines(lists / "classInd.txt", [f"{y + 1} {a}" for y, a in enumerate(ACTIONS)], "\r\n")
    lines(lists / "trainlist01.txt", [f"{video(r, y)} {y + 1}" for r, y in train], "\r\n")
    lines(lists / "testlist01.txt", [video(r, y) for r, y in test], "\r\n")
    return official(names, image_dir, train, test)


CARS = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Tesla Model S Sedan 2012"]
CARS_COOP = ["2000 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 Tesla Model S Sedan"]


def cars_annotations(path: Path, items: list[tuple[str, int]]) -> None:
    """The devkit's (1, N) struct array: bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    annotations = np.zeros((1, len(items)), dtype=[(f, "O") for f in fields])
    for i, (rel, y) in enumerate(items):
        box = [np.array([[v]], dtype=np.uint16) for v in (1, 1, 7, 7)]
        annotations[0, i] = (
            *box,
            np.array([[y + 1]], dtype=np.uint8),
            np.array([rel.split("/")[1]]),
        )
    scipy.io.savemat(path, {"annotations": annotations})


def cars(root: Path, zhou: bool) -> Truth:
    folder = root / "stanford_cars"
    train_items, test_items = [], []
    for i in range(1, 10):  # labels interleaved, as in the real annotations
        train_items.append((f"cars_train/{i:05d}.jpg", (i - 1) % 3))
    for i in range(1, 7):
        test_items.append((f"cars_test/{i:05d}.jpg", (i + 1) % 3))
    for rel, y in train_items + test_items:
        img(folder / rel, y)
    if zhou:  # CoOp's paths start at stanford_cars/; per class 3 of cars_train, 1 of cars_test
        items = [
            it
            for y in range(3)
            for it in [t for t in train_items if t[1] == y]
            + [t for t in test_items if t[1] == y][:1]
        ]
        return write_zhou(folder, "StanfordCars", folder, items, CARS_COOP)
    names = np.empty((1, 3), dtype=object)  # a cell array of strings
    for y, n in enumerate(CARS):
        names[0, y] = n
    (folder / "devkit").mkdir()
    scipy.io.savemat(folder / "devkit" / "cars_meta.mat", {"class_names": names})
    cars_annotations(folder / "devkit" / "cars_train_annos.mat", train_items)
    cars_annotations(folder / "cars_test_annos_withlabels.mat", test_items)
    return official(CARS_COOP, folder, train_items, test_items)


VARIANTS = ["707-320", "Boeing 717", "F-16A/B"]  # names with spaces and slashes exist


def aircraft(root: Path, trainval: bool) -> Truth:
    folder = root / "fgvc_aircraft"
    image_dir = folder / "images"
    items = class_tree(
        image_dir, VARIANTS, lambda c, k: f"{1000000 + 10 * VARIANTS.index(c) + k}.jpg"
    )
    lines(folder / "variants.txt", VARIANTS)
    parts = roles(items)
    for split in ("train", "val", "test"):
        rows = [f"{rel[:-4]} {VARIANTS[y]}" for rel, y in parts[split]]
        lines(folder / f"images_variant_{split}.txt", rows)
    train = parts["train"] + (parts["val"] if trainval else [])
    return official(VARIANTS, image_dir, train, parts["test"])


SUN = ["a/abbey", "a/apartment_building/outdoor", "b/bus_interior"]
SUN_NAMES = ["abbey", "outdoor apartment building", "bus interior"]


def sun(root: Path, how: str) -> Truth:
    folder = root / "sun397"
    image_dir = folder / "SUN397"
    items = class_tree(image_dir, SUN, lambda c, k: f"{c}/sun_{SUN.index(c)}{k:03d}.jpg")
    if how == "zhou":
        cnames = ["abbey", "outdoor apartment_building", "bus_interior"]
        return write_zhou(folder, "SUN397", image_dir, items, cnames)
    if how == "seeded":  # no ClassName.txt anywhere: the class folders are found by walking
        return seeded(SUN_NAMES, image_dir, items)
    if how == "torchvision":  # the image archive: ClassName.txt inside SUN397/
        lines(image_dir / "ClassName.txt", [f"/{c}" for c in SUN])
        return seeded(SUN_NAMES, image_dir, items)
    parts = roles(items)
    train, test = parts["train"] + parts["val"], parts["test"]
    lines(folder / "ClassName.txt", [f"/{c}" for c in SUN])
    lines(folder / "Training_01.txt", [f"/{rel}" for rel, _ in train])
    lines(folder / "Testing_01.txt", [f"/{rel}" for rel, _ in test])
    return official(SUN_NAMES, image_dir, train, test)


WNIDS = ["n01440764", "n01443537", "n01484850"]
IMAGENET_NAMES = ["tench", "goldfish", "great white shark"]


def imagenet_classnames(path: Path) -> None:
    lines(path, [f"{w} {n}" for w, n in zip(WNIDS, IMAGENET_NAMES, strict=True)])


def imagenet(root: Path) -> Truth:
    folder = root / "imagenet"
    image_dir = folder / "images"
    imagenet_classnames(folder / "classnames.txt")
    train = class_tree(image_dir, WNIDS, lambda c, k: f"train/{c}/{c}_{k}.JPEG", n=3)
    test = class_tree(
        image_dir, WNIDS, lambda c, k: f"val/{c}/ILSVRC2012_val_{c[-3:]}{k}.JPEG", n=2
    )
    return official(IMAGENET_NAMES, image_dir, train, test)


def eval_only(classnames, image_dir, items) -> Truth:
    return Truth(classnames, "eval", [], absolute(image_dir, items))


def imagenetv2(root: Path) -> Truth:
    imagenet_classnames(root / "imagenet" / "classnames.txt")  # the default place
    image_dir = root / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    items = class_tree(image_dir, ["0", "1", "2"], lambda c, k: f"{c}/{c}a{k}.jpeg", n=2)
    return eval_only(IMAGENET_NAMES, image_dir, items)


def imagenet_sketch(root: Path) -> Truth:
    folder = root / "imagenet-sketch"
    imagenet_classnames(folder / "classnames.txt")  # CoOp's copy next to the images
    items = class_tree(folder / "images", WNIDS, lambda c, k: f"{c}/sketch_{k}.JPEG", n=2)
    return eval_only(IMAGENET_NAMES, folder / "images", items)


def imagenet_a(root: Path) -> Truth:
    folder = root / "imagenet-adversarial"
    imagenet_classnames(folder / "classnames.txt")
    image_dir = folder / "imagenet-a"
    (image_dir).mkdir(parents=True)
    (image_dir / "README.txt").write_text("ImageNet-A\n")
    present = [WNIDS[1], WNIDS[2]]  # a subset of the classes, relabelled 0, 1
    items = class_tree(image_dir, present, lambda c, k: f"{c}/{k:04d}.jpg", n=2)
    return eval_only(IMAGENET_NAMES[1:], image_dir, items)


def imagenet_r(root: Path) -> Truth:
    imagenet_classnames(root / "imagenet" / "classnames.txt")
    image_dir = root / "imagenet-rendition" / "imagenet-r"
    items = class_tree(image_dir, [WNIDS[0], WNIDS[2]], lambda c, k: f"{c}/art_{k}.jpg", n=2)
    return eval_only([IMAGENET_NAMES[0], IMAGENET_NAMES[2]], image_dir, items)


CASES: dict[str, tuple[type, dict, Callable[[Path], Truth]]] = {
    "caltech101-zhou": (Caltech101, {}, lambda r: caltech(r, zhou=True)),
    "caltech101-seeded": (Caltech101, {}, lambda r: caltech(r, zhou=False)),
    "pets-zhou": (OxfordPets, {}, lambda r: pets(r, zhou=True)),
    "pets-official": (OxfordPets, {}, lambda r: pets(r, zhou=False)),
    "flowers-zhou": (Flowers102, {}, lambda r: flowers(r, "zhou")),
    "flowers-official": (Flowers102, {}, lambda r: flowers(r, "official")),
    "flowers-seeded": (Flowers102, {}, lambda r: flowers(r, "seeded")),
    "food-zhou": (Food101, {}, lambda r: food(r, "zhou")),
    "food-official": (Food101, {}, lambda r: food(r, "official")),
    "food-seeded": (Food101, {}, lambda r: food(r, "seeded")),
    "dtd-zhou": (DTD, {}, lambda r: dtd(r, "zhou")),
    "dtd-official": (DTD, {}, lambda r: dtd(r, "official")),
    "dtd-seeded": (DTD, {}, lambda r: dtd(r, "seeded")),
    "eurosat-zhou": (EuroSAT, {}, lambda r: eurosat(r, zhou=True)),
    "eurosat-seeded": (EuroSAT, {}, lambda r: eurosat(r, zhou=False)),
    "ucf-zhou": (UCF101, {}, lambda r: ucf(r, "zhou")),
    "ucf-official": (UCF101, {}, lambda r: ucf(r, "official")),
    "ucf-seeded": (UCF101, {}, lambda r: ucf(r, "seeded")),
    "cars-zhou": (StanfordCars, {}, lambda r: cars(r, zhou=True)),
    "cars-official": (StanfordCars, {}, lambda r: cars(r, zhou=False)),
    "aircraft-official": (FGVCAircraft, {}, lambda r: aircraft(r, trainval=False)),
    "aircraft-trainval": (FGVCAircraft, {"trainval": True}, lambda r: aircraft(r, trainval=True)),
    "sun-zhou": (SUN397, {}, lambda r: sun(r, "zhou")),
    "sun-official": (SUN397, {}, lambda r: sun(r, "official")),
    "sun-seeded": (SUN397, {}, lambda r: sun(r, "seeded")),
    "sun-classnames-seeded": (SUN397, {}, lambda r: sun(r, "torchvision")),
    "imagenet": (ImageNet, {}, imagenet),
    "imagenetv2": (ImageNetV2, {}, imagenetv2),
    "imagenet-sketch": (ImageNetSketch, {}, imagenet_sketch),
    "imagenet-a": (ImageNetA, {}, imagenet_a),
    "imagenet-r": (ImageNetR, {}, imagenet_r),
}


# ---------------------------------------------------------------------------------------------
# Checks


def check_source(src, truth: Truth) -> dict[str, list[Pair]]:
    """Everything a reader must get right on a tree described by `truth`; returns the splits."""
    src.check()
    assert src.classnames == truth.classnames
    got = {}
    for split in SPLITS:
        labels = src.labels(split)
        assert labels.dtype == np.int64 and labels.ndim == 1
        ds = src.dataset(split, None)
        assert len(ds) == len(labels)
        got[split] = [(ds.folder / rel, y) for rel, y in ds.items]
        assert [y for _, y in got[split]] == labels.tolist()
        expected = getattr(truth, split)
        if expected is not None:
            assert got[split] == expected
        for i in range(len(ds)):
            image, label = ds[i]
            assert isinstance(label, int) and label == labels[i]
            assert image.mode == "RGB"
            pixels = np.asarray(image)
            with Image.open(got[split][i][0]) as f:
                np.testing.assert_array_equal(pixels, np.asarray(f.convert("RGB")))
            # JPEG keeps a solid colour to within a few levels: the image is its label's colour.
            assert np.abs(pixels.reshape(-1, 3).mean(0) - COLOURS[label]).max() < 10
    if truth.all is not None:
        assert sorted(got["train"] + got["test"]) == sorted(truth.all)
        for split in SPLITS:  # stratified: every class in both splits
            assert set(src.labels(split).tolist()) == set(range(len(truth.classnames)))
    assert f"{src.name}-{truth.protocol}-" in src.key("train")
    assert src.key("train").endswith("/train") and src.key("train") != src.key("test")
    return got


@pytest.mark.parametrize("case", list(CASES))
def test_reads_layout(case, tmp_path):
    cls, kwargs, write = CASES[case]
    truth = write(tmp_path)
    src = cls(root=str(tmp_path), **kwargs)
    check_source(src, truth)
    transformed = src.dataset("test", lambda im: np.asarray(im).shape)
    assert transformed[0] == ((8, 8, 3), int(src.labels("test")[0]))


def test_zhou_split_skips_val(tmp_path):
    truth = caltech(tmp_path, zhou=True)
    split = json.loads((tmp_path / "caltech-101" / "split_zhou_Caltech101.json").read_text())
    src = Caltech101(root=str(tmp_path))
    used = {rel for s in SPLITS for rel, _ in src.dataset(s, None).items}
    assert used.isdisjoint(rel for rel, _, _ in split["val"])
    assert len(src.labels("train")) == len(truth.train) == 6
    assert not (tmp_path / "caltech-101" / "split_fedclip_Caltech101.json").exists()


def test_zhou_and_fallback_keys_differ(tmp_path):
    zhou_root, seeded_root = tmp_path / "a", tmp_path / "b"
    eurosat(zhou_root, zhou=True)
    eurosat(seeded_root, zhou=False)
    zhou, fallback = EuroSAT(root=str(zhou_root)), EuroSAT(root=str(seeded_root))
    assert zhou.classnames == fallback.classnames
    assert zhou.key("test") != fallback.key("test")
    assert "zhou" in zhou.key("test") and "seeded" in fallback.key("test")
    a, b = FGVCAircraft(root=str(tmp_path / "c")), FGVCAircraft(str(tmp_path / "c"), trainval=True)
    aircraft(tmp_path / "c", trainval=False)
    assert a.key("train") != b.key("train") and a.key("test") != b.key("test")  # sizes differ


@pytest.mark.parametrize("case", [c for c in CASES if c.endswith("-seeded")])
def test_seeded_split_saved_and_reused(case, tmp_path):
    cls, kwargs, write = CASES[case]
    write(tmp_path)
    first = cls(root=str(tmp_path), **kwargs)
    before = {s: first.dataset(s, None).items for s in SPLITS}
    saved = first.folder / f"split_fedclip_{cls.__name__}.json"
    assert saved.is_file()
    text = saved.read_text()
    again = cls(root=str(tmp_path), **kwargs)
    assert {s: again.dataset(s, None).items for s in SPLITS} == before
    assert saved.read_text() == text
    # The file is what decides: move one test image to train, and a new reader follows it.
    edited = json.loads(text)
    edited["train"].append(edited["test"].pop(0))
    saved.write_text(json.dumps(edited))
    moved = tuple(edited["train"][-1])
    after = cls(root=str(tmp_path), **kwargs)
    assert moved in after.dataset("train", None).items
    assert moved not in after.dataset("test", None).items


@pytest.mark.parametrize("cls", COOP_DATASETS, ids=lambda c: c.__name__)
def test_missing_root(cls, tmp_path):
    root = tmp_path / "nowhere"
    src = cls(root=str(root))  # constructing reads nothing
    with pytest.raises(DataError) as info:
        src.check()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{cls.title} not found")
    assert str(root / cls.folder_name) in message
    assert cls.url in message and "DATASETS.md" in message
    if cls.zhou:
        assert f"split_zhou_{cls.zhou}.json" in message
    downloadable = "download" in inspect.signature(cls).parameters
    assert ("download=true" in message) == downloadable
    with pytest.raises(DataError):
        src.labels("test")
    with pytest.raises(DataError):
        _ = src.classnames
    assert not root.exists(), "a missing data set creates nothing"


def test_download_support():
    downloadable = {
        c.__name__ for c in COOP_DATASETS if "download" in inspect.signature(c).parameters
    }
    assert downloadable == {"Food101", "EuroSAT", "SUN397"}


def test_missing_annotations(tmp_path):
    img(tmp_path / "oxford_pets" / "images" / "Abyssinian_1.jpg", 0)
    with pytest.raises(DataError) as info:
        OxfordPets(root=str(tmp_path)).check()
    message = str(info.value)
    assert "\n" not in message and "Oxford-IIIT Pets" in message
    assert str(tmp_path / "oxford_pets" / "annotations" / "trainval.txt") in message


def test_variant_missing_classnames(tmp_path):
    img(tmp_path / "imagenet-rendition" / "imagenet-r" / WNIDS[0] / "a.jpg", 0)
    with pytest.raises(DataError) as info:
        ImageNetR(root=str(tmp_path)).check()
    message = str(info.value)
    assert "\n" not in message and "ImageNet-R" in message
    assert str(tmp_path / "imagenet" / "classnames.txt") in message
    assert "classnames_file" in message


def test_variant_classnames_file(tmp_path):
    imagenet_r(tmp_path)
    custom = tmp_path / "names.txt"
    lines(custom, [f"{w} class_{i}" for i, w in enumerate(WNIDS)])
    src = ImageNetR(root=str(tmp_path), classnames_file=str(custom))
    assert src.classnames == ["class 0", "class 2"]


VARIANT_TREES = {
    ImageNetV2: imagenetv2,
    ImageNetSketch: imagenet_sketch,
    ImageNetA: imagenet_a,
    ImageNetR: imagenet_r,
}


@pytest.mark.parametrize("cls", list(VARIANT_TREES), ids=lambda c: c.__name__)
def test_variants_are_evaluation_only(cls, tmp_path):
    VARIANT_TREES[cls](tmp_path)
    src = cls(root=str(tmp_path))
    assert "evaluation only" in cls.__doc__
    empty = src.labels("train")
    assert empty.dtype == np.int64 and empty.shape == (0,)
    assert len(src.dataset("train", None)) == 0
    assert len(src.labels("test")) > 0


def test_bad_split_file(tmp_path):
    dtd(tmp_path, "seeded")
    path = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    path.write_text("{not json")
    with pytest.raises(DataError) as info:
        DTD(root=str(tmp_path)).check()
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_unknown_class_in_list(tmp_path):
    food(tmp_path, "official")
    with open(tmp_path / "food-101" / "meta" / "test.txt", "a") as f:
        f.write("pizza/1234\n")
    with pytest.raises(DataError) as info:
        Food101(root=str(tmp_path)).check()
    message = str(info.value)
    assert "\n" not in message and "Food-101" in message and "pizza" in message


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "imagenet" / "images" / "val").mkdir(parents=True)  # val not sorted into folders
    imagenet_classnames(tmp_path / "imagenet" / "classnames.txt")
    img(tmp_path / "imagenet" / "images" / "train" / WNIDS[0] / "a.JPEG", 0)
    with pytest.raises(DataError, match="no test images"):
        ImageNet(root=str(tmp_path)).check()


# ---------------------------------------------------------------------------------------------
# download: torchvision's archive lands in CoOp's layout (archive download faked)

DOWNLOADS = {
    # class: (torchvision module to patch, writer of the extracted archive given download_root)
    Food101: ("food101", lambda d: food(d, "official")),  # download_root = root
    EuroSAT: ("eurosat", lambda d: eurosat(d.parent, zhou=False)),  # = root/eurosat
    SUN397: ("sun397", lambda d: sun(d.parent, "torchvision")),  # = root/sun397
}


@pytest.mark.parametrize("cls", list(DOWNLOADS), ids=lambda c: c.__name__)
def test_download_lands_in_layout(cls, tmp_path, monkeypatch):
    module, write = DOWNLOADS[cls]
    truths = []

    def extract(url, download_root, *args, **kwargs):
        truths.append(write(Path(download_root)))

    monkeypatch.setattr(
        getattr(torchvision.datasets, module), "download_and_extract_archive", extract
    )
    src = cls(root=str(tmp_path), download=True)
    src.check()  # downloads
    assert len(truths) == 1
    check_source(src, truths[0])

    def refuse(*args, **kwargs):
        raise AssertionError("downloaded although the data is there")

    monkeypatch.setattr(
        getattr(torchvision.datasets, module), "download_and_extract_archive", refuse
    )
    check_source(cls(root=str(tmp_path), download=True), truths[0])


def test_download_without_network(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.food101, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as info:
        Food101(root=str(tmp_path), download=True).check()
    message = str(info.value)
    assert "\n" not in message
    assert "Food-101 download" in message and "URLError" in message and "internet" in message
    assert Food101.url in message
