"""Per-client metrics and their summaries over clients."""

from __future__ import annotations

import math

import torch
from torchmetrics.classification import MulticlassAccuracy


def client_metric(num_classes: int) -> MulticlassAccuracy:
    """Top-1 accuracy over a client's test samples (micro average). A single candidate
    class (a client holding one class) is allowed: every prediction is then right.

    Never synchronised across ranks: each rank evaluates different clients."""
    return MulticlassAccuracy(
        num_classes=num_classes if num_classes > 1 else None,
        average="micro",
        sync_on_compute=False,
    )


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


def harmonic_mean(values: list[float]) -> float:
    """n / sum(1 / v); 0 when any value is 0, NaN when any is NaN."""
    if any(math.isnan(v) for v in values):
        return float("nan")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def _acc(ct: tuple[int, int]) -> float:
    return ct[0] / ct[1] if ct[1] else float("nan")


def pooled_accuracy(result: dict[int, dict[str, tuple[int, int]]], part: str) -> float:
    """Accuracy over all clients' (correct, total) of `part`, pooled."""
    correct = sum(r[part][0] for r in result.values())
    total = sum(r[part][1] for r in result.values())
    return correct / total if total else float("nan")


def accuracy_metrics(
    result: dict[int, dict[str, tuple[int, int]]], weights: dict[int, int]
) -> dict[str, float]:
    """The single-label report from each client's (correct, total) of its own model on its
    own test split ('local') and of the global part on its share of the whole test set
    ('global'): `eval/acc_*` (mean/std/min/max over clients, and weighted by `weights`),
    `eval/global` (pooled: the global model on the whole test set) and `eval/dual`, the
    harmonic mean of the mean personal accuracy and the global accuracy. Over several
    data sets (parts 'global/<d>'): `dataset_metrics`."""
    if _per_dataset(result):
        return dataset_metrics(result, weights, base_to_novel=False)
    local = {k: _acc(r["local"]) for k, r in result.items()}
    metrics = {f"eval/acc_{name}": v for name, v in summarize(local, weights).items()}
    metrics["eval/global"] = pooled_accuracy(result, "global")
    metrics["eval/dual"] = harmonic_mean([metrics["eval/acc_mean"], metrics["eval/global"]])
    metrics.update({f"client/{k}/acc": v for k, v in local.items()})
    return metrics


def base_to_novel_metrics(result: dict[int, dict[str, tuple[int, int]]]) -> dict[str, float]:
    """The base-to-novel report from each client's (correct, total) per evaluation.

    local: accuracy on the client's own test split among its own classes, averaged over
    clients (unweighted; `eval/acc_*` are its mean/std/min/max/weighted). base, novel: the
    global part's accuracy over all clients' shares of the base and novel test images,
    pooled. hm: the harmonic mean of local, base and novel, as in the FedTPG/FedMVP tables.
    global: the base accuracy (the global model on the training classes' whole test set);
    dual: the harmonic mean of local and global. Over several data sets (parts
    'base/<d>', 'novel/<d>'): `dataset_metrics`.
    """
    weights = {k: r["local"][1] for k, r in result.items()}
    if _per_dataset(result):
        return dataset_metrics(result, weights, base_to_novel=True)
    local = {k: _acc(r["local"]) for k, r in result.items()}
    metrics = {f"eval/acc_{name}": v for name, v in summarize(local, weights).items()}
    pooled = {part: pooled_accuracy(result, part) for part in ("base", "novel")}
    metrics["eval/local"] = metrics["eval/acc_mean"]
    metrics["eval/base"] = pooled["base"]
    metrics["eval/novel"] = pooled["novel"]
    metrics["eval/hm"] = harmonic_mean([metrics["eval/local"], pooled["base"], pooled["novel"]])
    metrics["eval/global"] = pooled["base"]
    metrics["eval/dual"] = harmonic_mean([metrics["eval/local"], pooled["base"]])
    for k, r in result.items():
        metrics[f"client/{k}/acc"] = local[k]
        metrics[f"client/{k}/base"] = _acc(r["base"])
        metrics[f"client/{k}/novel"] = _acc(r["novel"])
    return metrics


def _per_dataset(result: dict[int, dict[str, tuple[int, int]]]) -> bool:
    kinds = ("base/", "novel/", "global/")
    return any(part.startswith(kinds) for r in result.values() for part in r)


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


DATASETS_CONVENTION = (
    "per data set d: local/<d> = unweighted mean over d's clients of their accuracy among "
    "their own classes; base/<d>, novel/<d> (global/<d>) = the global part on d's test images "
    "among d's base (novel; all) classes, pooled; local, base, novel, global = unweighted means "
    "over data sets; hm = harmonic mean of the means (local, base, novel), not a mean of "
    "per-data-set HMs (FedTPG, PMFLT); dual = HM(local, global)"
)


