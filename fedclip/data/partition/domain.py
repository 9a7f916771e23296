"""Domain partitioners: every client holds one domain (`ByDomain`, `DomainDirichlet`), or
all but a held-out one (`LeaveOneDomainOut`)."""

from __future__ import annotations

import copy

import numpy as np

from fedclip.data.args import integer, positive
from fedclip.data.partition.base import Partitioner
from fedclip.data.partition.checks import _check_domains, _check_labels, _check_parts
from fedclip.data.partition.label import IID, Dirichlet
from fedclip.data.partition.summary import split_like
from fedclip.errors import ConfigError, DataError, FedclipError


class ByDomain(Partitioner):
    """Clients grouped by domain: every client holds samples of one domain only.

    The domains are the distinct ids in `domains`, ascending: d_0 < d_1 < ... Clients 0 to
    m-1 belong to d_0, clients m to 2m-1 to d_1 and so on (m = clients_per_domain), so
    num_clients must be (number of domains) x m. Inside each domain, `inner` divides that
    domain's samples among its m clients (with its own feasibility checks, per domain). Covers
    all samples when `inner` does (IID, Dirichlet).

    `split_test` gives each client test samples of its own domain only: each domain's test
    samples are divided among that domain's clients by `split_like` (following their train
    label distributions); test samples of domains without clients are unassigned.
    `domain_of_clients(domains, num_clients)` is the list [d_0] * m + [d_1] * m + ..., a pure
    function of the domain ids, so client k's domain name is
    `source.domain_names[partitioner.domain_of_clients(train_domains, K)[k]]`.

    Args:
        clients_per_domain: Clients of every domain, >= 1.
        inner: How a domain's samples are divided among its clients; None means IID.
    """

    needs_domains = True

    def __init__(self, clients_per_domain: int = 1, inner: Partitioner | None = None):
        name = type(self).__name__
        self.clients_per_domain = integer(name, "clients_per_domain", clients_per_domain, 1)
        if inner is not None and not isinstance(inner, Partitioner):
            raise ConfigError(f"{name}: inner must be a Partitioner or None, got {inner!r}")
        self.inner = IID() if inner is None else inner

    def bind(self, source) -> ByDomain:
        inner = self.inner.bind(source)
        if inner is self.inner:
            return self
        bound = copy.copy(self)
        bound.inner = inner
        return bound

    def _client_domains(self, domains: np.ndarray) -> np.ndarray:
        """The domain ids that get clients, ascending."""
        return np.unique(domains)

    def domain_of_clients(self, domains: np.ndarray, num_clients: int) -> list[int]:
        domains = _check_domains(domains, len(np.asarray(domains)))
        used = self._client_domains(domains)
        m = self.clients_per_domain
        if num_clients != len(used) * m:
            raise ConfigError(
                f"{type(self).__name__}: num_clients={num_clients} must equal the "
                f"{len(used)} domains x clients_per_domain={m} = {len(used) * m}"
            )
        return [int(d) for d in np.repeat(used, m)]

    def _check(self, labels: np.ndarray, num_clients: int, domains: np.ndarray | None) -> None:
        if domains is None:  # reached through a wrapper such as FewShot
            raise ConfigError(
                f"{type(self).__name__} needs the domain of every sample (domains=...)"
            )
        self.domain_of_clients(domains, num_clients)  # checks num_clients
        for d in self._client_domains(domains):
            idx = np.flatnonzero(domains == d)
            try:
                self.inner._check(labels[idx], self.clients_per_domain, domains[idx])
            except ValueError as e:  # an inner `_check` says it is infeasible: a user error
                error = type(e) if isinstance(e, FedclipError) else ConfigError
                raise error(f"{type(self).__name__}: in domain {d}: {e}") from None

    def _split(
        self,
        labels: np.ndarray,
        num_clients: int,
        rng: np.random.Generator,
        domains: np.ndarray | None,
    ) -> list[np.ndarray]:
        parts = []
        for d in self._client_domains(domains):
            idx = np.flatnonzero(domains == d)
            inner = self.inner._split(labels[idx], self.clients_per_domain, rng, domains[idx])
            parts += [idx[np.asarray(p, dtype=np.int64)] for p in inner]
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
        """Each client's test samples: of its own domain, with its train label distribution."""
        train_labels = _check_labels(train_labels)
        test_labels = _check_labels(test_labels)
        if train_domains is None or test_domains is None:
            raise ValueError(
                f"{type(self).__name__}.split_test needs train_domains and test_domains"
            )
        train_domains = _check_domains(train_domains, len(train_labels))
        test_domains = _check_domains(test_domains, len(test_labels))
        train_parts = _check_parts(train_parts, len(train_labels), "train_parts")
        owner = self.domain_of_clients(train_domains, len(train_parts))
        for k, (p, d) in enumerate(zip(train_parts, owner, strict=True)):
            if np.any(train_domains[p] != d):
                raise ValueError(f"train_parts[{k}] holds samples of other domains than {d}")
        parts = [np.empty(0, np.int64) for _ in train_parts]
        for d in np.unique(owner):
            ks = [k for k, o in enumerate(owner) if o == d]
            idx = np.flatnonzero(test_domains == d)
            shares = split_like([train_parts[k] for k in ks], train_labels, test_labels[idx], seed)
            for k, share in zip(ks, shares, strict=True):
                parts[k] = idx[share]
        return parts


