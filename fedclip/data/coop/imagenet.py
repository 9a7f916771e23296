"""ImageNet and its four evaluation-only variants (V2, Sketch, A, R), with CoOp's ImageNet
class names."""

from __future__ import annotations

import os
from pathlib import Path

from fedclip.data.coop.base import (
    _DATASETS_MD,
    _class_folder_items,
    _CoOpDataset,
    _images,
    _Split,
    _subdirs,
)
from fedclip.data.files import missing
from fedclip.errors import DataError


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
