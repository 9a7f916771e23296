"""The validation hold-out (`data.val_fraction`): part of each client's training samples
kept aside, per label, for model selection, so that no choice is made on the test split.

`hold_out` is a pure function of the client's training part, its labels, the fraction and
the seed. Of the n samples of each label a client holds, `val_count(f, n)` = floor(f * n +
1/2) (round half up: f = 0.25 keeps 1 of 2, 1 of 3, 2 of 6) go to validation, chosen by a
generator seeded with (seed, 5, client), the rest stay training; the two parts are disjoint,
sorted and together the client's part. Multi-label data is stratified by the partition label
(each image's rarest label, `FederatedData.train_labels`).

`split_summary` counts each client's samples per split (`FederatedData.summary`).
"""

from __future__ import annotations

import math

import numpy as np

from fedclip.data.partition import partition_summary
from fedclip.errors import ConfigError


def check_val_fraction(fraction: float) -> None:
    """data.val_fraction must be in [0, 1) (ConfigError, one line)."""
    if not isinstance(fraction, int | float) or isinstance(fraction, bool):
        raise ConfigError(f"data.val_fraction must be a number in [0, 1), got {fraction!r}")
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {fraction}")


def val_count(fraction: float, n: int) -> int:
    """How many of a label's n samples a client holds go to validation: floor(f * n + 1/2)."""
    return int(math.floor(fraction * n + 0.5))


def hold_out(
    parts: list[np.ndarray], labels: np.ndarray, fraction: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(training parts, validation parts) of the clients' `parts` (sample ids into
    `labels`): of client k's n samples of each label, `val_count(fraction, n)` drawn with
    `np.random.default_rng([seed, 5, k])` go to validation. A client left without a
    training sample is a ConfigError naming it and the fraction."""
    check_val_fraction(fraction)
    train, val = [], []
    for k, part in enumerate(parts):
        part = np.asarray(part, dtype=np.int64)
        rng = np.random.default_rng([seed, 5, k])
        held = []
        for c in np.unique(labels[part]):  # ascending: the draws do not depend on order
            members = np.sort(part[labels[part] == c])
            held.append(rng.permutation(members)[: val_count(fraction, len(members))])
        chosen = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
        rest = np.setdiff1d(part, chosen, assume_unique=False)
        if len(part) and not len(rest):
            raise ConfigError(
                f"data.val_fraction={fraction} leaves client {k} no training sample (all "
                f"{len(part)} of its samples go to validation); lower data.val_fraction"
            )
        train.append(np.sort(rest).astype(np.int64))
        val.append(chosen.astype(np.int64))
    return train, val


def split_summary(data) -> dict:
    """Per-client sample and class counts of the training and test splits (and the
    validation split, `val` / `val_counts`, when `data.val_fraction` > 0), and each client's
    domain and data set, if any: `FederatedData.summary()`."""
    n_cls = len(data.all_classnames)
    train = partition_summary(data.train_parts, data.train_labels, n_cls)
    test = partition_summary(data.test_parts, data.test_labels, n_cls)
    val = partition_summary(data.val_parts, data.train_labels, n_cls) if data.val_parts else None
    domains = data.client_domains()
    clients = []
    for k in range(data.num_clients):
        row = {"client": k, "train": int(train[k].sum())}
        if val is not None:
            row["val"] = int(val[k].sum())
        row.update(test=int(test[k].sum()), classes=int((train[k] > 0).sum()))
        if domains[k] is not None:
            row["domain"] = domains[k]
        if data.dataset_names is not None:
            row["dataset"] = data.client_dataset(k)
        clients.append(row)
    return {
        "dataset": getattr(data.source, "name", type(data.source).__name__),
        "partitioner": repr(data.partitioner),
        "seed": data.seed,
        "classnames": data.all_classnames,
        # multi-label: the counts count each image once, by its rarest label
        "multilabel": data.multilabel,
        **({} if data.dataset_names is None else {"datasets": data.dataset_names}),
        "clients": clients,
        "train_counts": train.tolist(),
        "test_counts": test.tolist(),
        **({} if val is None else {"val_fraction": data.cfg.val_fraction}),
        **({} if val is None else {"val_counts": val.tolist()}),
    }
