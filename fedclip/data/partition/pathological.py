"""Partitioners that restrict what a client holds: a few classes (`Pathological`), a few
shots of each (`FewShot`), or both (`PathologicalFewShot`)."""

from __future__ import annotations

import math

import numpy as np

from fedclip.data.args import flag, integer
from fedclip.data.partition.base import Partitioner
from fedclip.data.partition.label import IID
from fedclip.errors import ConfigError


class Pathological(Partitioner):
    """Each client holds samples of exactly `classes_per_client` classes.

    The classes present are shuffled into an order o_0, o_1, ... and client k takes the
    consecutive classes o_{(k * classes_per_client + j) mod C}, j < classes_per_client. So every
    class has an owner when num_clients * classes_per_client >= C (and then all samples are
    covered), owner counts differ by at most one, and classes are not shared at all when
    num_clients * classes_per_client <= C. A class's shuffled samples are divided disjointly
    among its owners.

    Args:
        classes_per_client: Number of classes each client holds, 1 to the number of classes.
        balanced: Owners of a class get near-equal shares of it (sizes differ by at most one);
            if false, shares are random (proportions from a flat Dirichlet, at least one sample
            each).
        disjoint: Require that no two clients share a class, i.e. num_clients *
            classes_per_client <= C (pFedMoAP's "C/N disjoint classes per client" setting with
            classes_per_client = C // num_clients); classes beyond that product are unused.
    """

    def __init__(self, classes_per_client: int = 2, balanced: bool = True, disjoint: bool = False):
        owner = "Pathological"
        self.classes_per_client = integer(owner, "classes_per_client", classes_per_client, 1)
        self.balanced = flag(owner, "balanced", balanced)
        self.disjoint = flag(owner, "disjoint", disjoint)

    def _check(self, labels: np.ndarray, num_clients: int, domains: np.ndarray | None) -> None:
        classes, counts = np.unique(labels, return_counts=True)
        m, c = self.classes_per_client, len(classes)
        if m > c:
            raise ConfigError(
                f"Pathological: classes_per_client={m} exceeds the {c} classes present"
            )
        if self.disjoint and num_clients * m > c:
            raise ConfigError(
                f"Pathological: disjoint=True needs num_clients x classes_per_client <= {c} "
                f"classes, got {num_clients} x {m}; lower classes_per_client to {c // num_clients}"
                " or use fewer clients"
            )
        owners = math.ceil(num_clients * m / c)
        if counts.min() < owners:
            raise ConfigError(
                f"Pathological: class {classes[counts.argmin()]} has {counts.min()} samples but "
                f"may be shared by {owners} clients (num_clients={num_clients}, "
                f"classes_per_client={m}); use fewer clients or a smaller classes_per_client"
            )

    def _split(
        self,
        labels: np.ndarray,
        num_clients: int,
        rng: np.random.Generator,
        domains: np.ndarray | None,
    ) -> list[np.ndarray]:
        order = rng.permutation(np.unique(labels))
        m, c = self.classes_per_client, len(order)
        owners: dict[int, list[int]] = {}
        for k in range(num_clients):
            for j in range(m):
                owners.setdefault(int(order[(k * m + j) % c]), []).append(k)
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for cls, ks in owners.items():
            idx = rng.permutation(np.flatnonzero(labels == cls))
            if self.balanced:
                shares = np.array_split(idx, len(ks))
            else:
                sizes = 1 + rng.multinomial(len(idx) - len(ks), rng.dirichlet(np.ones(len(ks))))
                shares = np.split(idx, np.cumsum(sizes)[:-1])
            for k, share in zip(ks, shares, strict=True):
                parts[k].append(share)
        return [np.concatenate(p) for p in parts]


