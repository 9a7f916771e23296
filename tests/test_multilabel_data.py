"""Multi-label data sets: the base class's rules, MultiShapes, and the VOC 2007, MS-COCO 2014 and
NUS-WIDE readers on tiny fake trees in their real on-disk formats.

Every fake image is a solid colour of its own (`colour(k)`), so an image's pixels say which file
it is, hence which targets it must come with.
"""

from __future__ import annotations

import json
import logging
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from fedclip.data.datasets import COLOURS, DataError, Shapes
from fedclip.data.multilabel import (
    COCO2014,
    MULTILABEL_DATASETS,
    NUSWIDE,
    VOC2007,
    VOC_CLASSES,
    MultiLabelSource,
    MultiShapes,
    rarest_labels,
)
from fedclip.errors import ConfigError

LOGGER = "fedclip.data.multilabel"

# ---------------------------------------------------------------------------------------------
# helpers


def colour(k: int) -> tuple[int, int, int]:
    """A colour of its own for fake image k (k < 64), far enough from the others to survive JPEG."""
    return (20 + 30 * (k % 8), 20 + 30 * (k // 8), 128)


def solid(path: Path, k: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour(k)).save(path, format="JPEG", quality=95)


def which(image: Image.Image) -> int:
    """The k whose colour `image` is."""
    mean = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0)
    k = int(np.argmin([np.abs(mean - colour(j)).max() for j in range(64)]))
    assert np.abs(mean - colour(k)).max() < 8, f"{mean} is no fake image's colour"
    return k


def write_lines(path: Path, rows: list[str], newline: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(r + newline for r in rows).encode())


def check_reader(src: MultiLabelSource, truth: dict[str, dict[int, set[int]]]) -> None:
    """`truth[split]` maps each kept image's k to its set of class ids, in the reader's order:
    targets, labels (rarest by train count) and the images themselves must agree."""
    counts = np.zeros(src.num_classes, dtype=np.int64)
    for classes in truth["train"].values():
        counts[list(classes)] += 1
    assert src.positive_counts("train").tolist() == counts.tolist()
    for split, rows in truth.items():
        targets = src.targets(split)
        assert targets.dtype == np.uint8 and targets.shape == (len(rows), src.num_classes)
        assert [set(np.flatnonzero(t).tolist()) for t in targets] == list(rows.values())
        rarest = [min(classes, key=lambda c: (counts[c], c)) for classes in rows.values()]
        labels = src.labels(split)
        assert labels.dtype == np.int64 and labels.tolist() == rarest
        ds = src.dataset(split, None)
        assert len(ds) == len(rows)
        for i, k in enumerate(rows):
            image, target = ds[i]
            assert image.mode == "RGB" and which(image) == k
            assert target.dtype == torch.float32 and target.tolist() == targets[i].tolist()
    tensor_ds = src.dataset("test", lambda im: torch.as_tensor(np.array(im)))
    assert isinstance(tensor_ds[0][0], torch.Tensor)


def left_out(caplog, split: str, n: int, total: int, what: str) -> None:
    """Exactly one log record says that n of total `split` images were left out for `what`."""
    hits = [r.getMessage() for r in caplog.records if f" {split}: left out" in r.getMessage()]
    hits = [m for m in hits if what in m]
    assert len(hits) == 1, f"expected one {split} '{what}' record, got {hits}"
    assert f"left out {n} of {total}" in hits[0]


def one_line_missing(src: MultiLabelSource, *parts: str) -> str:
    with pytest.raises(DataError) as info:
        src.check()
    message = str(info.value)
    assert "\n" not in message and "not found" in message
    for part in (src.title, *parts):
        assert part in message, f"{part!r} not in {message!r}"
    return message


# ---------------------------------------------------------------------------------------------
# the base class: rarest label, no-label images


def test_rarest_labels_rule():
    targets = np.array(
        [
            [1, 1, 0, 0],  # counts 5 and 2: class 1
            [1, 0, 0, 1],  # counts 5 and 2: class 3
            [0, 1, 0, 1],  # 2 and 2: a tie, the lower id
            [1, 0, 1, 0],  # class 2 has no train image at all: rarest of all
            [0, 0, 0, 0],  # no positive
        ],
        dtype=np.uint8,
    )
    counts = np.array([5, 2, 0, 2])
    assert rarest_labels(targets, counts).tolist() == [1, 3, 1, 2, -1]
    assert rarest_labels(targets, counts).dtype == np.int64
    with pytest.raises(ValueError):
        rarest_labels(targets, counts[:3])


class Memory(MultiLabelSource):
    """A multi-label source over in-memory targets; image i of a split is colour(i)."""

    name = "memory"
    title = "Memory"

    def __init__(self, targets: dict[str, list[list[int]]]):
        super().__init__()
        self.raw = {s: np.array(t, dtype=np.uint8) for s, t in targets.items()}
        self.reads = {"train": 0, "test": 0}

    @property
    def classnames(self) -> list[str]:
        return ["a_b", "c", "d"]

    def _read(self, split):
        self.reads[split] += 1
        return list(range(len(self.raw[split]))), self.raw[split]

    def _image(self, split, ref):
        return Image.new("RGB", (4, 4), colour(ref))


def test_base_class_rules(caplog):
    src = Memory(
        {
            "train": [[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 0, 1], [0, 1, 0], [0, 0, 0]],
            "test": [[1, 1, 1], [0, 0, 0], [1, 1, 0]],
        }
    )
    assert src.multilabel is True
    with caplog.at_level(logging.INFO, logger=LOGGER):
        # train counts after leaving out rows 2 and 5: [3, 2, 1]
        assert src.positive_counts("train").tolist() == [3, 2, 1]
        assert src.targets("train").tolist() == [[1, 1, 0], [1, 0, 0], [1, 0, 1], [0, 1, 0]]
        assert src.labels("train").tolist() == [1, 0, 2, 1]
        assert src.labels("test").tolist() == [2, 1]  # test labels use the train counts
        src.check()
        src.labels("test")
        ds = src.dataset("train", None)
        assert [which(ds[i][0]) for i in range(len(ds))] == [0, 1, 3, 4]  # original rows
        assert ds[2][1].tolist() == [1.0, 0.0, 1.0]
    left_out(caplog, "train", 2, 6, "no positive label")
    left_out(caplog, "test", 1, 3, "no positive label")
    assert src.reads == {"train": 1, "test": 1}  # each split read once
    # callers get copies
    src.targets("train")[:] = 0
    src.labels("train")[:] = 0
    assert src.labels("train").tolist() == [1, 0, 2, 1]
    # the key follows the content
    assert src.key("train") == Memory(src.raw).key("train") != src.key("test")
    other = {"train": src.raw["train"].copy(), "test": src.raw["test"]}
    other["train"][0, 2] = 1
    assert Memory(other).key("train") != src.key("train")
    with pytest.raises(ValueError, match="split"):
        src.targets("val")


def test_base_class_split_without_labels_is_an_error():
    src = Memory({"train": [[1, 0, 0]], "test": [[0, 0, 0], [0, 0, 0]]})
    with pytest.raises(DataError, match="no test image has a label"):
        src.check()


# ---------------------------------------------------------------------------------------------
# MultiShapes


def test_multishapes_is_deterministic():
    a = MultiShapes(num_classes=6, train_images=12, test_images=6, image_size=32)
    b = MultiShapes(num_classes=6, train_images=12, test_images=6, image_size=32)
    assert np.array_equal(a.targets("train"), b.targets("train"))
    for split in ("train", "test"):
        da, db = a.dataset(split, None), b.dataset(split, None)
        for i in range(len(da)):
            assert np.array_equal(np.asarray(da[i][0]), np.asarray(db[i][0]))
    first = np.asarray(a.dataset("train", None)[0][0])
    assert not np.array_equal(first, np.asarray(a.dataset("test", None)[0][0]))
    reseeded = MultiShapes(num_classes=6, train_images=12, test_images=6, image_size=32, seed=1)
    assert not np.array_equal(first, np.asarray(reseeded.dataset("train", None)[0][0]))
    assert a.key("train") == b.key("train") != reseeded.key("train")
    assert a.key("train") != MultiShapes(num_classes=6, train_images=12, image_size=48).key("train")
    # more images extend a split without changing the first ones
    longer = MultiShapes(num_classes=6, train_images=20, test_images=6, image_size=32)
    assert np.array_equal(longer.targets("train")[:12], a.targets("train"))


def test_multishapes_targets_are_what_is_drawn():
    # 8 classes: 8 different colours, so the colours in an image name its classes
    src = MultiShapes(num_classes=8, train_images=40, test_images=10, image_size=48, max_objects=4)
    base = np.array([COLOURS[name.split()[0]] for name in src.classnames])  # (C, 3)
    for split in ("train", "test"):
        targets, ds = src.targets(split), src.dataset(split, None)
        for i in range(len(ds)):
            pixels = np.asarray(ds[i][0], dtype=np.int64).reshape(-1, 1, 3)  # (P, 1, 3)
            near = (np.abs(pixels - base).max(-1) <= 20).sum(0)  # (C,) pixels of each colour
            assert set(np.flatnonzero(near >= 6).tolist()) == set(np.flatnonzero(targets[i]))
            assert set(np.flatnonzero(near).tolist()) == set(np.flatnonzero(targets[i]))
            assert ds[i][1].tolist() == targets[i].tolist()


def test_multishapes_objects_and_rarest_labels():
    src = MultiShapes(num_classes=5, train_images=60, test_images=20, image_size=16, max_objects=3)
    assert src.classnames == Shapes(num_classes=5).classnames
    assert src.class_groups == Shapes(num_classes=5).class_groups
    assert src.multilabel and src.num_classes == 5
    train = src.targets("train")
    assert set(train.sum(1).tolist()) == {1, 2, 3}  # 1..max_objects classes, all seen
    assert set(src.targets("test").sum(1).tolist()) <= {1, 2, 3}
    counts = [sum(int(row[c]) for row in train) for c in range(5)]
    for split in ("train", "test"):
        expected = [
            min(np.flatnonzero(row).tolist(), key=lambda c: (counts[c], c))
            for row in src.targets(split)
        ]
        assert src.labels(split).tolist() == expected
    one = MultiShapes(num_classes=3, train_images=10, test_images=4, max_objects=1)
    assert (one.targets("train").sum(1) == 1).all()
    assert one.labels("train").tolist() == np.argmax(one.targets("train"), 1).tolist()
    image, target = MultiShapes(num_classes=3, image_size=20).dataset("test", np.asarray)[0]
    assert image.shape == (20, 20, 3) and target.shape == (3,) and target.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 0},
        {"num_classes": 57},
        {"max_objects": 0},
        {"num_classes": 2},
        {"seed": -1},
        {"train_images": None},
    ],
)
def test_multishapes_arguments(kwargs):
    with pytest.raises(ConfigError, match="MultiShapes"):
        MultiShapes(**kwargs)  # num_classes=2 < the default max_objects=3


