"""The partitioner contract (`Partitioner`): what every partitioner takes and returns."""

from __future__ import annotations

import abc
from typing import ClassVar

import numpy as np

from fedclip.data.args import integer
from fedclip.data.partition.checks import _check_domains, _check_labels
from fedclip.data.partition.summary import split_like
from fedclip.errors import ConfigError


class Partitioner(abc.ABC):
    """Splits sample indices among clients from the labels (and, if it needs them, the domains).

    Contract: `partitioner(labels, num_clients, seed, domains=None)` takes labels, a 1-D integer
    array (N,) of values >= 0, and returns `num_clients` int64 arrays of indices into labels,
    each sorted ascending, pairwise disjoint. Whether they cover all N samples depends on the
    subclass (its docstring says). `domains`, when given, is the int64 domain id (N,) of every
    sample (`DatasetSource.domains("train")`); partitioners with `needs_domains` refuse to run
    without it, the others ignore it. The result depends only on (constructor arguments, labels,
    num_clients, seed, domains). Bad arguments raise `ConfigError` naming the argument:
    constructor arguments when the partitioner is built, `num_clients` and infeasible
    combinations with the labels before anything is drawn; bad labels or domain ids are a
    `DataError`.

    `split_test(...)` gives each client its test indices (by default with its train label
    distribution, `split_like`), and `domain_of_clients(domains, num_clients)` says which
    domain each client belongs to (None: clients are not tied to one domain).

    Subclasses implement `_split` (and `_check` for feasibility); they never touch global RNG
    state, drawing only from the generator they are given.
    """

    needs_domains: ClassVar[bool] = False

    def __call__(
        self, labels: np.ndarray, num_clients: int, seed: int, domains: np.ndarray | None = None
    ) -> list[np.ndarray]:
        labels = _check_labels(labels)
        num_clients = integer(type(self).__name__, "num_clients", num_clients, minimum=1)
        if domains is not None:
            domains = _check_domains(domains, len(labels))
        elif self.needs_domains:
            raise ConfigError(
                f"{type(self).__name__} needs the domain of every sample (domains=...): use a "
                "multi-domain data set (DomainNet, PACS, OfficeHome, ...)"
            )
        self._check(labels, num_clients, domains)
        rng = np.random.default_rng(seed)
        parts = self._split(labels, num_clients, rng, domains)
        assert len(parts) == num_clients, f"{type(self).__name__} returned {len(parts)} parts"
        return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]

    def split_test(
        self,
        train_parts: list[np.ndarray],
        train_labels: np.ndarray,
        test_labels: np.ndarray,
        seed: int,
        train_domains: np.ndarray | None = None,
        test_domains: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """Each client's test indices (sorted int64 arrays, pairwise disjoint), given the train
        partition this partitioner made. The default ignores the domains and gives every client
        its train label distribution (`split_like`)."""
        return split_like(train_parts, train_labels, test_labels, seed)

    def domain_of_clients(self, domains: np.ndarray, num_clients: int) -> list[int] | None:
        """The domain id each client trains on, computed from the training samples' `domains`
        alone (no drawing); None (the default) when clients are not tied to one domain."""
        return None

    def bind(self, source) -> Partitioner:
        """This partitioner completed from the data set it will split (e.g. its class groups);
        the default needs nothing and returns itself."""
        return self

    def _check(  # noqa: B027 (optional hook)
        self, labels: np.ndarray, num_clients: int, domains: np.ndarray | None
    ) -> None:
        """Raise `ConfigError` if this partitioner cannot split `labels` among `num_clients`."""

    @abc.abstractmethod
    def _split(
        self,
        labels: np.ndarray,
        num_clients: int,
        rng: np.random.Generator,
        domains: np.ndarray | None,
    ) -> list[np.ndarray]:
        """The partition itself, on validated inputs; draws only from `rng`."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"
