"""Partitioners: split a data set's samples among simulated clients.

A partitioner is a pure function of the labels (and the domains, for the domain partitioners),
the number of clients and a seed. It checks its own arguments when constructed, checks
feasibility before drawing anything, and owns its random generator
(`np.random.default_rng(seed)`), so a partition never depends on global RNG state or on what
ran before it. Every partitioner returns disjoint, sorted int64 index arrays, one per client.

- `IID`: shuffle and cut into near-equal parts.
- `Dirichlet`: label skew, per-class client proportions drawn from Dir(alpha).
- `TwoLevelDirichlet`: label skew over class groups, then inside each group (CIFAR-100).
- `Pathological`: each client sees only `classes_per_client` classes.
- `FewShot`: any partition above, then at most `shots` samples per class per client.
- `PathologicalFewShot`: C / num_clients disjoint classes per client, `shots` of each.

Domain shift (the data set gives every sample a domain id, passed as `domains=`):

- `ByDomain`: every client holds one domain, `clients_per_domain` clients per domain, the
  domain's samples divided by an inner partitioner.
- `DomainDirichlet`: `ByDomain` with Dirichlet label skew inside each domain.
- `LeaveOneDomainOut`: clients train on all domains but one and are all tested on that one.

`Partitioner.split_test` gives each client its test samples: by default `split_like`, a test
split with the client's train label distribution; the domain partitioners keep it in the
client's domain (or the held-out one). `partition_summary` counts the labels each client holds.
"""

from __future__ import annotations

import abc
import copy
import math
from typing import ClassVar

import numpy as np


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got {labels.min()}")
    return labels.astype(np.int64, copy=False)


def _check_domains(domains: np.ndarray, n: int) -> np.ndarray:
    domains = np.asarray(domains)
    if domains.shape != (n,):
        raise ValueError(f"domains must be 1-D with one id per sample ({n}), got {domains.shape}")
    if n and not np.issubdtype(domains.dtype, np.integer):
        raise ValueError(f"domains must be integers, got dtype {domains.dtype}")
    if n and domains.min() < 0:
        raise ValueError(f"domains must be >= 0, got {domains.min()}")
    return domains.astype(np.int64, copy=False)


def _check_parts(parts: list[np.ndarray], n: int, what: str) -> list[np.ndarray]:
    out = []
    for k, p in enumerate(parts):
        p = np.asarray(p)
        if p.ndim != 1 or (p.size and not np.issubdtype(p.dtype, np.integer)):
            raise ValueError(f"{what}[{k}] must be a 1-D integer array, got {p.dtype} {p.shape}")
        if p.size and (p.min() < 0 or p.max() >= n):
            raise ValueError(f"{what}[{k}] has indices outside [0, {n})")
        out.append(p.astype(np.int64, copy=False))
    return out