# ---------------------------------------------------------------------------------------------
# PASCAL VOC 2007

DOG, PERSON, CAT, AEROPLANE = (VOC_CLASSES.index(c) for c in ("dog", "person", "cat", "aeroplane"))

# id -> objects (name, difficult); k of the image = its position in this dict
VOC_TRAINVAL = {
    "000001": [("dog", 0), ("person", 0), ("dog", 0)],
    "000002": [("dog", 0)],
    "000004": [("person", 0), ("cat", 1)],  # cat only as a difficult object: still a positive
    "000007": [],  # no object: left out
}
VOC_TEST = {
    "000003": [("cat", 0), ("dog", 0)],
    "000005": [("tvmonitor", 1), ("aeroplane", 0)],
    "000006": [("person", 0)],
}


def voc_xml(image_id: str, objects: list[tuple[str, int]]) -> str:
    objs = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{difficult}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
        f"<ymax>5</ymax></bndbox></object>"
        for name, difficult in objects
    )
    return (
        f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
        f"<size><width>8</width><height>8</height><depth>3</depth></size>"
        f"<segmented>0</segmented>{objs}</annotation>"
    )


def write_voc(root: Path, splits: tuple[str, ...] = ("trainval", "test")) -> None:
    folder = root / "VOCdevkit" / "VOC2007"
    every = list(VOC_TRAINVAL) + list(VOC_TEST)
    for image_set, images in (("trainval", VOC_TRAINVAL), ("test", VOC_TEST)):
        if image_set not in splits:
            continue
        write_lines(folder / "ImageSets" / "Main" / f"{image_set}.txt", list(images))
        for image_id, objects in images.items():
            (folder / "Annotations").mkdir(parents=True, exist_ok=True)
            (folder / "Annotations" / f"{image_id}.xml").write_text(voc_xml(image_id, objects))
            solid(folder / "JPEGImages" / f"{image_id}.jpg", every.index(image_id))


