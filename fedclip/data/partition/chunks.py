"""ClassChunks: each data set's classes cut into consecutive chunks, one client per chunk
(FedTPG's clients, federated/server.py `init_server`)."""

from __future__ import annotations

import math

import numpy as np

from fedclip.data.args import integer
from fedclip.data.partition.base import Partitioner
from fedclip.errors import ConfigError


def chunk_classes(classes: list[int], classes_per_client: int) -> list[list[int]]:
    """FedTPG's rule for one data set's (ascending) classes: round(m / classes_per_client)
    clients (Python's round, halves to even as numpy's `around`; at least one), client i
    takes classes [i * cpc, (i + 1) * cpc) and the last one takes the rest, so the last
    chunk holds between cpc / 2 and 1.5 cpc classes (m=50, cpc=20: 20 + 30; m=51: 20+20+11;
    m=5: one client of 5)."""
    m, cpc = len(classes), classes_per_client
    if m == 0:
        return []
    n = max(1, round(m / cpc))
    return [classes[i * cpc : (i + 1) * cpc] for i in range(n - 1)] + [classes[(n - 1) * cpc :]]


def dataset_classes(class_dataset: list[int] | None, classes: np.ndarray) -> list[list[int]]:
    """`classes` (ids) grouped by data set (member order), ascending in each group."""
    classes = np.unique(classes)
    if class_dataset is None:
        return [classes.tolist()] if len(classes) else []
    owner = np.asarray(class_dataset)[classes]
    return [classes[owner == d].tolist() for d in np.unique(owner)]


class ClassChunks(Partitioner):
    """Each data set's classes (its base classes under `data.base_to_novel`: the first
    ceil(C_d / 2) of each) cut into consecutive chunks of `classes_per_client`, one client
    per chunk, as FedTPG does: round(C_d / classes_per_client) clients per data set (at
    least one), the last taking the rest (see `chunk_classes`). A client holds `shots`
    training samples of each of its classes, drawn seeded (all of them if null or if the
    class has fewer), trains and is evaluated over ITS OWN class list (its local accuracy
    is classes_per_client-way), and its test split is every test image of its classes.
    Classes of different data sets never share a client. The number of clients follows
    from the data: set `data.num_clients: null` (a different number is refused).

    Args:
        classes_per_client: classes per chunk, >= 1 (FedTPG: 20).
        shots: training samples per class, >= 1; null: all of them (FedTPG: 8).
    """

    def __init__(self, classes_per_client: int = 20, shots: int | None = 8):
        self.classes_per_client = integer(
            "ClassChunks", "classes_per_client", classes_per_client, 1
        )
        self.shots = None if shots is None else integer("ClassChunks", "shots", shots, minimum=1)
        self.class_dataset: list[int] | None = None  # set by `bind`

    def bind(self, source) -> ClassChunks:
        """This partitioner knowing the data set of every class (a MultiDataset's)."""
        bound = ClassChunks(self.classes_per_client, self.shots)
        owner = getattr(source, "class_dataset", None)
        bound.class_dataset = None if owner is None else list(owner)
        return bound

    def plan(self, labels: np.ndarray) -> list[list[int]]:
        """Every client's classes (ids, ascending), data set after data set."""
        return [
            chunk
            for group in dataset_classes(self.class_dataset, labels)
            for chunk in chunk_classes(group, self.classes_per_client)
        ]

    def count_clients(self, source, base_to_novel: bool) -> int:
        """The number of clients this partitioner makes of `source` (its class lists alone:
        no label is read)."""
        bound = self.bind(source)
        owner = bound.class_dataset or [0] * len(source.classnames)
        classes: list[int] = []
        for d in sorted(set(owner)):
            members = [c for c, o in enumerate(owner) if o == d]
            classes += members[: math.ceil(len(members) / 2)] if base_to_novel else members
        return len(bound.plan(np.asarray(classes, dtype=np.int64)))

    def client_classes(self, labels: np.ndarray, num_clients: int) -> list[list[int]]:
        """Client k's class list (what it trains and is evaluated on locally)."""
        return self.plan(labels)

    def _check(self, labels: np.ndarray, num_clients: int, domains: np.ndarray | None) -> None:
        made = len(self.plan(labels))
        if made != num_clients:
            raise ConfigError(
                f"data.num_clients={num_clients}, but ClassChunks(classes_per_client="
                f"{self.classes_per_client}) cuts these classes into {made} clients; set "
                "data.num_clients: null (as many clients as the partitioner makes)"
            )

    def _split(
        self,
        labels: np.ndarray,
        num_clients: int,
        rng: np.random.Generator,
        domains: np.ndarray | None,
    ) -> list[np.ndarray]:
        parts = []
        for chunk in self.plan(labels):
            kept = []
            for cls in chunk:
                idx = np.flatnonzero(labels == cls)
                if self.shots is not None and len(idx) > self.shots:
                    idx = rng.choice(idx, self.shots, replace=False)
                kept.append(idx)
            parts.append(np.concatenate(kept))
        return parts

    def split_test(
        self,
        train_parts: list[np.ndarray],
        train_labels: np.ndarray,
        test_labels: np.ndarray,
        seed: int,
        train_domains: np.ndarray | None = None,
        test_domains: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """Every test image of each client's classes (the classes are disjoint)."""
        return [
            np.flatnonzero(np.isin(test_labels, np.unique(train_labels[p]))).astype(np.int64)
            for p in train_parts
        ]

    def __repr__(self) -> str:
        return f"ClassChunks(classes_per_client={self.classes_per_client}, shots={self.shots})"