def dataset_metrics(
    result: dict[int, dict[str, tuple[int, int]]], weights: dict[int, int], base_to_novel: bool
) -> dict[str, float]:
    """The report over several data sets (FedTPG's convention) from each client's (correct,
    total) of 'local' (its own model among its own classes; 'local/<d>' names its data set
    d) and of the global part on its share of each data set d's test images among d's
    classes ('base/<d>', 'novel/<d>', or 'global/<d>' without base-to-novel).

    Per data set d: eval/local/<d> = the unweighted mean over d's clients of their local
    accuracy; eval/base/<d>, eval/novel/<d> (eval/global/<d>) = pooled over the clients'
    shares of d. Then each is averaged over data sets (unweighted): eval/local,
    eval/base, eval/novel (eval/global). eval/hm = the harmonic mean of those means
    (local, base, novel), not a mean of per-data-set HMs (FedTPG, PMFLT); eval/global =
    eval/base under base-to-novel; eval/dual = HM(eval/local, eval/global).
    eval/acc_* summarise the local accuracy over all clients, as for one data set.
    """
    local = {k: _acc(r["local"]) for k, r in result.items()}
    metrics = {f"eval/acc_{name}": v for name, v in summarize(local, weights).items()}
    kinds = ("base", "novel") if base_to_novel else ("global",)
    names = list(dict.fromkeys(p.split("/", 1)[1] for r in result.values() for p in r
                               if p.startswith(f"{kinds[0]}/")))  # fmt: skip
    per = {}
    for d in names:
        mine = [local[k] for k, r in result.items() if f"local/{d}" in r]
        per[f"local/{d}"] = _mean(mine)
        for kind in kinds:
            per[f"{kind}/{d}"] = pooled_accuracy(result, f"{kind}/{d}")
    metrics.update({f"eval/{key}": v for key, v in per.items()})
    for kind in ("local", *kinds):
        metrics[f"eval/{kind}"] = _mean([per[f"{kind}/{d}"] for d in names])
    if base_to_novel:
        parts = [metrics["eval/local"], metrics["eval/base"], metrics["eval/novel"]]
        metrics["eval/hm"] = harmonic_mean(parts)
        metrics["eval/global"] = metrics["eval/base"]
    metrics["eval/dual"] = harmonic_mean([metrics["eval/local"], metrics["eval/global"]])
    metrics.update({f"client/{k}/acc": v for k, v in local.items()})
    return metrics


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class AP (C,) of scores (N, C) against 0/1 targets (N, C) (torchmetrics);
    NaN for a class with no positive, which has no AP (torchmetrics would report 0)."""
    import warnings

    from torchmetrics.functional.classification import multilabel_average_precision

    targets = targets.long()
    present = targets.sum(0) > 0
    with warnings.catch_warnings():  # the absent classes' warning: they are masked below
        warnings.filterwarnings("ignore", message="No positive samples found")
        ap = multilabel_average_precision(
            scores.float(), targets, num_labels=targets.shape[1], average="none"
        )
    return torch.where(present, ap.float(), torch.full_like(ap.float(), float("nan")))


def mean_ap(ap: torch.Tensor) -> float:
    """mAP over the classes that have an AP (at least one positive)."""
    ap = ap[~torch.isnan(ap)]
    return float(ap.mean()) if len(ap) else float("nan")


def multilabel_metrics(
    result: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]], classnames: list[str]
) -> dict[str, float]:
    """Per-client mAP of its own model ('local') over the labels present in that client's
    test split, its summary over clients (`eval/map_*`), the pooled mAP of all clients'
    local predictions (`eval/map_pooled`) and pooled per-class AP (`class/<name>/ap`); the
    global part's mAP over the whole test set (`eval/global`, pooled over the clients'
    shares) and `eval/dual`, the harmonic mean of the mean personal mAP and that."""
    per_client = {}
    for k, r in result.items():
        scores, targets = r["local"]
        per_client[k] = mean_ap(average_precision(scores, targets)) if len(scores) else math.nan
    weights = {k: len(r["local"][0]) for k, r in result.items()}
    metrics = {f"eval/map_{name}": v for name, v in summarize(per_client, weights).items()}
    seen = [k for k in result if len(result[k]["local"][0])]
    if seen:
        pooled = average_precision(
            torch.cat([result[k]["local"][0] for k in seen]),
            torch.cat([result[k]["local"][1] for k in seen]),
        )
        metrics["eval/map_pooled"] = mean_ap(pooled)
        for name, ap in zip(classnames, pooled.tolist(), strict=True):
            metrics[f"class/{name}/ap"] = ap
    shares = [result[k]["global"] for k in result if len(result[k]["global"][0])]
    metrics["eval/global"] = (
        mean_ap(
            average_precision(torch.cat([s for s, _ in shares]), torch.cat([t for _, t in shares]))
        )
        if shares
        else math.nan
    )
    metrics["eval/dual"] = harmonic_mean([metrics["eval/map_mean"], metrics["eval/global"]])
    metrics.update({f"client/{k}/map": v for k, v in per_client.items()})
    return metrics