def voc_truth() -> dict[str, dict[int, set[int]]]:
    every = list(VOC_TRAINVAL) + list(VOC_TEST)
    return {
        split: {
            every.index(i): {VOC_CLASSES.index(n) for n, _ in objs}
            for i, objs in images.items()
            if objs
        }
        for split, images in (("train", VOC_TRAINVAL), ("test", VOC_TEST))
    }


def test_voc2007(tmp_path, caplog):
    write_voc(tmp_path)
    src = VOC2007(root=str(tmp_path))
    names = src.classnames
    assert len(names) == 20 and names[0] == "aeroplane" and names[-1] == "tv monitor"
    assert names[10] == "dining table" and names[15] == "potted plant"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        check_reader(src, voc_truth())
    # by hand: train counts dog 2, person 2, cat 1 -> (dog, person) is dog, the lower id;
    # test: (cat, dog) is cat; (tvmonitor, aeroplane) both 0, aeroplane; person
    assert src.labels("train").tolist() == [DOG, DOG, CAT]
    assert src.labels("test").tolist() == [CAT, AEROPLANE, PERSON]
    left_out(caplog, "train", 1, 4, "no positive label")
    assert src.key("train").startswith("voc2007/train-")


def test_voc2007_bad_annotation(tmp_path):
    write_voc(tmp_path)
    xml = tmp_path / "VOCdevkit" / "VOC2007" / "Annotations" / "000002.xml"
    xml.write_text(voc_xml("000002", [("unicorn", 0)]))
    with pytest.raises(DataError) as info:
        VOC2007(root=str(tmp_path)).check()
    assert (
        "\n" not in str(info.value) and "unicorn" in str(info.value) and str(xml) in str(info.value)
    )
    xml.write_text("<annotation><object>")
    with pytest.raises(DataError, match="cannot read PASCAL VOC 2007 annotation"):
        VOC2007(root=str(tmp_path)).check()
    xml.unlink()
    message = one_line_missing(VOC2007(root=str(tmp_path)), str(xml))
    assert "annotation" in message


