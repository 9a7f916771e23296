"""Partitioners: disjoint, covering where promised, deterministic, and strict about arguments."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest

from fedclip.data.partition import (
    IID,
    ByDomain,
    Dirichlet,
    DomainDirichlet,
    FewShot,
    LeaveOneDomainOut,
    Partitioner,
    Pathological,
    PathologicalFewShot,
    TwoLevelDirichlet,
    partition_summary,
    split_like,
)
from fedclip.errors import ConfigError, DataError, FedclipError

NUM_CLASSES = 20
GROUPS = [c // 4 for c in range(NUM_CLASSES)]  # 5 groups of 4 classes


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    # 1000 samples over 20 classes, unevenly (every class has at least 20 samples).
    rng = np.random.default_rng(1234)
    extra = rng.choice(NUM_CLASSES, 600, p=np.linspace(1, 3, NUM_CLASSES) / 40)
    return np.concatenate([np.repeat(np.arange(NUM_CLASSES), 20), extra])


def domain_ids(num_domains: int, n: int = 1000, seed: int = 4321) -> np.ndarray:
    """A domain id for each of n samples, every domain about equally often."""
    return np.random.default_rng(seed).permutation(np.arange(n) % num_domains)


class Case(NamedTuple):
    id: str
    make: Callable[[], Partitioner]
    covers: Callable[[int], bool]  # covers all samples for this num_clients?
    # number of domains to give for this num_clients (0: infeasible); None: no domains needed
    domains: Callable[[int], int] | None = None
    seeded: bool = True  # does the seed change the partition? (one client per domain: no)


CASES = [
    Case("iid", IID, lambda k: True),
    Case("dirichlet", lambda: Dirichlet(alpha=0.5, min_size=5), lambda k: True),
    Case("dirichlet-skewed", lambda: Dirichlet(alpha=0.05, min_size=2), lambda k: True),
    Case("pathological", lambda: Pathological(2), lambda k: k * 2 >= NUM_CLASSES),
    Case("pathological-unbalanced", lambda: Pathological(3, balanced=False), lambda k: k * 3 >= 20),
    Case("pathological-disjoint", lambda: Pathological(2, disjoint=True), lambda k: k * 2 == 20),
    Case("two-level", lambda: TwoLevelDirichlet(0.5, 10.0, GROUPS), lambda k: True),
    Case("two-level-skewed", lambda: TwoLevelDirichlet(0.05, 1.0, GROUPS), lambda k: True),
    Case("fewshot", lambda: FewShot(4), lambda k: False),
    Case("fewshot-dirichlet", lambda: FewShot(3, Dirichlet(0.3, min_size=1)), lambda k: False),
    Case("fewshot-disjoint", lambda: FewShot(8, Pathological(2, disjoint=True)), lambda k: False),
    Case("pathological-fewshot", lambda: PathologicalFewShot(4), lambda k: False),
    Case("by-domain", ByDomain, lambda k: True, lambda k: k, seeded=False),
    Case(
        "by-domain-iid",
        lambda: ByDomain(5),
        lambda k: True,
        lambda k: k // 5 if k % 5 == 0 else 0,
    ),
    Case(
        "by-domain-pathological",
        lambda: ByDomain(5, Pathological(4)),
        lambda k: True,
        lambda k: k // 5 if k % 5 == 0 else 0,
    ),
    Case(
        "domain-dirichlet",
        lambda: DomainDirichlet(0.3, clients_per_domain=5, min_size=2),
        lambda k: True,
        lambda k: k // 5 if k % 5 == 0 else 0,
    ),
    Case("lodo", LeaveOneDomainOut, lambda k: False, lambda k: k + 1, seeded=False),
    Case(
        "lodo-dirichlet",
        lambda: LeaveOneDomainOut(1, 5, Dirichlet(0.5, min_size=2)),
        lambda k: False,
        lambda k: k // 5 + 1 if k % 5 == 0 else 0,
    ),
    Case("fewshot-by-domain", lambda: FewShot(4, ByDomain()), lambda k: False, lambda k: k),
]
IDS = [c.id for c in CASES]


# every case with every number of clients it can have (a domain case needs whole domains)
SIZES = [
    pytest.param(case, k, id=f"{case.id}-{k}")
    for case in CASES
    for k in (1, 5, 10)
    if case.domains is None or case.domains(k) >= 1
]


def run_case(case: Case, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    domains = None
    if case.domains is not None:
        domains = domain_ids(case.domains(num_clients), len(labels))
    return case.make()(labels, num_clients, seed, domains=domains)


@pytest.mark.parametrize("case,num_clients", SIZES)
def test_disjoint_sorted_and_covering(case, num_clients, labels):
    parts = run_case(case, labels, num_clients, seed=0)
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0), "sorted ascending, no repeats"
        assert p.size == 0 or (p.min() >= 0 and p.max() < len(labels))
    together = np.concatenate(parts)
    assert len(np.unique(together)) == len(together), "clients must not share samples"
    if case.covers(num_clients):
        assert len(together) == len(labels)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("seed", [0, 7])
def test_deterministic_per_seed(case, seed, labels):
    a = run_case(case, labels, 5, seed)
    b = run_case(case, labels, 5, seed)  # a fresh instance: no state carried between calls
    c = run_case(case, labels, 5, seed + 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    if case.seeded:
        assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_no_global_rng(labels):
    np.random.seed(0)
    a = Dirichlet(0.5)(labels, 5, seed=3)
    np.random.seed(99)
    np.random.rand(10)
    b = Dirichlet(0.5)(labels, 5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_iid_near_equal(labels):
    sizes = [len(p) for p in IID()(labels, 7, seed=0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(labels)


@pytest.mark.parametrize("seed", range(5))
def test_dirichlet_min_size_and_skew(seed, labels):
    parts = Dirichlet(alpha=0.1, min_size=30)(labels, 10, seed)
    assert min(len(p) for p in parts) >= 30
    counts = partition_summary(parts, labels, NUM_CLASSES)
    # Strong skew: most clients hold few of the classes in any quantity.
    assert np.median((counts >= 5).sum(axis=1)) < NUM_CLASSES / 2


@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("num_clients,per_client", [(10, 2), (7, 3), (30, 2), (4, 5)])
def test_pathological_classes(num_clients, per_client, balanced, labels):
    parts = Pathological(per_client, balanced=balanced)(labels, num_clients, seed=1)
    counts = partition_summary(parts, labels, NUM_CLASSES)
    assert np.all((counts > 0).sum(axis=1) == per_client)
    assert np.all((counts > 0).sum(axis=0) >= 1), "every class has an owner"
    owners = (counts > 0).sum(axis=0)
    assert owners.max() - owners.min() <= 1
    if balanced:  # the owners of a class get near-equal shares
        for c in range(NUM_CLASSES):
            shares = counts[counts[:, c] > 0, c]
            assert shares.max() - shares.min() <= 1


def test_pathological_disjoint_classes(labels):
    parts = Pathological(3, disjoint=True)(labels, 6, seed=2)
    held = (partition_summary(parts, labels, NUM_CLASSES) > 0).astype(int)
    assert np.all(held.sum(axis=1) == 3)
    assert held.sum(axis=0).max() == 1, "no class is shared"
    for p in parts:  # a client gets all the samples of its classes
        for c in np.unique(labels[p]):
            assert np.array_equal(p[labels[p] == c], np.flatnonzero(labels == c))


@pytest.mark.parametrize("inner", [None, Dirichlet(0.5, min_size=5), Pathological(2)])
def test_fewshot_caps_shots(inner, labels):
    parts = FewShot(shots=6, inner=inner)(labels, 10, seed=0)
    counts = partition_summary(parts, labels, NUM_CLASSES)
    assert counts.max() <= 6
    full = FewShot(shots=10**6, inner=inner)(labels, 10, seed=0)  # same inner draw, no cap
    full_counts = partition_summary(full, labels, NUM_CLASSES)
    np.testing.assert_array_equal(counts, np.minimum(full_counts, 6))


@pytest.mark.parametrize(
    "make,arg",
    [
        (lambda: Dirichlet(alpha=0.0), "alpha"),
        (lambda: Dirichlet(alpha=-1), "alpha"),
        (lambda: Dirichlet(min_size=-1), "min_size"),
        (lambda: Dirichlet(max_tries=0), "max_tries"),
        (lambda: Pathological(classes_per_client=0), "classes_per_client"),
        (lambda: FewShot(shots=0), "shots"),
        (lambda: TwoLevelDirichlet(beta=0), "beta"),
        (lambda: TwoLevelDirichlet(alpha=float("inf")), "alpha"),
        (lambda: TwoLevelDirichlet(groups=[]), "groups"),
        (lambda: TwoLevelDirichlet(groups=[0, -1]), "groups"),
        # the wrong type fails at construction too, as one line, not at the first split
        (lambda: Dirichlet(alpha="0.5"), "alpha"),  # type: ignore[arg-type]
        (lambda: Dirichlet(alpha=None), "alpha"),  # type: ignore[arg-type]
        (lambda: Dirichlet(min_size=1.5), "min_size"),
        (lambda: Dirichlet(max_tries=True), "max_tries"),
        (lambda: Pathological(classes_per_client="2"), "classes_per_client"),  # type: ignore[arg-type]
        (lambda: Pathological(balanced="false"), "balanced"),  # type: ignore[arg-type]
        (lambda: Pathological(disjoint=1), "disjoint"),  # type: ignore[arg-type]
        (lambda: FewShot(shots=None), "shots"),  # type: ignore[arg-type]
        (lambda: TwoLevelDirichlet(groups="0011"), "groups"),  # type: ignore[arg-type]
        (lambda: TwoLevelDirichlet(groups=[0, "a"]), "groups"),  # type: ignore[list-item]
        (lambda: TwoLevelDirichlet(groups=5), "groups"),  # type: ignore[arg-type]
    ],
)
def test_bad_constructor_args(make, arg):
    with pytest.raises(ConfigError, match=arg):
        make()


def test_integral_floats_are_accepted():
    assert Dirichlet(alpha=1, min_size=2.0).min_size == 2
    assert FewShot(shots=np.int64(3)).shots == 3


def test_fewshot_inner_must_be_partitioner():
    with pytest.raises(ConfigError, match="inner"):
        FewShot(inner="iid")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "partitioner,num_clients,arg",
    [
        (Dirichlet(min_size=200), 10, "min_size"),  # 200 x 10 > 1000 samples
        (Dirichlet(alpha=1e-3, min_size=90, max_tries=3), 10, "min_size"),  # cannot be met
        (Pathological(classes_per_client=21), 3, "classes_per_client"),
        (Pathological(classes_per_client=3, disjoint=True), 7, "disjoint"),
        (Pathological(classes_per_client=20), 100, "num_clients"),  # 100 owners per class
        (IID(), 1001, "num_clients"),
        (FewShot(2, Pathological(21)), 2, "classes_per_client"),
        (TwoLevelDirichlet(groups=[0] * 10), 2, "groups cover 10 classes"),
        (TwoLevelDirichlet(), 2, "no class groups"),
    ],
)
def test_infeasible(partitioner, num_clients, arg, labels):
    with pytest.raises(ConfigError, match=arg):
        partitioner(labels, num_clients, seed=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_call_args(case, labels):
    p: Partitioner = case.make()
    with pytest.raises(ConfigError, match="num_clients"):
        p(labels, 0, seed=0)
    with pytest.raises(ConfigError, match="num_clients"):
        p(labels, "2", seed=0)
    with pytest.raises(DataError, match="labels"):
        p(labels.reshape(100, 10), 2, seed=0)
    with pytest.raises(DataError, match="labels"):
        p(labels.astype(float), 2, seed=0)
    with pytest.raises(DataError, match="labels"):
        p(labels - 1, 2, seed=0)


def test_split_like_hand_example():
    # Train: client 0 holds class 0 x3 and class 1 x1; client 1 holds class 0 x1 and class 1 x2;
    # client 2 holds class 3 x2. Nobody holds class 2 or class 4.
    train_labels = np.array([0, 0, 0, 1, 0, 1, 1, 3, 3, 2])
    train_parts = [np.array([0, 1, 2, 3]), np.array([4, 5, 6]), np.array([7, 8])]
    # Test: class 0 x8, class 1 x4, class 2 x3, class 3 x2, class 4 x1.
    test_labels = np.array([0] * 8 + [1] * 4 + [2] * 3 + [3] * 2 + [4])
    parts = split_like(train_parts, train_labels, test_labels, seed=0)
    counts = partition_summary(parts, test_labels, 5)
    # class 0: 8 x 3/4 = 6, 8 x 1/4 = 2.
    # class 1: 4 x 1/3 = 1.33, 4 x 2/3 = 2.67 -> floors 1, 2; the left-over unit goes to the
    # larger remainder (client 1) -> 1, 3.
    # class 3: all 2 to client 2. Classes 2 and 4: unassigned.
    expected = np.array([[6, 1, 0, 0, 0], [2, 3, 0, 0, 0], [0, 0, 0, 2, 0]])
    np.testing.assert_array_equal(counts, expected)
    together = np.concatenate(parts)
    assert len(np.unique(together)) == len(together)
    assert not np.isin(np.flatnonzero(np.isin(test_labels, [2, 4])), together).any()
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_split_like_follows_train_distribution(seed, labels):
    rng = np.random.default_rng(seed)
    test_labels = rng.permutation(np.repeat(np.arange(NUM_CLASSES), 50))
    train_parts = Pathological(3)(labels, 8, seed)  # 24 slots: 4 classes shared by two clients
    test_parts = split_like(train_parts, labels, test_labels, seed)
    train_counts = partition_summary(train_parts, labels, NUM_CLASSES)
    test_counts = partition_summary(test_parts, test_labels, NUM_CLASSES)
    np.testing.assert_array_equal(test_counts > 0, train_counts > 0)
    assert np.all(test_counts.sum(axis=0) == 50), "every class held in train is fully assigned"
    exact = 50 * train_counts / train_counts.sum(axis=0, keepdims=True)
    assert np.abs(test_counts - exact).max() < 1
    together = np.concatenate(test_parts)
    assert len(np.unique(together)) == len(together)
    again = split_like(train_parts, labels, test_labels, seed)
    assert all(np.array_equal(a, b) for a, b in zip(test_parts, again, strict=True))


def test_split_like_rejects_bad_parts(labels):
    with pytest.raises(ValueError, match="train_parts"):
        split_like([np.array([0, len(labels)])], labels, labels, seed=0)


def test_partition_summary():
    labels = np.array([0, 1, 1, 2, 2, 2])
    counts = partition_summary(
        [np.array([0, 1, 3]), np.array([2, 4, 5]), np.array([])], labels, num_classes=4
    )
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, [[1, 1, 1, 0], [0, 1, 2, 0], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="num_classes"):
        partition_summary([np.array([3])], labels, num_classes=2)


@pytest.mark.parametrize("seed", range(3))
def test_two_level_concentrates_on_few_groups(seed, labels):
    """Small beta: each client's samples sit in few groups; large alpha: classes inside a
    group are spread fairly evenly. Sizes are near-equal (N // K, remainder to the first)."""
    parts = TwoLevelDirichlet(beta=0.1, alpha=100.0, groups=GROUPS)(labels, 10, seed)
    assert sorted(len(p) for p in parts) == [100] * 10
    counts = partition_summary(parts, labels, NUM_CLASSES)  # (K, C)
    by_group = counts.reshape(10, 5, 4).sum(-1)  # (K, G)
    top = np.sort(by_group, axis=1)[:, -2:].sum(1) / by_group.sum(1)
    assert np.median(top) > 0.8  # most clients: two groups hold most of their data
    flat = Dirichlet(alpha=100.0, min_size=1)(labels, 10, seed)
    flat_groups = partition_summary(flat, labels, NUM_CLASSES).reshape(10, 5, 4).sum(-1)
    assert np.median(np.sort(flat_groups, axis=1)[:, -2:].sum(1) / flat_groups.sum(1)) < 0.6


def test_two_level_takes_the_data_sets_groups(labels):
    from fedclip.data.datasets import Shapes

    bound = TwoLevelDirichlet(0.5).bind(Shapes(num_classes=10))
    assert bound.groups == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]  # by shape: circle, square, ...
    own = TwoLevelDirichlet(0.5, groups=GROUPS)
    assert own.bind(Shapes(num_classes=10)) is own  # given groups win
    inner = FewShot(2, TwoLevelDirichlet(0.5)).bind(Shapes(num_classes=10))
    assert inner.inner.groups == bound.groups

    class NoGroups:
        class_groups = None

    with pytest.raises(ConfigError, match="has no class groups"):
        TwoLevelDirichlet().bind(NoGroups())


