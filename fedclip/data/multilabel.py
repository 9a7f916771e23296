"""Multi-label data sets: every image has a set of classes, scored by mAP.

`MultiLabelSource` extends the `DatasetSource` contract with `targets(split)`, the 0/1 matrix
of which classes each image shows. Partitioners still receive one integer per image:
`labels(split)` is each image's rarest positive class (rarity counted on the train split), so a
Dirichlet partition keyed on it spreads the rare classes as unevenly as the common ones. Images
with no positive class are left out of their split, and how many is logged.

- `MultiShapes`: several coloured shapes per image, drawn on the fly; offline, like `Shapes`.
- `VOC2007`: PASCAL VOC 2007, 20 classes; root/VOCdevkit/VOC2007/ (torchvision can download it).
- `COCO2014`: MS-COCO 2014, 80 classes; root/coco/{train2014,val2014,annotations}/.
- `NUSWIDE`: NUS-WIDE, 81 concepts; root/nus_wide/{Flickr,ImageList,Groundtruth}/.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw

from fedclip.data.datasets import (
    SHAPES,
    SPLITS,
    DataError,
    DatasetSource,
    _check_split,
    check_shapes_args,
    jittered_colour,
    paint_shape,
    shapes_combination,
)
from fedclip.data.files import missing

try:  # what torchvision's VOC reader uses too: hardened against hostile XML when installed
    from defusedxml.ElementTree import parse as _parse_xml
except ImportError:
    from xml.etree.ElementTree import parse as _parse_xml

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


# --------------------------------------------------------------------------------------------
# MultiShapes: the built-in offline multi-label data set


def draw_shape_into(
    image: Image.Image,
    colour: str,
    shape: str,
    box: tuple[float, float, float, float],
    rng: np.random.Generator,
) -> None:
    """Draw a `colour` `shape` into `image`, filling the square `box` (x0, y0, x1, y1).

    As in `Shapes`: the exact colour is jittered and polygons get a slight tilt, from `rng`.
    """
    paint_shape(ImageDraw.Draw(image), shape, box, jittered_colour(colour, rng), rng)


def _background(size: int, rng: np.random.Generator) -> Image.Image:
    """Shapes' lightly noisy grey background."""
    grey = int(rng.integers(185, 236))
    tint = rng.integers(-8, 9, size=3)
    noise = rng.integers(-10, 11, size=(size, size, 3))
    return Image.fromarray(np.clip(grey + tint + noise, 0, 255).astype(np.uint8), "RGB")


class MultiShapes(MultiLabelSource):
    """Several coloured shapes per image, drawn on the fly; needs no files or internet.

    The multi-label version of `Shapes`, with the same classes ("red circle", "green square",
    ...). Image i shows 1 to max_objects distinct classes, each at a random smaller size and
    position inside its own cell of a grid (so objects do not overlap), on Shapes' noisy grey
    background. Everything is deterministic in (seed, split, index); which classes an image
    shows comes first out of its generator, so `targets` never draws pixels.

    Args:
        num_classes: Number of classes, 1 to 56.
        train_images: Images in the train split.
        test_images: Images in the test split.
        image_size: Side of the square images in pixels.
        max_objects: Most classes in one image (each image has 1 to max_objects, uniformly);
            at most num_classes.
        seed: Seed of the drawing; train and test images always differ.
    """

    name = "multishapes"
    title = "MultiShapes"

    def __init__(
        self,
        num_classes: int = 10,
        train_images: int = 400,
        test_images: int = 200,
        image_size: int = 64,
        max_objects: int = 3,
        seed: int = 0,
    ):
        super().__init__()
        check_shapes_args(
            "MultiShapes",
            num_classes=num_classes,
            train_images=train_images,
            test_images=test_images,
            image_size=image_size,
            max_objects=max_objects,
        )
        if max_objects > num_classes:
            raise ValueError(
                f"MultiShapes: max_objects must be <= num_classes ({num_classes}), "
                f"got {max_objects}"
            )
        if seed < 0:
            raise ValueError(f"MultiShapes: seed must be >= 0, got {seed}")
        self._num_classes = num_classes
        self.train_images = train_images
        self.test_images = test_images
        self.image_size = image_size
        self.max_objects = max_objects
        self.seed = seed
        self.grid = math.ceil(math.sqrt(max_objects))  # cells per side, one object per cell

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def classnames(self) -> list[str]:
        return [" ".join(shapes_combination(c)) for c in range(self._num_classes)]

    @property
    def class_groups(self) -> list[int]:
        """Classes grouped by shape, as in `Shapes`."""
        return [SHAPES.index(shapes_combination(c)[1]) for c in range(self._num_classes)]

    def _scene(self, split: str, i: int) -> tuple[np.ndarray, np.random.Generator]:
        """The classes of image i in drawing order, and its generator, positioned to draw."""
        rng = np.random.default_rng((self.seed, SPLITS.index(split), i))
        k = int(rng.integers(1, self.max_objects + 1))
        return rng.choice(self._num_classes, size=k, replace=False), rng

    def _read(self, split: str) -> tuple[list[int], np.ndarray]:
        n = self.train_images if split == "train" else self.test_images
        targets = np.zeros((n, self._num_classes), dtype=np.uint8)
        for i in range(n):
            targets[i, self._scene(split, i)[0]] = 1
        return list(range(n)), targets

    def _image(self, split: str, ref: int) -> Image.Image:
        classes, rng = self._scene(split, ref)
        s = self.image_size
        image = _background(s, rng)
        cell = s / self.grid
        cells = rng.choice(self.grid * self.grid, size=len(classes), replace=False)
        for c, where in zip(classes.tolist(), cells.tolist(), strict=True):
            row, col = divmod(where, self.grid)
            radius = rng.uniform(0.3, 0.45) * cell
            cx = rng.uniform(col * cell + radius, (col + 1) * cell - radius)
            cy = rng.uniform(row * cell + radius, (row + 1) * cell - radius)
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            draw_shape_into(image, *shapes_combination(c), box, rng)
        return image

    def key(self, split: str) -> str:
        _check_split(split)
        n = self.train_images if split == "train" else self.test_images
        return (
            f"multishapes-c{self._num_classes}-n{n}-px{self.image_size}-k{self.max_objects}"
            f"-seed{self.seed}/{split}"
        )


