"""Data sets and partitioners: where each simulated client's samples come from."""

from fedclip.data.datasets import (
    CIFAR10,
    CIFAR100,
    DataError,
    DatasetSource,
    IndexedSubset,
    Shapes,
)
from fedclip.data.partition import (
    IID,
    Dirichlet,
    FewShot,
    Partitioner,
    Pathological,
    TwoLevelDirichlet,
    partition_summary,
    split_like,
)

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "DataError",
    "DatasetSource",
    "IndexedSubset",
    "Shapes",
    "IID",
    "Dirichlet",
    "FewShot",
    "Partitioner",
    "Pathological",
    "TwoLevelDirichlet",
    "partition_summary",
    "split_like",
]
