"""NUS-WIDE, read from its published layout (images missing from public copies are skipped)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedclip.data.multilabel.base import _OnDisk
from fedclip.errors import DataError

log = logging.getLogger(__name__)


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
            values = " ".join(self._lines(path)).split()
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