class FewShot(Partitioner):
    """At most `shots` samples per class per client, on top of another partition.

    First partitions with `inner`, then keeps a random `shots` samples of every class a client
    holds (all of them if it holds fewer). Disjoint; does not cover, by design. Domains, the
    test split and the clients' domains are the inner partitioner's (so `FewShot(16,
    ByDomain())` is a few-shot split that keeps every client in its domain).

    Args:
        shots: Largest number of samples of one class a client keeps, >= 1.
        inner: The partition to subsample; None means IID.
    """

    def __init__(self, shots: int = 16, inner: Partitioner | None = None):
        self.shots = integer("FewShot", "shots", shots, minimum=1)
        if inner is not None and not isinstance(inner, Partitioner):
            raise ConfigError(f"FewShot: inner must be a Partitioner or None, got {inner!r}")
        self.inner = IID() if inner is None else inner

    @property
    def needs_domains(self) -> bool:  # type: ignore[override]
        return self.inner.needs_domains

    def bind(self, source) -> FewShot:
        inner = self.inner.bind(source)
        return self if inner is self.inner else FewShot(self.shots, inner)

    def split_test(
        self,
        train_parts: list[np.ndarray],
        train_labels: np.ndarray,
        test_labels: np.ndarray,
        seed: int,
        train_domains: np.ndarray | None = None,
        test_domains: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """The inner partitioner's test split (a domain inner keeps clients in their domain)."""
        return self.inner.split_test(
            train_parts, train_labels, test_labels, seed, train_domains, test_domains
        )

    def domain_of_clients(self, domains: np.ndarray, num_clients: int) -> list[int] | None:
        return self.inner.domain_of_clients(domains, num_clients)

    def _check(self, labels: np.ndarray, num_clients: int, domains: np.ndarray | None) -> None:
        self.inner._check(labels, num_clients, domains)

    def _split(
        self,
        labels: np.ndarray,
        num_clients: int,
        rng: np.random.Generator,
        domains: np.ndarray | None,
    ) -> list[np.ndarray]:
        parts = []
        for part in self.inner._split(labels, num_clients, rng, domains):
            part = np.asarray(part, dtype=np.int64)
            kept = []
            for cls in np.unique(labels[part]):
                idx = part[labels[part] == cls]
                if len(idx) > self.shots:
                    idx = rng.choice(idx, self.shots, replace=False)
                kept.append(idx)
            parts.append(np.concatenate(kept) if kept else np.empty(0, np.int64))
        return parts


class PathologicalFewShot(Partitioner):
    """pFedMoAP's CoOp-family setting: disjoint classes per client, few shots of each.

    Each client holds `classes_per_client` classes that no other client holds (None: C //
    num_clients, with C the number of classes present, so the clients split the classes
    evenly and the C mod num_clients left over are unused), and at most `shots` samples of
    each of them. The same as `FewShot(shots, Pathological(classes_per_client,
    disjoint=True))`, with classes_per_client resolved from the labels. Disjoint; does not
    cover, by design.

    Args:
        shots: Largest number of samples of one class a client keeps, >= 1.
        classes_per_client: Classes per client, >= 1; None means C // num_clients.
    """

    def __init__(self, shots: int = 16, classes_per_client: int | None = None):
        owner = "PathologicalFewShot"
        self.shots = integer(owner, "shots", shots, minimum=1)
        self.classes_per_client = (
            None
            if classes_per_client is None
            else integer(owner, "classes_per_client", classes_per_client, minimum=1)
        )

    def _composed(self, labels: np.ndarray, num_clients: int) -> FewShot:
        m = self.classes_per_client
        if m is None:
            c = len(np.unique(labels))
            m = c // num_clients
            if m < 1:
                raise ConfigError(
                    f"PathologicalFewShot: num_clients={num_clients} exceeds the {c} classes "
                    "present, so clients cannot each hold a class of their own; use fewer clients"
                )
        return FewShot(self.shots, Pathological(m, disjoint=True))

    def _check(self, labels: np.ndarray, num_clients: int, domains: np.ndarray | None) -> None:
        self._composed(labels, num_clients)._check(labels, num_clients, domains)

    def _split(
        self,
        labels: np.ndarray,
        num_clients: int,
        rng: np.random.Generator,
        domains: np.ndarray | None,
    ) -> list[np.ndarray]:
        return self._composed(labels, num_clients)._split(labels, num_clients, rng, domains)
