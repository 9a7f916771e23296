"""MS-COCO 2014, read from its published layout."""

from __future__ import annotations

import json

import numpy as np

from fedclip.data.multilabel.base import _OnDisk
from fedclip.errors import DataError


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
