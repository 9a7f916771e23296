"""Partitioners: split a data set's samples among simulated clients.

A partitioner is a pure function of the labels, the number of clients and a seed. It checks its
own arguments when constructed, checks feasibility before drawing anything, and owns its random
generator (`np.random.default_rng(seed)`), so a partition never depends on global RNG state or on
what ran before it. Every partitioner returns disjoint, sorted int64 index arrays, one per client.

- `IID`: shuffle and cut into near-equal parts.
- `Dirichlet`: label skew, per-class client proportions drawn from Dir(alpha).
- `TwoLevelDirichlet`: label skew over class groups, then inside each group (CIFAR-100).
- `Pathological`: each client sees only `classes_per_client` classes.
- `FewShot`: any partition above, then at most `shots` samples per class per client.

`split_like` gives each client a test split with its train split's label distribution, and
`partition_summary` counts the labels each client holds.
"""

from __future__ import annotations

import abc
import math

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
    """Splits sample indices among clients from the labels alone.

    Contract: `partitioner(labels, num_clients, seed)` takes labels, a 1-D integer array (N,) of
    values >= 0, and returns `num_clients` int64 arrays of indices into labels, each sorted
    ascending, pairwise disjoint. Whether they cover all N samples depends on the subclass (its
    docstring says). The result depends only on (constructor arguments, labels, num_clients,
    seed). Bad arguments raise ValueError naming the argument: constructor arguments when the
    partitioner is built, infeasible combinations with the labels before anything is drawn.

    Subclasses implement `_split` (and `_check` for feasibility); they never touch global RNG
    state, drawing only from the generator they are given.
    """

    def __call__(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        labels = _check_labels(labels)
        if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
            raise ValueError(f"num_clients must be an integer >= 1, got {num_clients}")
        num_clients = int(num_clients)
        self._check(labels, num_clients)
        rng = np.random.default_rng(seed)
        parts = self._split(labels, num_clients, rng)
        assert len(parts) == num_clients, f"{type(self).__name__} returned {len(parts)} parts"
        return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]

    def bind(self, source) -> Partitioner:
        """This partitioner completed from the data set it will split (e.g. its class groups);
        the default needs nothing and returns itself."""
        return self

    def _check(self, labels: np.ndarray, num_clients: int) -> None:  # noqa: B027 (optional hook)
        """Raise ValueError if this partitioner cannot split `labels` among `num_clients`."""

    @abc.abstractmethod
    def _split(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        """The partition itself, on validated inputs; draws only from `rng`."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class IID(Partitioner):
    """Uniformly random split into near-equal parts (sizes differ by at most one).

    Covers all samples. Needs at least one sample per client.
    """

    def _check(self, labels: np.ndarray, num_clients: int) -> None:
        if num_clients > len(labels):
            raise ValueError(
                f"IID: num_clients={num_clients} exceeds the number of samples {len(labels)}"
            )

    def _split(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
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

    def _check(self, labels: np.ndarray, num_clients: int) -> None:
        if self.min_size * num_clients > len(labels):
            raise ValueError(
                f"Dirichlet: min_size={self.min_size} x num_clients={num_clients} exceeds the "
                f"number of samples {len(labels)}; lower min_size or use fewer clients"
            )

    def _split(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
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

    def _check(self, labels: np.ndarray, num_clients: int) -> None:
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
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
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
    holds (all of them if it holds fewer). Disjoint; does not cover, by design.

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

    def bind(self, source) -> FewShot:
        inner = self.inner.bind(source)
        return self if inner is self.inner else FewShot(self.shots, inner)

    def _check(self, labels: np.ndarray, num_clients: int) -> None:
        self.inner._check(labels, num_clients)

    def _split(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        parts = []
        for part in self.inner._split(labels, num_clients, rng):
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

    def _check(self, labels: np.ndarray, num_clients: int) -> None:
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
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
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
