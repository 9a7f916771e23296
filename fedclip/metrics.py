"""Per-client metrics and their summaries over clients."""

from __future__ import annotations

import math

import torch
from torchmetrics.classification import MulticlassAccuracy


def client_metric(num_classes: int) -> MulticlassAccuracy:
    """Top-1 accuracy over a client's test samples (micro average)."""
    return MulticlassAccuracy(num_classes=num_classes, average="micro")


def summarize(
    per_client: dict[int, float], weights: dict[int, int] | None = None
) -> dict[str, float]:
    """mean / std / min / max over clients (unweighted, clients with no test data skipped),
    and the sample-weighted mean when `weights` (test-sample counts) are given."""
    vals = {k: v for k, v in per_client.items() if not math.isnan(v)}
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan")}
    t = torch.tensor(list(vals.values()), dtype=torch.float64)
    out = {
        "mean": float(t.mean()),
        "std": float(t.std(unbiased=False)),
        "min": float(t.min()),
        "max": float(t.max()),
    }
    if weights is not None:
        w = torch.tensor([float(weights[k]) for k in vals], dtype=torch.float64)
        out["weighted"] = float((t * w).sum() / w.sum()) if w.sum() > 0 else float("nan")
    return out
