"""MultiDataset: several single-label data sets as one source (FedTPG's and FedMVP's
federations over several data sets).

Classes are concatenated in the order of `datasets`; every class remembers its data set
(`class_dataset`), and labels are offset per data set (`offsets`), so a class is identified
by its id, never by its name: two data sets may share a class name, and the name the text
side reads stays the bare one ("red circle", not "shapes/red circle").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from fedclip.data.source import SPLITS, DatasetSource, _check_split
from fedclip.errors import ConfigError, DataError


def member_labels(sources: list[DatasetSource], names: list[str] | None = None) -> list[str]:
    """One distinct label per member: `names`, or each source's name, a repeated name
    numbered by occurrence ("shapes1", "shapes2")."""
    if names is not None:
        return list(names)
    raw = [str(getattr(s, "name", type(s).__name__.lower())) for s in sources]
    seen: dict[str, int] = {}
    out = []
    for name in raw:
        seen[name] = seen.get(name, 0) + 1
        out.append(f"{name}{seen[name]}" if raw.count(name) > 1 else name)
    return out


class _Offset(torch.utils.data.Dataset):
    """Items of the members' datasets one after another, labels offset per member."""

    def __init__(self, parts: list[torch.utils.data.Dataset], offsets: list[int]) -> None:
        self.parts, self.offsets = parts, offsets
        self.ends = np.cumsum([len(p) for p in parts])  # type: ignore[arg-type]

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        d = int(np.searchsorted(self.ends, i, side="right"))
        start = int(self.ends[d - 1]) if d else 0
        image, label = self.parts[d][i - start]
        return image, int(label) + self.offsets[d]


class MultiDataset(DatasetSource):
    """Several single-label data sets federated together: the classes of all of them, each
    remembering its data set; the train and test splits are the members' one after another.

    Pair it with `fedclip.data.ClassChunks` (each data set's classes cut into chunks, one
    client per chunk) for FedTPG's setting. Under `data.base_to_novel` the base classes are
    the first ceil(C_d / 2) of EACH data set, and base and novel accuracy are computed per
    data set among that data set's classes, then averaged over data sets.

    Args:
        datasets: the member data sets (class_path + init_args each), at least one,
            single-label only.
        names: a label per member for the logs (eval/base/<name>, the partition table);
            null: each data set's name, a repeated one numbered ("shapes1", "shapes2").
    """

    multilabel = False

    def __init__(self, datasets: list[DatasetSource], names: list[str] | None = None) -> None:
        if not isinstance(datasets, list | tuple) or not datasets:
            raise ConfigError("MultiDataset: datasets must list at least one data set")
        for i, source in enumerate(datasets):
            if not isinstance(source, DatasetSource):
                raise ConfigError(f"MultiDataset: datasets[{i}] is not a data set: {source!r}")
            if getattr(source, "multilabel", False):
                raise ConfigError(
                    f"MultiDataset: datasets[{i}] ({type(source).__name__}) is multi-label; "
                    "MultiDataset holds single-label data sets only"
                )
        if names is not None and (
            len(names) != len(datasets) or len(set(map(str, names))) != len(names)
        ):
            raise ConfigError(
                f"MultiDataset: names must be {len(datasets)} distinct labels, one per data "
                f"set, got {names!r}"
            )
        self.sources = list(datasets)
        self.names = member_labels(self.sources, names)
        self.name = "multi"
        self._classes: tuple[list[str], list[int], list[int]] | None = None

    def _named(self, d: int, error: DataError) -> DataError:
        root = getattr(self.sources[d], "root", None)
        where = f", root {root}" if root is not None else ""
        return DataError(f"MultiDataset: datasets[{d}] ({self.names[d]}{where}): {error}")

    def _layout(self) -> tuple[list[str], list[int], list[int]]:
        if self._classes is None:
            names, owner, offsets = [], [], []
            for d, source in enumerate(self.sources):
                offsets.append(len(names))
                try:
                    member = list(source.classnames)
                except DataError as e:
                    raise self._named(d, e) from e
                names += member
                owner += [d] * len(member)
            self._classes = (names, owner, offsets)
        return self._classes

    @property
    def classnames(self) -> list[str]:
        return list(self._layout()[0])

    @property
    def class_dataset(self) -> list[int]:
        """The member index of every class (index = label)."""
        return list(self._layout()[1])

    @property
    def offsets(self) -> list[int]:
        """The label of each member's class 0."""
        return list(self._layout()[2])

    def labels(self, split: str) -> np.ndarray:
        _check_split(split)
        offsets = self.offsets
        parts = [
            np.asarray(s.labels(split), dtype=np.int64) + offsets[d]
            for d, s in enumerate(self.sources)
        ]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def dataset(self, split: str, transform: Callable | None) -> torch.utils.data.Dataset:
        _check_split(split)
        return _Offset([s.dataset(split, transform) for s in self.sources], self.offsets)

    def key(self, split: str) -> str:
        _check_split(split)
        return "multi[" + ",".join(s.key(split) for s in self.sources) + "]"

    def check(self) -> None:
        """Every member's data, naming the member (and its root) that is missing."""
        for d, source in enumerate(self.sources):
            try:
                source.check()
            except DataError as e:
                raise self._named(d, e) from e
        for split in SPLITS:
            self.labels(split)


