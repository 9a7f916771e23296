"""Test splits that follow a train partition (`split_like`), and label counts per client."""

from __future__ import annotations

import numpy as np

from fedclip.data.partition.checks import _check_labels, _check_parts


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
