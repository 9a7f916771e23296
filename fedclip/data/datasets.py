"""Classification data sets with a train and a test split.

Every source exposes the same small interface (`DatasetSource`): readable class names for the
text prompts, cheap integer labels for the partitioners (no image decoding), and a
torch `Dataset` of (image, label) pairs for training. Sources are picked in YAML with
`class_path`, so each constructor's arguments are the config keys and its docstring is the help.

- `Shapes`: procedurally drawn coloured shapes; always available, used by the offline quickstart
  and the tests.
- `CIFAR10`, `CIFAR100`: through torchvision, from the published python-pickle batches.
"""

from __future__ import annotations

import abc
import os
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw

from fedclip.data.args import integer
from fedclip.errors import ConfigError, DataError

SPLITS = ("train", "test")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class DatasetSource(abc.ABC):
    """A classification data set with a train and a test split.

    Contract, the same for every source so the federation never asks which one it has:
    - `classnames[c]` is the readable name of label c (spaces, not underscores).
    - `labels(split)` is an int64 array (N,) and must not decode images: partitioners call it.
    - `dataset(split, transform)[i]` is `(transform(PIL image), int label)` (the PIL image itself
      when transform is None), with `labels(split)[i]` as its label.
    - `key(split)` changes whenever the content of the split does; feature caches key on it.
    - `check()` raises `DataError` now, with a one-line fix, if the data is missing.
    """

    name: str
    multilabel: bool = False

    @property
    @abc.abstractmethod
    def classnames(self) -> list[str]:
        """Readable class names, index = label."""

    @abc.abstractmethod
    def labels(self, split: str) -> np.ndarray:
        """int64 labels (N,) of `split` ("train" or "test"), without decoding any image."""

    @abc.abstractmethod
    def dataset(self, split: str, transform: Callable | None) -> torch.utils.data.Dataset:
        """Item i -> (transform(PIL image) or the PIL image if transform is None, int label)."""

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def class_groups(self) -> list[int] | None:
        """Group id of every class (e.g. CIFAR-100's superclasses), or None: no grouping."""
        return None

    @property
    def domain_names(self) -> list[str] | None:
        """Names of the domains (index = domain id) of a multi-domain data set, else None."""
        return None

    def domains(self, split: str) -> np.ndarray | None:
        """int64 domain id (N,) of every sample of `split`, aligned with `labels(split)`, or
        None for a single-domain data set. Must not decode images."""
        return None

    def key(self, split: str) -> str:
        """Stable identity of a split: the name plus every argument that changes its content."""
        _check_split(split)
        return f"{self.name}/{split}"

    def check(self) -> None:
        """Raise `DataError` now if the data is missing, rather than at the first batch."""
        for split in SPLITS:
            self.labels(split)


class IndexedSubset(torch.utils.data.Dataset):
    """Items `indices` of `dataset`, each returned with its index into `dataset`.

    Item j is `(image, label, int(indices[j]))`: the base index lets feature caches key by sample
    whatever client or subset the sample is seen through.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, indices: np.ndarray | list[int]):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {self.indices.shape}")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[Any, int, int]:
        i = int(self.indices[j])
        image, label = self.dataset[i]
        return image, label, i


class _Transformed(torch.utils.data.Dataset):
    """(image, label) pairs of `base` with `transform` applied to the image."""

    def __init__(self, base: torch.utils.data.Dataset, transform: Callable | None):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.base[i]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(label)


# --------------------------------------------------------------------------------------------
# Shapes: the built-in offline data set

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (240, 205, 25),
    "purple": (135, 55, 175),
    "orange": (245, 130, 25),
    "pink": (240, 125, 185),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond")


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    v = np.arange(2 * points)
    radius = np.where(v % 2 == 0, 1.0, inner)
    angle = np.pi * (v / points - 0.5)  # first point straight up
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)  # (2 * points, 2)


def _cross(half_width: float = 0.3) -> np.ndarray:
    w = half_width
    arm = np.array([(-w, -1.0), (w, -1.0), (w, -w)])  # the top arm and the corner after it
    quarter = np.array([[0.0, -1.0], [1.0, 0.0]])  # turns (x, y) into (-y, x)
    return np.concatenate([arm @ np.linalg.matrix_power(quarter, k).T for k in range(4)])  # (12, 2)


# Polygon outlines in units of the shape's radius, centred on the origin, y pointing down.
_OUTLINES: dict[str, np.ndarray] = {
    "square": np.array([(-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)]),
    "triangle": np.array([(0.0, -1.0), (0.866, 0.5), (-0.866, 0.5)]),
    "star": _star(),
    "cross": _cross(),
    "diamond": np.array([(0.0, -1.0), (0.65, 0.0), (0.0, 1.0), (-0.65, 0.0)]),
}


def shapes_combination(c: int) -> tuple[str, str]:
    """(colour, shape) of Shapes class c.

    Class c = q * 8 + r has colour r and shape (r + q) mod 7, so classes 0-7 already differ in
    both colour and shape (red circle, green square, blue triangle, yellow star, purple cross,
    orange ring, pink diamond, black circle, red square, ...) and classes 0-55 are all 8 x 7
    combinations, each exactly once.
    """
    colours = list(COLOURS)
    q, r = divmod(c, len(colours))
    return colours[r], SHAPES[(r + q) % len(SHAPES)]


def draw_shape(colour: str, shape: str, image_size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of a `colour` `shape` on a lightly noisy grey background.

    Size, position, a small rotation and the exact colour come from `rng`.
    """
    s = image_size
    grey = int(rng.integers(185, 236))
    tint = rng.integers(-8, 9, size=3)
    noise = rng.integers(-10, 11, size=(s, s, 3))
    background = np.clip(grey + tint + noise, 0, 255).astype(np.uint8)  # (s, s, 3)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)

    fill = jittered_colour(colour, rng)
    radius = rng.uniform(0.18, 0.32) * s
    cx, cy = rng.uniform(radius, s - radius, size=2)
    paint_shape(draw, shape, (cx - radius, cy - radius, cx + radius, cy + radius), fill, rng)
    return image