# ---- what FederatedData derives from the data set of every class -----------------------------
def base_classes(class_dataset: np.ndarray, base_to_novel: bool) -> np.ndarray:
    """(C,) bool: the training classes, all of them, or under base-to-novel the first
    ceil(C_d / 2) classes (in id order) of each data set d."""
    is_base = np.ones(len(class_dataset), dtype=bool)
    if not base_to_novel:
        return is_base
    if len(class_dataset) < 2:
        raise ConfigError("data.base_to_novel needs at least 2 classes")
    for d in np.unique(class_dataset):
        mine = np.flatnonzero(class_dataset == d)
        if len(mine) < 2:
            raise ConfigError("data.base_to_novel needs at least 2 classes in every data set")
        is_base[mine[math.ceil(len(mine) / 2) :]] = False
    return is_base


def dataset_shares(data, seed: int) -> dict[str, list[np.ndarray]]:
    """The global protocol's splits over several data sets: per data set d, an even,
    seeded share per client of d's base and novel test images ('base/<d>', 'novel/<d>')
    under base-to-novel, else of all its test images ('global/<d>')."""
    labels = data.test_labels
    owner = data.class_dataset[labels]
    base = data.is_base[labels]
    kinds = (("base", True), ("novel", False)) if data.cfg.base_to_novel else (("global", None),)
    parts = {}
    for d, name in enumerate(data.dataset_names):
        for j, (kind, want) in enumerate(kinds):
            mask = (owner == d) if want is None else (owner == d) & (base == want)
            rng = np.random.default_rng([seed, 4, d, j])
            shares = np.array_split(rng.permutation(np.flatnonzero(mask)), data.cfg.num_clients)
            parts[f"{kind}/{name}"] = [np.sort(p) for p in shares]
    return parts


def resolve_num_clients(cfg) -> None:
    """Set `data.num_clients` (a DataConfig) when it is null from the partitioner that
    decides it (`count_clients`, e.g. ClassChunks); a different number given for such a
    partitioner, or null for another one, is a one-line ConfigError."""
    counter = getattr(cfg.partitioner, "count_clients", None)
    if counter is None:
        if cfg.num_clients is None:
            raise ConfigError(
                f"data.num_clients is null, but {type(cfg.partitioner).__name__} does not "
                "decide the number of clients (fedclip.data.ClassChunks does): give a number"
            )
        return
    made = counter(cfg.dataset, bool(cfg.base_to_novel))
    if cfg.num_clients is None:
        cfg.num_clients = made
    elif cfg.num_clients != made:
        raise ConfigError(
            f"data.num_clients={cfg.num_clients}, but {cfg.partitioner!r} makes {made} clients "
            "of these data sets; set data.num_clients: null (as many as it makes)"
        )