# ---------------------------------------------------------------------------------------------
# Domain partitioners


@pytest.fixture(scope="module")
def test_labels() -> np.ndarray:
    return np.random.default_rng(5).permutation(np.repeat(np.arange(NUM_CLASSES), 30))


@pytest.mark.parametrize("case", [c for c in CASES if c.domains is None], ids=lambda c: c.id)
def test_domains_do_not_change_plain_partitioners(case, labels):
    p = case.make()
    assert not p.needs_domains
    assert p.domain_of_clients(domain_ids(3), 5) is None
    a = p(labels, 5, seed=1)
    b = p(labels, 5, seed=1, domains=domain_ids(3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("per_domain", [1, 3])
@pytest.mark.parametrize(
    "inner", [None, Dirichlet(0.5, min_size=2), Pathological(5)], ids=["iid", "dir", "path"]
)
def test_by_domain_keeps_clients_in_their_domain(per_domain, inner, labels, test_labels):
    train_domains = domain_ids(4) + 2  # ids 2..5: the clients follow the ids present
    test_domains = domain_ids(4, len(test_labels), seed=9) + 2
    p = ByDomain(per_domain, inner)
    k = 4 * per_domain
    parts = p(labels, k, seed=3, domains=train_domains)
    owner = p.domain_of_clients(train_domains, k)
    assert owner == [d for d in (2, 3, 4, 5) for _ in range(per_domain)]
    for part, d in zip(parts, owner, strict=True):
        assert len(part) > 0 and np.all(train_domains[part] == d)
    if inner is None or isinstance(inner, Dirichlet):
        assert sum(len(x) for x in parts) == len(labels)
    tests = p.split_test(parts, labels, test_labels, 3, train_domains, test_domains)
    together = np.concatenate(tests)
    assert len(np.unique(together)) == len(together)
    for part, tpart, d in zip(parts, tests, owner, strict=True):
        assert np.all(test_domains[tpart] == d), "test samples of the client's domain only"
        held = set(labels[part].tolist())
        assert set(test_labels[tpart].tolist()) <= held
    # inside a domain the test split is split_like over the domain's clients
    for d in (2, 3, 4, 5):
        ks = [j for j, o in enumerate(owner) if o == d]
        idx = np.flatnonzero(test_domains == d)
        like = split_like([parts[j] for j in ks], labels, test_labels[idx], 3)
        for j, share in zip(ks, like, strict=True):
            np.testing.assert_array_equal(tests[j], idx[share])
    again = p.split_test(parts, labels, test_labels, 3, train_domains, test_domains)
    assert all(np.array_equal(a, b) for a, b in zip(tests, again, strict=True))


def test_domain_dirichlet_is_by_domain_with_dirichlet(labels):
    doms = domain_ids(3)
    a = DomainDirichlet(0.2, clients_per_domain=4, min_size=3)(labels, 12, 5, domains=doms)
    b = ByDomain(4, Dirichlet(0.2, min_size=3))(labels, 12, 5, domains=doms)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert min(len(x) for x in a) >= 3
    assert repr(DomainDirichlet()) == "DomainDirichlet(alpha=0.5, clients_per_domain=2, min_size=2)"


@pytest.mark.parametrize("held_out", [0, 2])
@pytest.mark.parametrize("per_domain", [1, 2])
def test_leave_one_domain_out(held_out, per_domain, labels, test_labels):
    train_domains, test_domains = domain_ids(4), domain_ids(4, len(test_labels), seed=9)
    p = LeaveOneDomainOut(held_out, per_domain)
    k = 3 * per_domain
    parts = p(labels, k, seed=0, domains=train_domains)
    owner = p.domain_of_clients(train_domains, k)
    assert held_out not in owner and sorted(set(owner)) == sorted({0, 1, 2, 3} - {held_out})
    together = np.concatenate(parts)
    assert not np.any(train_domains[together] == held_out), "never trains on the held-out domain"
    np.testing.assert_array_equal(np.sort(together), np.flatnonzero(train_domains != held_out))
    for part, d in zip(parts, owner, strict=True):
        assert np.all(train_domains[part] == d)
    tests = p.split_test(parts, labels, test_labels, 0, train_domains, test_domains)
    pooled = np.sort(np.concatenate(tests))
    np.testing.assert_array_equal(pooled, np.flatnonzero(test_domains == held_out))
    sizes = [len(t) for t in tests]
    assert max(sizes) - min(sizes) <= 1
    counts = partition_summary(tests, test_labels, NUM_CLASSES)
    assert np.all(counts.max(0) - counts.min(0) <= 1), "stratified by class"
    again = p.split_test(parts, labels, test_labels, 0, train_domains, test_domains)
    other = p.split_test(parts, labels, test_labels, 1, train_domains, test_domains)
    assert all(np.array_equal(a, b) for a, b in zip(tests, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(tests, other, strict=True))


class FakeSource:
    domain_names = ["clipart", "painting", "real"]
    class_groups = None


def test_leave_one_domain_out_bind():
    bound = LeaveOneDomainOut("painting").bind(FakeSource())
    assert bound.held_out == 1
    assert LeaveOneDomainOut(2).bind(FakeSource()).held_out == 2
    with pytest.raises(ConfigError, match="its domains are clipart, painting, real"):
        LeaveOneDomainOut("sketch").bind(FakeSource())
    with pytest.raises(ConfigError, match="has 3 domains"):
        LeaveOneDomainOut(3).bind(FakeSource())
    with pytest.raises(ConfigError, match="has no domains"):
        LeaveOneDomainOut("painting").bind(object())
    with pytest.raises(ValueError, match="bind"):  # a caller's bug (fedclip always binds)
        LeaveOneDomainOut("painting")(np.zeros(6, int), 2, 0, domains=np.arange(6) % 3)
    inner = LeaveOneDomainOut("real", 1, TwoLevelDirichlet(0.5))

    class WithGroups(FakeSource):
        class_groups = [0, 0, 1]

    bound = inner.bind(WithGroups())
    assert bound.inner.groups == [0, 0, 1] and bound.held_out == 2
    assert inner.held_out == "real" and inner.inner.groups is None, "bind does not mutate"


def test_fewshot_over_domains(labels, test_labels):
    doms, test_doms = domain_ids(3), domain_ids(3, len(test_labels), seed=9)
    p = FewShot(2, ByDomain(2))
    assert p.needs_domains and not FewShot(2).needs_domains
    with pytest.raises(ConfigError, match="domain"):
        p(labels, 6, seed=0)
    parts = p(labels, 6, seed=0, domains=doms)
    owner = p.domain_of_clients(doms, 6)
    assert owner == [0, 0, 1, 1, 2, 2]
    assert partition_summary(parts, labels, NUM_CLASSES).max() <= 2
    tests = p.split_test(parts, labels, test_labels, 0, doms, test_doms)
    for part, d in zip(tests, owner, strict=True):
        assert len(part) and np.all(test_doms[part] == d)


def test_pathological_fewshot(labels):
    parts = PathologicalFewShot(shots=5)(labels, 6, seed=4)
    same = FewShot(5, Pathological(NUM_CLASSES // 6, disjoint=True))(labels, 6, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same, strict=True))
    counts = partition_summary(parts, labels, NUM_CLASSES)
    assert np.all((counts > 0).sum(1) == 3) and counts.max() == 5
    assert (counts > 0).sum(0).max() == 1, "no class is shared"
    counts = partition_summary(PathologicalFewShot(2, 1)(labels, 6, seed=4), labels, NUM_CLASSES)
    assert np.all((counts > 0).sum(1) == 1) and counts.max() == 2


@pytest.mark.parametrize(
    "make,arg",
    [
        (lambda: ByDomain(clients_per_domain=0), "clients_per_domain"),
        (lambda: ByDomain(clients_per_domain=1.5), "clients_per_domain"),
        (lambda: DomainDirichlet(alpha="a"), "alpha"),  # type: ignore[arg-type]
        (lambda: DomainDirichlet(alpha=0), "alpha"),
        (lambda: DomainDirichlet(min_size=-1), "min_size"),
        (lambda: DomainDirichlet(clients_per_domain=0), "clients_per_domain"),
        (lambda: LeaveOneDomainOut(held_out=-1), "held_out"),
        (lambda: LeaveOneDomainOut(held_out=""), "held_out"),
        (lambda: LeaveOneDomainOut(held_out=1.5), "held_out"),
        (lambda: LeaveOneDomainOut(clients_per_domain=0), "clients_per_domain"),
        (lambda: PathologicalFewShot(shots=0), "shots"),
        (lambda: PathologicalFewShot(classes_per_client=0), "classes_per_client"),
    ],
)
def test_bad_domain_constructor_args(make, arg):
    with pytest.raises(ConfigError, match=arg):
        make()


def test_domain_inner_must_be_partitioner():
    with pytest.raises(ConfigError, match="inner"):
        ByDomain(inner="iid")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "partitioner,num_clients,domains,match",
    [
        (ByDomain(), 5, domain_ids(4), r"num_clients=5 must equal the 4 domains x "),
        (ByDomain(2), 4, domain_ids(4), r"4 domains x clients_per_domain=2 = 8"),
        (ByDomain(), 4, None, "needs the domain of every sample"),
        (DomainDirichlet(), 8, None, "needs the domain of every sample"),
        (ByDomain(), 4, domain_ids(4, 999), "domains must be 1-D with one id per sample"),
        (ByDomain(), 4, domain_ids(4).astype(float), "domains must be integers"),
        (ByDomain(), 4, domain_ids(4) - 1, "domains must be >= 0"),
        (ByDomain(2, Dirichlet(min_size=200)), 8, domain_ids(4), "in domain 0: Dirichlet"),
        (LeaveOneDomainOut(7), 3, domain_ids(4), r"held_out=7 is not among the domains"),
        (LeaveOneDomainOut(0), 1, domain_ids(1), "at least two domains"),
        (LeaveOneDomainOut(0), 4, domain_ids(4), r"3 domains x clients_per_domain=1 = 3"),
        (PathologicalFewShot(), 21, None, "num_clients=21 exceeds the 20 classes"),
        (PathologicalFewShot(4, 3), 7, None, "disjoint"),
    ],
)
def test_domain_infeasible(partitioner, num_clients, domains, match, labels):
    # bad domain ids are a DataError (they come from the data set), the rest ConfigError
    with pytest.raises(FedclipError, match=match):
        partitioner(labels, num_clients, seed=0, domains=domains)


def test_domain_split_test_errors(labels, test_labels):
    doms, test_doms = domain_ids(2), domain_ids(2, len(test_labels))
    parts = ByDomain()(labels, 2, 0, domains=doms)
    with pytest.raises(ValueError, match="needs train_domains and test_domains"):
        ByDomain().split_test(parts, labels, test_labels, 0)
    with pytest.raises(ValueError, match="holds samples of other domains"):
        ByDomain().split_test(parts[::-1], labels, test_labels, 0, doms, test_doms)
    with pytest.raises(ValueError, match="num_clients=3"):
        ByDomain().split_test(parts + [parts[0]], labels, test_labels, 0, doms, test_doms)
    with pytest.raises(ValueError, match="needs test_domains"):
        LeaveOneDomainOut(0).split_test(parts[1:], labels, test_labels, 0, doms)
    with pytest.raises(DataError, match="no test samples"):
        LeaveOneDomainOut(0).split_test(
            parts[1:], labels, test_labels, 0, doms, np.ones(len(test_labels), np.int64)
        )
