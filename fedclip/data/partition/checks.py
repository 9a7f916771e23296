"""Input checks shared by the partitioners: labels, domain ids and index arrays.

Labels and domain ids come from the data set, so a bad one is a `DataError`; index arrays are
made by a partitioner, so a bad one is a bug (ValueError)."""

from __future__ import annotations

import numpy as np

from fedclip.errors import DataError


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise DataError(f"labels must be >= 0, got {labels.min()}")
    return labels.astype(np.int64, copy=False)


def _check_domains(domains: np.ndarray, n: int) -> np.ndarray:
    domains = np.asarray(domains)
    if domains.shape != (n,):
        raise DataError(f"domains must be 1-D with one id per sample ({n}), got {domains.shape}")
    if n and not np.issubdtype(domains.dtype, np.integer):
        raise DataError(f"domains must be integers, got dtype {domains.dtype}")
    if n and domains.min() < 0:
        raise DataError(f"domains must be >= 0, got {domains.min()}")
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
