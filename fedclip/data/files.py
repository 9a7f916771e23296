"""Shared pieces of the readers of on-disk image data sets: an image-list data set, the
one-line missing-data error, and train/test splits kept next to the data.

A reader turns a data set's published layout into a list of (relative image path, label)
per split plus the class names, and hands the rest to these helpers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fedclip.checkpoint import atomic_path
from fedclip.errors import DataError

log = logging.getLogger(__name__)

Item = tuple[str, int]  # (image path relative to the image folder, label)


class ImageList(torch.utils.data.Dataset):
    """(transform(RGB PIL image), label) for a list of (relative path, label) under `folder`."""

    def __init__(self, folder: str | Path, items: Sequence[Item], transform: Callable | None):
        self.folder = Path(folder)
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        rel, label = self.items[i]
        path = self.folder / rel
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except OSError as e:
            raise DataError(f"cannot read image {path} ({e})") from None
        return (self.transform(image) if self.transform is not None else image), int(label)


def missing(title: str, looked_at: str | Path, how: str) -> DataError:
    """The one-line error of a data set that is not where it was looked for."""
    return DataError(f"{title} not found (looked for {looked_at}); {how}")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON next to `path` first and rename it into place (never a half-written file)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj))


def seeded_split(
    folder: str | Path,
    name: str,
    items: Sequence[Item],
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, list[Item]]:
    """A stratified train/test split of `items`, saved as `folder/name` (JSON) and reused.

    Each class's items are shuffled with `seed` and its first round(test_fraction * n) go to
    test (at least one when the class has two or more items). The file is written once,
    atomically; when the folder is read-only the split is kept in memory (and logged). A
    saved file whose items differ from `items` (the data changed) is rebuilt.
    """
    path = Path(folder) / name
    items = sorted((str(p), int(y)) for p, y in items)
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            split = {k: [(str(p), int(y)) for p, y in saved[k]] for k in ("train", "test")}
            if sorted(split["train"] + split["test"]) == items:
                return split
            log.warning("%s does not match the images on disk; making a new split", path)
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s is unreadable; making a new split", path)
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Item]] = {}
    for it in items:
        by_class.setdefault(it[1], []).append(it)
    split = {"train": [], "test": []}
    for label in sorted(by_class):
        group = by_class[label]
        order = rng.permutation(len(group))
        n_test = round(test_fraction * len(group))
        if len(group) >= 2:
            n_test = min(max(n_test, 1), len(group) - 1)
        else:
            n_test = 0
        split["test"] += [group[j] for j in order[:n_test]]
        split["train"] += [group[j] for j in order[n_test:]]
    try:
        write_json_atomic(path, {k: [list(it) for it in v] for k, v in split.items()})
        log.info("saved a seeded train/test split to %s", path)
    except OSError as e:
        log.warning("could not save the split to %s (%s); keeping it in memory", path, e)
    return split