# --------------------------------------------------------------------------------------------
# Readers of published layouts


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
        with open(path, encoding="utf-8", errors="replace") as f:
            return [s for s in (line.strip() for line in f) if s]

    def _image(self, split: str, ref: str) -> Image.Image:
        return _open_rgb(self.folder / ref)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r})"


VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
"""PASCAL VOC's class names as its annotations write them, in the standard order."""

_VOC_READABLE = {
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
}


class VOC2007(_OnDisk):
    """PASCAL VOC 2007: 9,963 images of 20 object classes; trainval (5,011) is the train split,
    test (4,952) the test split.

    Reads root/VOCdevkit/VOC2007/ImageSets/Main/{trainval,test}.txt, the image ids of each split,
    Annotations/<id>.xml and JPEGImages/<id>.jpg. An image's classes are the `<object><name>`s of
    its annotation, objects marked difficult included (as the multi-label CLIP papers count
    them; VOC's own classification benchmark ignores those). Classes are in VOC's standard order
    (aeroplane ... tvmonitor), named "dining table", "potted plant" and "tv monitor" for the
    prompts. All annotations are parsed once, on first use.

    Args:
        root: Folder holding (or to receive) VOCdevkit/.
        download: Download the trainval and test archives into root if they are not there
            (needs internet; 0.9 GB), through torchvision's VOCDetection.
    """

    name = "voc2007"
    title = "PASCAL VOC 2007"
    folder_name = os.path.join("VOCdevkit", "VOC2007")
    layout = "VOCdevkit/VOC2007/{Annotations,ImageSets/Main,JPEGImages}"
    url = "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/"
    image_sets = {"train": "trainval", "test": "test"}

    def __init__(self, root: str = "data", download: bool = False):
        super().__init__(root)
        self.download = download

    @property
    def num_classes(self) -> int:
        return len(VOC_CLASSES)

    @property
    def classnames(self) -> list[str]:
        return [_VOC_READABLE.get(c, c) for c in VOC_CLASSES]

    def _how(self) -> str:
        how = (
            f"get VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar from {self.url} and "
            f"unpack them in {self.root}"
        )
        return f"set data.dataset.init_args.download=true to fetch it (needs internet), or {how}"

    def _list(self, split: str) -> Path:
        return self.folder / "ImageSets" / "Main" / f"{self.image_sets[split]}.txt"

    def _fetch(self, split: str) -> None:
        image_set = self.image_sets[split]
        manual = f"get it from {self.url} and unpack it in {self.root}"
        try:
            torchvision.datasets.VOCDetection(
                self.root, year="2007", image_set=image_set, download=True
            )
        except OSError as e:  # no network, refused, disk full ... (URLError is an OSError)
            reason = (str(e).splitlines() or [""])[0]
            raise DataError(
                f"{self.title} {image_set} download to {self.root} failed "
                f"({type(e).__name__}: {reason}); check the internet connection or {manual}"
            ) from None
        except RuntimeError as e:  # checksum mismatch, "Dataset not found or corrupted" ...
            reason = (str(e).splitlines() or [""])[0]
            raise DataError(
                f"{self.title} {image_set} under {self.root} is corrupted after download "
                f"({reason}); delete {self.folder} and retry, or {manual}"
            ) from None

    def _read(self, split: str) -> tuple[list[str], np.ndarray]:
        if self.download and not self._list(split).is_file():
            self._fetch(split)
        self._require(self.folder, self._list(split), self.folder / "Annotations")
        ids = self._lines(self._list(split))
        index = {c: j for j, c in enumerate(VOC_CLASSES)}
        targets = np.zeros((len(ids), len(VOC_CLASSES)), dtype=np.uint8)
        for i, image_id in enumerate(ids):
            path = self.folder / "Annotations" / f"{image_id}.xml"
            for name in self._object_names(path):
                if name not in index:
                    raise DataError(
                        f"{path}: unknown class {name!r}; {self.title} has {', '.join(VOC_CLASSES)}"
                    )
                targets[i, index[name]] = 1
        return [f"JPEGImages/{image_id}.jpg" for image_id in ids], targets

    def _object_names(self, path: Path) -> list[str]:
        """The `<object><name>` of every object (difficult or not) of one annotation file."""
        if not path.is_file():
            raise missing(f"{self.title} annotation", path, self._how())
        try:
            tree = torchvision.datasets.VOCDetection.parse_voc_xml(_parse_xml(path).getroot())
            objects = tree["annotation"].get("object", [])  # always a list, possibly empty
            return [str(o["name"]).strip() for o in objects]
        except Exception as e:  # ParseError, a missing <name>, a non-VOC root element ...
            reason = (str(e).splitlines() or [""])[0]
            raise DataError(
                f"cannot read {self.title} annotation {path} ({type(e).__name__}: {reason})"
            ) from None

    def __repr__(self) -> str:
        return f"VOC2007(root={self.root!r}, download={self.download!r})"