def _largest_remainder(total: int, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integer shares of `total` proportional to `weights`, summing to `total`.

    Each share is the floor of its exact value; the units left over go to the largest fractional
    parts, ties broken at random (not by position, which would favour low client ids).
    """
    exact = total * weights / weights.sum()
    shares = np.floor(exact).astype(np.int64)
    left = total - int(shares.sum())
    order = np.lexsort((rng.random(len(weights)), -(exact - shares)))
    shares[order[:left]] += 1
    return shares


class Partitioner(abc.ABC):
    """Splits sample indices among clients from the labels (and, if it needs them, the domains).

    Contract: `partitioner(labels, num_clients, seed, domains=None)` takes labels, a 1-D integer
    array (N,) of values >= 0, and returns `num_clients` int64 arrays of indices into labels,
    each sorted ascending, pairwise disjoint. Whether they cover all N samples depends on the
    subclass (its docstring says). `domains`, when given, is the int64 domain id (N,) of every
    sample (`DatasetSource.domains("train")`); partitioners with `needs_domains` refuse to run
    without it, the others ignore it. The result depends only on (constructor arguments, labels,
    num_clients, seed, domains). Bad arguments raise ValueError naming the argument: constructor
    arguments when the partitioner is built, infeasible combinations with the labels before
    anything is drawn.

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
        if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
            raise ValueError(f"num_clients must be an integer >= 1, got {num_clients}")
        num_clients = int(num_clients)
        if domains is not None:
            domains = _check_domains(domains, len(labels))
        elif self.needs_domains:
            raise ValueError(
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
        """Raise ValueError if this partitioner cannot split `labels` among `num_clients`."""

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


class IID(Partitioner):
    """Uniformly random split into near-equal parts (sizes differ by at most one).

    Covers all samples. Needs at least one sample per client.
    """

    def _check(self, labels: np.ndarray, num_clients: int, domains: np.ndarray | None) -> None:
        if num_clients > len(labels):
            raise ValueError(
                f"IID: num_clients={num_clients} exceeds the number of samples {len(labels)}"
            )

    def _split(
        self,
        labels: np.ndarray,
        num_clients: int,
        rng: np.random.Generator,
        domains: np.ndarray | None,
    ) -> list[np.ndarray]:
        return np.array_split(rng.permutation(len(labels)), num_clients)


class Dirichlet(Partitioner):
    """Label skew: for each class, client proportions drawn from a symmetric Dirichlet.

    For each class in turn, proportions p ~ Dir(alpha, ..., alpha) over the clients are drawn;
    clients that already hold N / num_clients samples or more get no share of it (this keeps
    client sizes from running away), and the class's shuffled samples are cut by the
    renormalised proportions. The whole draw is repeated until every client has at least
    `min_size` samples. Covers all samples. Small alpha means strong skew; large alpha tends
    to IID.

    Args:
        alpha: Concentration of the Dirichlet, > 0 (0.5 in pFedMoAP's CIFAR experiments).
        min_size: Fewest samples any client may end up with.
        max_tries: Redraws allowed before giving up with an error.
    """

    def __init__(self, alpha: float = 0.5, min_size: int = 10, max_tries: int = 1000):
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"Dirichlet: alpha must be > 0 and finite, got {alpha}")
        if min_size < 0:
            raise ValueError(f"Dirichlet: min_size must be >= 0, got {min_size}")
        if max_tries < 1:
            raise ValueError(f"Dirichlet: max_tries must be >= 1, got {max_tries}")
        self.alpha = float(alpha)
        self.min_size = int(min_size)
        self.max_tries = int(max_tries)

    def _check(self, labels: np.ndarray, num_clients: int, domains: np.ndarray | None) -> None:
        if self.min_size * num_clients > len(labels):
            raise ValueError(
                f"Dirichlet: min_size={self.min_size} x num_clients={num_clients} exceeds the "
                f"number of samples {len(labels)}; lower min_size or use fewer clients"
            )

    def _split(
        self,
        labels: np.ndarray,
        num_clients: int,
        rng: np.random.Generator,
        domains: np.ndarray | None,
    ) -> list[np.ndarray]:
        n = len(labels)
        by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        for _ in range(self.max_tries):
            parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
            sizes = np.zeros(num_clients, dtype=np.int64)
            for idx in by_class:
                p = rng.dirichlet(np.full(num_clients, self.alpha))
                p = p * (sizes < n / num_clients)
                if p.sum() == 0:  # tiny alpha can put all mass on full clients
                    p = (sizes < n / num_clients).astype(float)
                cuts = (np.cumsum(p / p.sum()) * len(idx)).astype(np.int64)[:-1]
                for k, share in enumerate(np.split(rng.permutation(idx), cuts)):
                    parts[k].append(share)
                    sizes[k] += len(share)
            if sizes.min() >= self.min_size:
                return [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
        raise ValueError(
            f"Dirichlet: could not give every one of {num_clients} clients min_size="
            f"{self.min_size} samples in max_tries={self.max_tries} draws (alpha={self.alpha}, "
            f"{n} samples); use a larger alpha, fewer clients or a smaller min_size"
        )


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
        if classes_per_client < 1:
            raise ValueError(
                f"Pathological: classes_per_client must be >= 1, got {classes_per_client}"
            )
        self.classes_per_client = int(classes_per_client)
        self.balanced = bool(balanced)
        self.disjoint = bool(disjoint)

    def _check(self, labels: np.ndarray, num_clients: int, domains: np.ndarray | None) -> None:
        classes, counts = np.unique(labels, return_counts=True)
        m, c = self.classes_per_client, len(classes)
        if m > c:
            raise ValueError(
                f"Pathological: classes_per_client={m} exceeds the {c} classes present"
            )
        if self.disjoint and num_clients * m > c:
            raise ValueError(
                f"Pathological: disjoint=True needs num_clients x classes_per_client <= {c} "
                f"classes, got {num_clients} x {m}; lower classes_per_client to {c // num_clients}"
                " or use fewer clients"
            )
        owners = math.ceil(num_clients * m / c)
        if counts.min() < owners:
            raise ValueError(
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
        if shots < 1:
            raise ValueError(f"FewShot: shots must be >= 1, got {shots}")
        if inner is not None and not isinstance(inner, Partitioner):
            raise TypeError(f"FewShot: inner must be a Partitioner or None, got {inner!r}")
        self.shots = int(shots)
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


class TwoLevelDirichlet(Partitioner):
    """Two-level label skew over class groups (pFedMoAP's CIFAR-100 "labeldir100").

    The classes form groups (CIFAR-100's 20 superclasses of 5 classes each). Every client
    draws group weights w ~ Dir(beta) over the groups and, inside each group g, class
    weights v_g ~ Dir(alpha) over its classes, so a client's label distribution is
    p(c) = w_{g(c)} * v_{g(c)}(c): few superclasses, fairly even classes inside them (the
    Pachinko allocation of Reddi et al., "Adaptive Federated Optimization", ICLR 2021).
    Clients then take N // num_clients samples each (the first N mod num_clients one more),
    in turn, drawn without replacement: when a class runs out, its weight is spread over
    the client's classes that remain, as in the reference. Covers all samples.

    Args:
        beta: concentration over the groups, > 0 (0.5 in pFedMoAP's CIFAR-100 runs).
        alpha: concentration over the classes inside a group, > 0 (10 in the reference).
        groups: group id of every class (index = class label). None takes the data set's own
            grouping (`class_groups`, e.g. CIFAR-100's superclasses).
    """

    def __init__(self, beta: float = 0.5, alpha: float = 10.0, groups: list[int] | None = None):
        for name, value in (("beta", beta), ("alpha", alpha)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"TwoLevelDirichlet: {name} must be > 0 and finite, got {value}")
        if groups is not None and (len(groups) == 0 or min(groups) < 0):
            raise ValueError("TwoLevelDirichlet: groups must be a non-empty list of ids >= 0")
        self.beta = float(beta)
        self.alpha = float(alpha)
        self.groups = None if groups is None else [int(g) for g in groups]

    def bind(self, source) -> TwoLevelDirichlet:
        """Takes the data set's `class_groups` when no groups were given."""
        if self.groups is not None:
            return self
        groups = getattr(source, "class_groups", None)
        if groups is None:
            raise ValueError(
                f"TwoLevelDirichlet: data set {type(source).__name__} has no class groups; "
                "give the group of every class in partitioner.init_args.groups"
            )
        return TwoLevelDirichlet(self.beta, self.alpha, list(groups))

    def _check(self, labels: np.ndarray, num_clients: int, domains: np.ndarray | None) -> None:
        if self.groups is None:
            raise ValueError(
                "TwoLevelDirichlet: no class groups (set groups, or use a data set that has "
                "them, like CIFAR100)"
            )
        if labels.size and labels.max() >= len(self.groups):
            raise ValueError(
                f"TwoLevelDirichlet: groups cover {len(self.groups)} classes but labels go up "
                f"to {labels.max()}"
            )
        if num_clients > len(labels):
            raise ValueError(
                f"TwoLevelDirichlet: num_clients={num_clients} exceeds the number of samples "
                f"{len(labels)}"
            )

    def _split(
        self,
        labels: np.ndarray,
        num_clients: int,
        rng: np.random.Generator,
        domains: np.ndarray | None,
    ) -> list[np.ndarray]:
        num_classes = len(self.groups)
        group_of = np.asarray(self.groups, dtype=np.int64)  # (C,)
        group_ids = np.unique(group_of)
        pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(num_classes)]
        left = np.array([len(p) for p in pools], dtype=np.int64)  # (C,)
        sizes = [len(a) for a in np.array_split(np.arange(len(labels)), num_clients)]
        parts = []
        for need in sizes:
            p = np.zeros(num_classes)
            w = rng.dirichlet(np.full(len(group_ids), self.beta))  # (G,)
            for g, wg in zip(group_ids, w, strict=True):
                members = np.flatnonzero(group_of == g)
                p[members] = wg * rng.dirichlet(np.full(len(members), self.alpha))
            taken: list[int] = []
            while need > 0:
                q = p * (left > 0)
                if q.sum() <= 0:  # all of this client's mass is used up (or underflowed)
                    q = (left > 0).astype(float)
                counts = np.minimum(rng.multinomial(need, q / q.sum()), left)
                for c in np.flatnonzero(counts):
                    n = int(counts[c])
                    taken.extend(pools[c][:n])
                    del pools[c][:n]
                left -= counts
                need -= int(counts.sum())
            parts.append(np.asarray(taken, dtype=np.int64))
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
        if shots < 1:
            raise ValueError(f"PathologicalFewShot: shots must be >= 1, got {shots}")
        if classes_per_client is not None and classes_per_client < 1:
            raise ValueError(
                "PathologicalFewShot: classes_per_client must be >= 1 or None, got "
                f"{classes_per_client}"
            )
        self.shots = int(shots)
        self.classes_per_client = None if classes_per_client is None else int(classes_per_client)

    def _composed(self, labels: np.ndarray, num_clients: int) -> FewShot:
        m = self.classes_per_client
        if m is None:
            c = len(np.unique(labels))
            m = c // num_clients
            if m < 1:
                raise ValueError(
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
        if isinstance(clients_per_domain, bool) or clients_per_domain < 1:
            raise ValueError(f"{name}: clients_per_domain must be >= 1, got {clients_per_domain}")
        if inner is not None and not isinstance(inner, Partitioner):
            raise TypeError(f"{name}: inner must be a Partitioner or None, got {inner!r}")
        self.clients_per_domain = int(clients_per_domain)
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
            raise ValueError(
                f"{type(self).__name__}: num_clients={num_clients} must equal the "
                f"{len(used)} domains x clients_per_domain={m} = {len(used) * m}"
            )
        return [int(d) for d in np.repeat(used, m)]

    def _check(self, labels: np.ndarray, num_clients: int, domains: np.ndarray | None) -> None:
        if domains is None:  # reached through a wrapper such as FewShot
            raise ValueError(
                f"{type(self).__name__} needs the domain of every sample (domains=...)"
            )
        self.domain_of_clients(domains, num_clients)  # checks num_clients
        for d in self._client_domains(domains):
            idx = np.flatnonzero(domains == d)
            try:
                self.inner._check(labels[idx], self.clients_per_domain, domains[idx])
            except ValueError as e:
                raise ValueError(f"{type(self).__name__}: in domain {d}: {e}") from None

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
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"DomainDirichlet: alpha must be > 0 and finite, got {alpha}")
        if min_size < 0:
            raise ValueError(f"DomainDirichlet: min_size must be >= 0, got {min_size}")
        super().__init__(clients_per_domain, Dirichlet(alpha, min_size))
        self.alpha = float(alpha)
        self.min_size = int(min_size)

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
            raise ValueError(
                f"LeaveOneDomainOut: held_out must be a domain name or id, got {held_out!r}"
            )
        if isinstance(held_out, int) and held_out < 0:
            raise ValueError(f"LeaveOneDomainOut: held_out must be >= 0, got {held_out}")
        if isinstance(held_out, str) and not held_out:
            raise ValueError("LeaveOneDomainOut: held_out must not be empty")
        super().__init__(clients_per_domain, inner)
        self.held_out = held_out

    def bind(self, source) -> LeaveOneDomainOut:
        """Resolves a held-out domain name (or checks a domain id) against the data set's
        `domain_names`."""
        names = getattr(source, "domain_names", None)
        if names is None:
            raise ValueError(
                f"LeaveOneDomainOut: data set {type(source).__name__} has no domains; use a "
                "multi-domain data set (DomainNet, PACS, OfficeHome, ...)"
            )
        names = list(names)
        if isinstance(self.held_out, str):
            if self.held_out not in names:
                raise ValueError(
                    f"LeaveOneDomainOut: held_out={self.held_out!r} is not a domain of "
                    f"{type(source).__name__}; its domains are {', '.join(names)}"
                )
            held_out = names.index(self.held_out)
        else:
            if self.held_out >= len(names):
                raise ValueError(
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
                raise ValueError(
                    f"LeaveOneDomainOut: held_out={h} is not among the domains present "
                    f"{present.tolist()}"
                )
            if len(present) < 2:
                raise ValueError("LeaveOneDomainOut: needs at least two domains, got one")
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
            raise ValueError(f"LeaveOneDomainOut: the held-out domain {h} has no test samples")
        rng = np.random.default_rng(seed)
        order = idx[rng.permutation(len(idx))]
        order = order[np.argsort(test_labels[order], kind="stable")]  # shuffled, by class
        return [np.sort(order[k::num_clients]) for k in range(num_clients)]


def split_like(
    train_parts: list[np.ndarray], train_labels: np.ndarray, test_labels: np.ndarray, seed: int
) -> list[np.ndarray]:
    """Test indices per client, with each client's train label distribution.

    For each class c, the test samples of c are shuffled (seeded) and divided disjointly among
    the clients holding c in train, in proportion to their train counts of c (largest-remainder
    rounding, so the shares sum to the class's test count). Test samples of a class that no
    client holds are left unassigned. Returns sorted int64 arrays, one per client.
    """
    train_labels = _check_labels(train_labels)
    test_labels = _check_labels(test_labels)
    train_parts = _check_parts(train_parts, len(train_labels), "train_parts")
    rng = np.random.default_rng(seed)
    num_classes = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1))) + 1
    counts = partition_summary(train_parts, train_labels, num_classes)  # (K, C)
    parts: list[list[np.ndarray]] = [[] for _ in train_parts]
    for c in range(num_classes):
        holders = np.flatnonzero(counts[:, c])
        idx = np.flatnonzero(test_labels == c)
        if len(holders) == 0 or len(idx) == 0:
            continue
        shares = _largest_remainder(len(idx), counts[holders, c].astype(float), rng)
        for k, share in zip(
            holders, np.split(rng.permutation(idx), np.cumsum(shares)[:-1]), strict=True
        ):
            parts[k].append(share)
    return [np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts]


def partition_summary(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Label counts per client: an int64 matrix (num_clients, num_classes)."""
    labels = _check_labels(labels)
    parts = _check_parts(parts, len(labels), "parts")
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"num_classes={num_classes} but labels go up to {labels.max()}")
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for k, p in enumerate(parts):
        counts[k] = np.bincount(labels[p], minlength=num_classes)
    return counts