def test_voc2007_download_lands_in_layout(tmp_path, monkeypatch):
    fetched = []

    def extract(url, download_root, filename=None, md5=None, **kwargs):
        image_set = "test" if "VOCtest" in filename else "trainval"
        fetched.append(image_set)
        write_voc(Path(download_root), (image_set,))

    monkeypatch.setattr(torchvision.datasets.voc, "download_and_extract_archive", extract)
    src = VOC2007(root=str(tmp_path), download=True)
    check_reader(src, voc_truth())
    assert sorted(fetched) == ["test", "trainval"]

    def refuse(*args, **kwargs):
        raise AssertionError("downloaded although the data is there")

    monkeypatch.setattr(torchvision.datasets.voc, "download_and_extract_archive", refuse)
    check_reader(VOC2007(root=str(tmp_path), download=True), voc_truth())


def test_voc2007_download_without_network(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.voc, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as info:
        VOC2007(root=str(tmp_path), download=True).check()
    message = str(info.value)
    assert "\n" not in message and "download" in message and "URLError" in message
    assert "internet" in message and VOC2007.url in message


# ---------------------------------------------------------------------------------------------
# MS-COCO 2014

# categories listed out of id order: the classes are person (1), traffic light (10), dog (18)
COCO_CATEGORIES = [
    {"supercategory": "animal", "id": 18, "name": "dog"},
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "outdoor", "id": 10, "name": "traffic light"},
]
# image id -> category ids of its annotations; k of an image = its position here
COCO_TRAIN = {5: [10], 2: [1, 1, 18], 9: [1], 7: []}
COCO_VAL = {101: [18, 10], 100: [1, 10, 10]}