class COCO2014(_OnDisk):
    """MS-COCO 2014: 80 object classes; train2014 (82,783 images) is the train split and
    val2014 (40,504) the test split, as in the multi-label recognition papers.

    Reads root/coco/train2014/*.jpg with root/coco/annotations/instances_train2014.json, and
    root/coco/val2014/*.jpg with instances_val2014.json. Classes are the JSON's categories in
    category-id order, with its names ("traffic light", ...); an image's classes are the
    categories of its instance annotations (crowd regions included). About 1% of the images have
    no annotation and are left out. Each JSON is parsed once, on first use (train2014's is
    330 MB: seconds and a few GB of memory, once).

    Args:
        root: Folder holding coco/.
    """

    name = "coco2014"
    title = "MS-COCO 2014"
    folder_name = "coco"
    layout = "coco/{train2014,val2014}/*.jpg and coco/annotations/instances_{train,val}2014.json"
    url = "https://cocodataset.org/#download"
    image_sets = {"train": "train2014", "test": "val2014"}

    def __init__(self, root: str = "data"):
        super().__init__(root)
        self._names: list[str] | None = None

    def _how(self) -> str:
        return (
            f"get train2014.zip, val2014.zip and annotations_trainval2014.zip from {self.url} "
            f"and unpack them in {self.folder}"
        )

    @property
    def classnames(self) -> list[str]:
        if self._names is None:
            self._loaded("train")  # the names come with the annotations
        assert self._names is not None
        return list(self._names)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def _read(self, split: str) -> tuple[list[str], np.ndarray]:
        image_set = self.image_sets[split]
        path = self.folder / "annotations" / f"instances_{image_set}.json"
        self._require(path, self.folder / image_set)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            categories = sorted(data["categories"], key=lambda c: int(c["id"]))
            names = [str(c["name"]).replace("_", " ").strip() for c in categories]
            column = {int(c["id"]): j for j, c in enumerate(categories)}
            images = sorted(data["images"], key=lambda im: int(im["id"]))
            row = {int(im["id"]): i for i, im in enumerate(images)}
            refs = [f"{image_set}/{im['file_name']}" for im in images]
            pairs = [(row[a["image_id"]], column[a["category_id"]]) for a in data["annotations"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            reason = (str(e).splitlines() or [""])[0]
            raise DataError(
                f"cannot read {self.title} annotations {path} ({type(e).__name__}: {reason}); "
                f"get them again from {self.url}"
            ) from None
        del data  # the segmentations are most of it
        if self._names is not None and names != self._names:
            raise DataError(
                f"{self.title}: the categories of {path} differ from those of the other split"
            )
        self._names = names
        targets = np.zeros((len(refs), len(names)), dtype=np.uint8)
        if pairs:
            rows, cols = np.array(pairs, dtype=np.int64).T  # (2, A)
            targets[rows, cols] = 1
        return refs, targets


class NUSWIDE(_OnDisk):
    """NUS-WIDE: Flickr images tagged with 81 concepts; the official train (161,789) and test
    (107,859) lists.

    Reads root/nus_wide/Concepts81.txt (one concept a line: the class order),
    ImageList/{TrainImagelist,TestImagelist}.txt (lines such as `actor\\0001_2124494179.jpg`,
    relative to root/nus_wide/Flickr/), and Groundtruth/TrainTestLabels/
    Labels_<concept>_{Train,Test}.txt (one 0/1 a line, aligned with the image list). Public
    copies lack many of the images: listed images that are not on disk are left out and
    counted in the log (each image folder is listed once, no per-file check), as are images
    tagged with none of the 81 concepts.

    Args:
        root: Folder holding nus_wide/.
    """

    name = "nuswide"
    title = "NUS-WIDE"
    folder_name = "nus_wide"
    layout = (
        "nus_wide/{Concepts81.txt,Flickr/<folder>/*.jpg,ImageList/{Train,Test}Imagelist.txt,"
        "Groundtruth/TrainTestLabels/Labels_<concept>_{Train,Test}.txt}"
    )
    url = "https://lms.comp.nus.edu.sg/wp-content/uploads/2019/research/nuswide/NUS-WIDE.html"
    tags = {"train": "Train", "test": "Test"}

    def __init__(self, root: str = "data"):
        super().__init__(root)
        self._concepts: list[str] | None = None

    def _concept_list(self) -> list[str]:
        if self._concepts is None:
            self._require(self.folder, self.folder / "Concepts81.txt")
            self._concepts = self._lines(self.folder / "Concepts81.txt")
        return self._concepts

    @property
    def classnames(self) -> list[str]:
        return [c.replace("_", " ") for c in self._concept_list()]

    @property
    def num_classes(self) -> int:
        return len(self._concept_list())

    def _read(self, split: str) -> tuple[list[str], np.ndarray]:
        tag = self.tags[split]
        self._require(self.folder, self.folder / "Flickr")
        concepts = self._concept_list()
        list_path = self.folder / "ImageList" / f"{tag}Imagelist.txt"
        paths = [_flickr_path(s) for s in self._lines(list_path)]
        targets = np.zeros((len(paths), len(concepts)), dtype=np.uint8)
        for c, concept in enumerate(concepts):
            path = self.folder / "Groundtruth" / "TrainTestLabels" / f"Labels_{concept}_{tag}.txt"
            self._require(path)
            values = path.read_text(encoding="utf-8", errors="replace").split()
            try:
                column = np.array(values, dtype=np.int64)
            except ValueError:
                column = np.array([-1])
            if len(column) != len(paths) or not np.isin(column, (0, 1)).all():
                raise DataError(
                    f"{path}: expected one 0 or 1 per line for the {len(paths)} images of "
                    f"{list_path.name}, got {len(values)} values"
                )
            targets[:, c] = column
        present = _existing(self.folder / "Flickr", paths)
        if not present.all():
            log.warning(
                "%s %s: left out %d of %d listed images not found under %s",
                self.title,
                split,
                int((~present).sum()),
                len(paths),
                self.folder / "Flickr",
            )
        refs = [f"Flickr/{p}" for p, ok in zip(paths, present.tolist(), strict=True) if ok]
        return refs, targets[present]


def _flickr_path(line: str) -> str:
    """A list line ("actor\\0001_2124494179.jpg", or a full Windows path through Flickr\\) as a
    POSIX path relative to Flickr/."""
    path = line.replace("\\", "/")
    cut = path.rfind("Flickr/")
    return path[cut + len("Flickr/") :] if cut >= 0 else path.lstrip("/")


def _existing(folder: Path, paths: Sequence[str]) -> np.ndarray:
    """bool (N,): which of `paths` (relative to folder) are files; each sub-folder is listed
    once rather than every file stat'ed."""
    listed: dict[str, set[str]] = {}
    present = np.zeros(len(paths), dtype=bool)
    for i, p in enumerate(paths):
        sub, _, base = p.rpartition("/")
        if sub not in listed:
            try:
                with os.scandir(folder / sub) as entries:
                    listed[sub] = {e.name for e in entries if e.is_file()}
            except OSError:  # no such folder: none of its images are there
                listed[sub] = set()
        present[i] = base in listed[sub]
    return present


MULTILABEL_DATASETS: tuple[type[MultiLabelSource], ...] = (MultiShapes, VOC2007, COCO2014, NUSWIDE)
"""Every multi-label source of this module."""