class DomainDirichlet(ByDomain):
    """Several clients per domain with label skew inside each (pFedMoAP's DomainNet and
    Office-Caltech10 setting): `ByDomain(clients_per_domain, Dirichlet(alpha, min_size))`.

    Clients 0 to m-1 hold domain d_0 and so on (see `ByDomain`); inside a domain, each class's
    samples are divided among its m clients by proportions drawn from Dir(alpha). Covers all
    samples; test samples follow each client's domain and train label distribution.

    Args:
        alpha: Concentration of the Dirichlet, > 0; small means strong label skew.
        clients_per_domain: Clients of every domain, >= 1.
        min_size: Fewest training samples any client may end up with.
    """

    def __init__(self, alpha: float = 0.5, clients_per_domain: int = 2, min_size: int = 2):
        alpha = positive("DomainDirichlet", "alpha", alpha)
        min_size = integer("DomainDirichlet", "min_size", min_size, minimum=0)
        super().__init__(clients_per_domain, Dirichlet(alpha, min_size))
        self.alpha = alpha
        self.min_size = min_size

    def __repr__(self) -> str:
        return (
            f"DomainDirichlet(alpha={self.alpha!r}, clients_per_domain="
            f"{self.clients_per_domain!r}, min_size={self.min_size!r})"
        )


class LeaveOneDomainOut(ByDomain):
    """Domain generalisation: train on every domain but one, test all clients on that one.

    The clients are those of `ByDomain(clients_per_domain, inner)` over the other domains
    (clients 0 to m-1 hold the first of them, and so on; num_clients must be (number of
    domains - 1) x m); the held-out domain's training samples are unused, so this does not
    cover. `split_test` gives every client an even, seeded, disjoint share of the held-out
    domain's test samples, stratified by class (sizes and per-class counts differ by at most
    one), and nothing else: the shares cover the held-out test samples exactly once, so the
    accuracy pooled over clients is the held-out domain's accuracy. `domain_of_clients` gives
    each client's training domain.

    Args:
        held_out: The unseen domain: its name (resolved by `bind(source)` through the data
            set's `domain_names`) or its domain id.
        clients_per_domain: Clients of every training domain, >= 1.
        inner: How a domain's samples are divided among its clients; None means IID.
    """

    def __init__(
        self,
        held_out: str | int = 0,
        clients_per_domain: int = 1,
        inner: Partitioner | None = None,
    ):
        if isinstance(held_out, bool) or not isinstance(held_out, (str, int)):
            raise ConfigError(
                f"LeaveOneDomainOut: held_out must be a domain name or id, got {held_out!r}"
            )
        if isinstance(held_out, int) and held_out < 0:
            raise ConfigError(f"LeaveOneDomainOut: held_out must be >= 0, got {held_out}")
        if isinstance(held_out, str) and not held_out:
            raise ConfigError("LeaveOneDomainOut: held_out must not be empty")
        super().__init__(clients_per_domain, inner)
        self.held_out = held_out

    def bind(self, source) -> LeaveOneDomainOut:
        """Resolves a held-out domain name (or checks a domain id) against the data set's
        `domain_names`."""
        names = getattr(source, "domain_names", None)
        if names is None:
            raise ConfigError(
                f"LeaveOneDomainOut: data set {type(source).__name__} has no domains; use a "
                "multi-domain data set (DomainNet, PACS, OfficeHome, ...)"
            )
        names = list(names)
        if isinstance(self.held_out, str):
            if self.held_out not in names:
                raise ConfigError(
                    f"LeaveOneDomainOut: held_out={self.held_out!r} is not a domain of "
                    f"{type(source).__name__}; its domains are {', '.join(names)}"
                )
            held_out = names.index(self.held_out)
        else:
            if self.held_out >= len(names):
                raise ConfigError(
                    f"LeaveOneDomainOut: held_out={self.held_out} but {type(source).__name__} "
                    f"has {len(names)} domains ({', '.join(names)})"
                )
            held_out = self.held_out
        bound = copy.copy(super().bind(source))
        bound.held_out = held_out
        return bound

    def _held_out(self) -> int:
        if isinstance(self.held_out, str):
            raise ValueError(
                f"LeaveOneDomainOut: held_out={self.held_out!r} is a domain name; bind the "
                "partitioner to the data set first (partitioner.bind(source))"
            )
        return self.held_out

    def _client_domains(self, domains: np.ndarray) -> np.ndarray:
        return np.setdiff1d(np.unique(domains), [self._held_out()])

    def _check(self, labels: np.ndarray, num_clients: int, domains: np.ndarray | None) -> None:
        if domains is not None:
            present = np.unique(domains)
            h = self._held_out()
            if h not in present:
                raise ConfigError(
                    f"LeaveOneDomainOut: held_out={h} is not among the domains present "
                    f"{present.tolist()}"
                )
            if len(present) < 2:
                raise ConfigError("LeaveOneDomainOut: needs at least two domains, got one")
        super()._check(labels, num_clients, domains)

    def split_test(
        self,
        train_parts: list[np.ndarray],
        train_labels: np.ndarray,
        test_labels: np.ndarray,
        seed: int,
        train_domains: np.ndarray | None = None,
        test_domains: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """Every client: an even, class-stratified share of the held-out domain's test set."""
        test_labels = _check_labels(test_labels)
        if test_domains is None:
            raise ValueError("LeaveOneDomainOut.split_test needs test_domains")
        test_domains = _check_domains(test_domains, len(test_labels))
        num_clients = len(train_parts)
        if num_clients < 1:
            raise ValueError("LeaveOneDomainOut.split_test: train_parts is empty")
        h = self._held_out()
        idx = np.flatnonzero(test_domains == h)
        if len(idx) == 0:
            raise DataError(f"LeaveOneDomainOut: the held-out domain {h} has no test samples")
        rng = np.random.default_rng(seed)
        order = idx[rng.permutation(len(idx))]
        order = order[np.argsort(test_labels[order], kind="stable")]  # shuffled, by class
        return [np.sort(order[k::num_clients]) for k in range(num_clients)]