def jittered_colour(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """`colour` with each channel moved by up to +-20, from `rng`."""
    base = np.array(COLOURS[colour])
    return tuple(int(v) for v in np.clip(base + rng.integers(-20, 21, size=3), 0, 255))


def paint_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    box: tuple[float, float, float, float],
    fill: tuple[int, int, int],
    rng: np.random.Generator,
) -> None:
    """Draw `shape` filling the square `box` (x0, y0, x1, y1); polygons get a slight tilt."""
    x0, y0, x1, _ = box
    radius = (x1 - x0) / 2
    cx, cy = x0 + radius, box[1] + radius
    if shape == "circle":
        draw.ellipse(list(box), fill=fill)
    elif shape == "ring":
        draw.ellipse(list(box), outline=fill, width=max(1, round(0.35 * radius)))
    else:
        # Only a small tilt: a square turned by 45 degrees would be a diamond.
        a = rng.uniform(-0.25, 0.25)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        points = _OUTLINES[shape] @ rot.T * radius + (cx, cy)  # (V, 2)
        draw.polygon(points.ravel().tolist(), fill=fill)


def check_shapes_args(owner: str, num_classes: int, **counts: int) -> None:
    """`ConfigError` naming the argument unless every count is an integer >= 1 and
    num_classes is 1 to the number of colour-shape classes."""
    for arg, value in {"num_classes": num_classes, **counts}.items():
        integer(owner, arg, value, minimum=1)
    max_classes = len(COLOURS) * len(SHAPES)
    if num_classes > max_classes:
        raise ConfigError(f"{owner}: num_classes must be <= {max_classes}, got {num_classes}")


class _ShapesImages(torch.utils.data.Dataset):
    """(PIL image, label) pairs of one Shapes split; images are drawn on access."""

    def __init__(self, source: Shapes, split: str):
        self.num_classes = source.num_classes
        self.image_size = source.image_size
        self.seed = source.seed
        self.split_id = SPLITS.index(split)
        self.length = len(source.labels(split))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} items")
        label, k = i % self.num_classes, i // self.num_classes
        # Keyed by (class, k) rather than i: a class's images stay the same when num_classes or
        # the number of images per class changes.
        rng = np.random.default_rng((self.seed, self.split_id, label, k))
        return draw_shape(*shapes_combination(label), self.image_size, rng), label


class Shapes(DatasetSource):
    """Coloured shapes on a noisy background, drawn on the fly; needs no files or internet.

    Class c is a colour-and-shape pair such as "red circle" or "blue triangle" (8 colours x 7
    shapes, interleaved so that the first classes differ in both). Each image has its shape at a
    random size and position with a slight tilt and colour jitter, and is deterministic in
    (seed, split, index). Item i of a split has label i mod num_classes.

    Args:
        num_classes: Number of classes, 1 to 56.
        train_per_class: Training images per class.
        test_per_class: Test images per class.
        image_size: Side of the square images in pixels.
        seed: Seed of the drawing; train and test images always differ.
    """

    name = "shapes"

    def __init__(
        self,
        num_classes: int = 10,
        train_per_class: int = 32,
        test_per_class: int = 16,
        image_size: int = 64,
        seed: int = 0,
    ):
        check_shapes_args(
            "Shapes",
            num_classes=num_classes,
            train_per_class=train_per_class,
            test_per_class=test_per_class,
            image_size=image_size,
        )
        self._num_classes = int(num_classes)
        self.train_per_class = int(train_per_class)
        self.test_per_class = int(test_per_class)
        self.image_size = int(image_size)
        self.seed = integer("Shapes", "seed", seed, minimum=0)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def classnames(self) -> list[str]:
        return [" ".join(shapes_combination(c)) for c in range(self._num_classes)]

    def _per_class(self, split: str) -> int:
        _check_split(split)
        return self.train_per_class if split == "train" else self.test_per_class

    @property
    def class_groups(self) -> list[int]:
        """Classes grouped by shape (all the circles, all the squares, ...)."""
        return [SHAPES.index(shapes_combination(c)[1]) for c in range(self._num_classes)]

    def labels(self, split: str) -> np.ndarray:
        n = self._num_classes * self._per_class(split)
        return np.arange(n, dtype=np.int64) % self._num_classes

    def dataset(self, split: str, transform: Callable | None) -> torch.utils.data.Dataset:
        _check_split(split)
        return _Transformed(_ShapesImages(self, split), transform)

    def key(self, split: str) -> str:
        return (
            f"shapes-c{self._num_classes}-n{self._per_class(split)}-px{self.image_size}"
            f"-seed{self.seed}/{split}"
        )


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 through torchvision

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
