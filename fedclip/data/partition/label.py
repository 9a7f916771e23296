"""Label-skew partitioners that cover every sample: IID, Dirichlet and two-level Dirichlet."""

from __future__ import annotations

import numpy as np

from fedclip.data.args import integer, positive
from fedclip.data.partition.base import Partitioner
from fedclip.errors import ConfigError


class IID(Partitioner):
    """Uniformly random split into near-equal parts (sizes differ by at most one).

    Covers all samples. Needs at least one sample per client.
    """

    def _check(self, labels: np.ndarray, num_clients: int, domains: np.ndarray | None) -> None:
        if num_clients > len(labels):
            raise ConfigError(
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
        self.alpha = positive("Dirichlet", "alpha", alpha)
        self.min_size = integer("Dirichlet", "min_size", min_size, minimum=0)
        self.max_tries = integer("Dirichlet", "max_tries", max_tries, minimum=1)

    def _check(self, labels: np.ndarray, num_clients: int, domains: np.ndarray | None) -> None:
        if self.min_size * num_clients > len(labels):
            raise ConfigError(
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
        raise ConfigError(
            f"Dirichlet: could not give every one of {num_clients} clients min_size="
            f"{self.min_size} samples in max_tries={self.max_tries} draws (alpha={self.alpha}, "
            f"{n} samples); use a larger alpha, fewer clients or a smaller min_size"
        )


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
        self.beta = positive("TwoLevelDirichlet", "beta", beta)
        self.alpha = positive("TwoLevelDirichlet", "alpha", alpha)
        self.groups = None if groups is None else _group_ids(groups)

    def bind(self, source) -> TwoLevelDirichlet:
        """Takes the data set's `class_groups` when no groups were given."""
        if self.groups is not None:
            return self
        groups = getattr(source, "class_groups", None)
        if groups is None:
            raise ConfigError(
                f"TwoLevelDirichlet: data set {type(source).__name__} has no class groups; "
                "give the group of every class in partitioner.init_args.groups"
            )
        return TwoLevelDirichlet(self.beta, self.alpha, list(groups))

    def _check(self, labels: np.ndarray, num_clients: int, domains: np.ndarray | None) -> None:
        if self.groups is None:
            raise ConfigError(
                "TwoLevelDirichlet: no class groups (set groups, or use a data set that has "
                "them, like CIFAR100)"
            )
        if labels.size and labels.max() >= len(self.groups):
            raise ConfigError(
                f"TwoLevelDirichlet: groups cover {len(self.groups)} classes but labels go up "
                f"to {labels.max()}"
            )
        if num_clients > len(labels):
            raise ConfigError(
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


def _group_ids(groups) -> list[int]:
    """TwoLevelDirichlet's `groups` as a list of ints, checked: non-empty, every id >= 0."""
    if isinstance(groups, (str, bytes)) or not hasattr(groups, "__len__") or len(groups) == 0:
        raise ConfigError(
            f"TwoLevelDirichlet: groups must be a non-empty list of ids >= 0, got {groups!r}"
        )
    return [
        integer("TwoLevelDirichlet", f"groups[{c}]", g, minimum=0) for c, g in enumerate(groups)
    ]