def write_coco(root: Path) -> None:
    folder = root / "coco"
    every = list(COCO_TRAIN) + list(COCO_VAL)
    for image_set, images in (("train2014", COCO_TRAIN), ("val2014", COCO_VAL)):
        entries, annotations = [], []
        for image_id, cats in images.items():
            name = f"COCO_{image_set}_{image_id:012d}.jpg"
            solid(folder / image_set / name, every.index(image_id))
            entries.append({"id": image_id, "file_name": name, "width": 8, "height": 8})
            for cat in cats:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": cat,
                        "iscrowd": 0,
                        "bbox": [1, 1, 3, 3],
                        "area": 9.0,
                        "segmentation": [[1, 1, 4, 1, 4, 4]],
                    }
                )
        data = {"info": {}, "images": entries, "annotations": annotations}
        data["categories"] = COCO_CATEGORIES
        (folder / "annotations").mkdir(parents=True, exist_ok=True)
        (folder / "annotations" / f"instances_{image_set}.json").write_text(json.dumps(data))


def test_coco2014(tmp_path, caplog):
    write_coco(tmp_path)
    src = COCO2014(root=str(tmp_path))
    column = {1: 0, 10: 1, 18: 2}
    every = list(COCO_TRAIN) + list(COCO_VAL)
    truth = {  # the reader orders images by id
        split: {every.index(i): {column[c] for c in images[i]} for i in sorted(images) if images[i]}
        for split, images in (("train", COCO_TRAIN), ("test", COCO_VAL))
    }
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert src.classnames == ["person", "traffic light", "dog"]  # reads the train JSON
        check_reader(src, truth)
    # by hand: train counts person 2, traffic light 1, dog 1
    assert src.labels("train").tolist() == [2, 1, 0]  # images 2, 5, 9
    assert src.labels("test").tolist() == [1, 1]  # (person, light): light; (dog, light): tie
    left_out(caplog, "train", 1, 4, "no positive label")


def test_coco2014_bad_annotations(tmp_path):
    write_coco(tmp_path)
    path = tmp_path / "coco" / "annotations" / "instances_val2014.json"
    data = json.loads(path.read_text())
    data["categories"] = data["categories"][:2]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] in (18, 1)]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="categories .* differ"):
        COCO2014(root=str(tmp_path)).check()
    path.write_text("{not json")
    with pytest.raises(DataError) as info:
        COCO2014(root=str(tmp_path)).check()
    assert "\n" not in str(info.value) and str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------
# NUS-WIDE

