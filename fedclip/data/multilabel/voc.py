"""PASCAL VOC 2007, read from its published layout (or downloaded by torchvision)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torchvision

from fedclip.data.files import missing
from fedclip.data.multilabel.base import _OnDisk
from fedclip.errors import DataError

try:  # what torchvision's VOC reader uses too: hardened against hostile XML when installed
    from defusedxml.ElementTree import parse as _parse_xml
except ImportError:
    from xml.etree.ElementTree import parse as _parse_xml


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
