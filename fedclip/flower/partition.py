"""SiteData: every client keeps all of the data it loads (sites that bring their own data)."""

from __future__ import annotations

import numpy as np

from fedclip.data.partition import Partitioner


class SiteData(Partitioner):
    """Every client holds every training and test sample of the data set it loads.

    Deliberately not a partition (the parts are identical, not disjoint): it is meant for
    Flower deployments in which each site's SuperNode points `data-root` at that site's own
    data, so "the data set it loads" differs from node to node. Run in one process (or in a
    simulation where every node loads the same files), every client trains on the same data.
    """

    def _split(
        self,
        labels: np.ndarray,
        num_clients: int,
        rng: np.random.Generator,
        domains: np.ndarray | None,
    ) -> list[np.ndarray]:
        everything = np.arange(len(labels), dtype=np.int64)
        return [everything.copy() for _ in range(num_clients)]

    def split_test(
        self,
        train_parts: list[np.ndarray],
        train_labels: np.ndarray,
        test_labels: np.ndarray,
        seed: int,
        train_domains: np.ndarray | None = None,
        test_domains: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        everything = np.arange(len(test_labels), dtype=np.int64)
        return [everything.copy() for _ in train_parts]