NUS_CONCEPTS = ["animal", "sky", "water"]
# list line -> concepts; None: listed but not on disk. k of an image = its position here
NUS_TRAIN = {
    "animal\\0001_1.jpg": {"animal"},
    "sky\\0002_2.jpg": {"sky", "water"},
    "sky\\0003_3.jpg": {"animal", "sky"},
    "water\\0004_4.jpg": None,  # missing file in a present folder
    "animal\\0005_5.jpg": set(),  # no concept: left out
    "gone\\0006_6.jpg": None,  # folder missing altogether
    "water\\0007_7.jpg": {"water"},
}
NUS_TEST = {
    "water\\0008_8.jpg": {"animal", "water"},
    "sky\\0009_9.jpg": {"sky"},
    "sky\\0010_10.jpg": None,
}


def write_nus(root: Path) -> None:
    folder = root / "nus_wide"
    write_lines(folder / "Concepts81.txt", NUS_CONCEPTS, "\r\n")
    every = list(NUS_TRAIN) + list(NUS_TEST)
    for tag, images in (("Train", NUS_TRAIN), ("Test", NUS_TEST)):
        write_lines(folder / "ImageList" / f"{tag}Imagelist.txt", list(images), "\r\n")
        for line, concepts in images.items():
            if concepts is not None:
                solid(folder / "Flickr" / line.replace("\\", "/"), every.index(line))
        for concept in NUS_CONCEPTS:
            column = [str(int(c is not None and concept in c)) for c in images.values()]
            labels = folder / "Groundtruth" / "TrainTestLabels" / f"Labels_{concept}_{tag}.txt"
            write_lines(labels, column, " \r\n")


def test_nuswide(tmp_path, caplog):
    write_nus(tmp_path)
    src = NUSWIDE(root=str(tmp_path))
    assert src.classnames == NUS_CONCEPTS
    every = list(NUS_TRAIN) + list(NUS_TEST)
    truth = {
        split: {
            every.index(line): {NUS_CONCEPTS.index(c) for c in concepts}
            for line, concepts in images.items()
            if concepts
        }
        for split, images in (("train", NUS_TRAIN), ("test", NUS_TEST))
    }
    with caplog.at_level(logging.INFO, logger=LOGGER):
        check_reader(src, truth)
    # by hand: train counts animal 2, sky 2, water 2 -> ties everywhere: the lower id
    assert src.labels("train").tolist() == [0, 1, 0, 2]
    assert src.labels("test").tolist() == [0, 1]
    left_out(caplog, "train", 2, 7, "not found")
    left_out(caplog, "train", 1, 5, "no positive label")
    left_out(caplog, "test", 1, 3, "not found")
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if " test: left out" in m and "no positive label" in m]


def test_nuswide_misaligned_labels(tmp_path):
    write_nus(tmp_path)
    path = tmp_path / "nus_wide" / "Groundtruth" / "TrainTestLabels" / "Labels_sky_Test.txt"
    write_lines(path, ["0", "1"])
    with pytest.raises(DataError) as info:
        NUSWIDE(root=str(tmp_path)).check()
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    path.unlink()
    one_line_missing(NUSWIDE(root=str(tmp_path)), str(path), NUSWIDE.url)
    path.mkdir()  # a folder where the labels file should be
    with pytest.raises(DataError, match="cannot read") as info:
        NUSWIDE(root=str(tmp_path)).check()
    assert "\n" not in str(info.value) and str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------
# every reader: missing data is a one-line error naming the data set, the path and the fix


@pytest.mark.parametrize(
    "cls, looked_at, how",
    [
        (VOC2007, "VOCdevkit/VOC2007", "download=true"),
        (COCO2014, "coco/annotations/instances_train2014.json", COCO2014.url),
        (NUSWIDE, "nus_wide", NUSWIDE.url),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_missing_data(tmp_path, cls, looked_at, how):
    one_line_missing(
        cls(root=str(tmp_path / "nowhere")), str(tmp_path / "nowhere" / looked_at), how
    )


def test_registry():
    assert MULTILABEL_DATASETS == (MultiShapes, VOC2007, COCO2014, NUSWIDE)
    for cls in MULTILABEL_DATASETS:
        assert issubclass(cls, MultiLabelSource) and cls.multilabel
        assert "Args:" in cls.__doc__
