"""What rounds and runs report: round metrics, the failure limit, evaluation metrics and
summary.json."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict
from typing import Any

import torch

from fedclip.errors import FederationError
from fedclip.federation.selection import select_key, select_round
from fedclip.metrics import (
    DATASETS_CONVENTION,
    accuracy_metrics,
    average_precision,
    base_to_novel_metrics,
    harmonic_mean,
    mean_ap,
    multilabel_metrics,
    pooled_accuracy,
)
from fedclip.privacy import DifferentialPrivacy


def eval_metrics(
    result: dict[int, Any],
    multilabel: bool,
    base_to_novel: bool,
    test_counts: dict[int, int],
    classnames: list[str],
) -> dict[str, float]:
    """The logged evaluation metrics of {client: `Federation.evaluate_one` result}.

    test_counts: each client's test-sample count (weights of `eval/acc_weighted`);
    classnames: every class's name (multi-label per-class AP). The validation parts
    ('val_local', 'val_global') give the `val/*` metrics (`val_metrics`)."""
    tested = {k: {p: v for p, v in r.items() if not is_val(p)} for k, r in result.items()}
    own = {k: {p: v for p, v in r.items() if is_own(p)} for k, r in tested.items()}
    if multilabel:
        metrics = multilabel_metrics(own, classnames)
    elif base_to_novel:
        metrics = base_to_novel_metrics(own)
    else:
        metrics = accuracy_metrics(own, {k: test_counts[k] for k in result})
    validation = val_metrics(result, multilabel, classnames)
    return {**metrics, **model_metrics(tested, multilabel, metrics), **validation}


OWN_PARTS = {"local", "global", "base", "novel"}  # the others: `Strategy.evaluation_models`


def is_val(part: str) -> bool:
    """A part of the validation split ('val_local', 'val_global')."""
    return part.startswith("val_")


def val_metrics(result: dict[int, Any], multilabel: bool, classnames: list[str]) -> dict:
    """The validation metrics of the parts 'val_local' and 'val_global' (`data.val_fraction`;
    {} without them): the single-label (or multi-label) report of the test split, the
    validation split in place of the test one, as `val/...` (`val/acc_mean`, `val/acc_min`,
    `val/global`, `val/dual`; `val/map_mean`, ...) and `client/K/val_<metric>`; weighted by
    the validation-sample counts. Under base-to-novel the validation split holds only base
    classes: `val/acc_*` are local, `val/global` the global part on them."""
    held = {k: r for k, r in result.items() if "val_local" in r and "val_global" in r}
    if not held:
        return {}
    parts = {k: {"local": r["val_local"], "global": r["val_global"]} for k, r in held.items()}
    if multilabel:
        found = multilabel_metrics(parts, classnames)  # (its per-class APs are left out)
    else:
        found = accuracy_metrics(parts, {k: r["val_local"][1] for k, r in held.items()})
    out: dict[str, float] = {}
    for key, value in found.items():
        if key.startswith("eval/"):
            out[f"val/{key[len('eval/') :]}"] = value
        elif (m := re.match(r"^client/(\d+)/(.+)$", key)) is not None:
            out[f"client/{m.group(1)}/val_{m.group(2)}"] = value
    return out


def is_own(part: str) -> bool:
    """A part of the model's own evaluation ('base', or 'base/<data set>' over several)."""
    return part.split("/", 1)[0] in OWN_PARTS


def model_metrics(result: dict[int, Any], multilabel: bool, own: dict[str, float]) -> dict:
    """`eval/global_<name>` of each further evaluation model (`Payload.models`), pooled
    over the clients' shares as `eval/global`; under base-to-novel also `eval/base_<name>`,
    `eval/novel_<name>` and `eval/hm_<name>` (with the same local accuracy)."""
    parts = sorted({p for r in result.values() for p in r if not is_own(p)})
    metrics: dict[str, float] = {}
    for part in parts:
        if multilabel:
            shares = [r[part] for r in result.values() if part in r and len(r[part][0])]
            metrics[f"eval/{part}"] = math.nan
            if shares:
                scores = torch.cat([s for s, _ in shares]), torch.cat([t for _, t in shares])
                metrics[f"eval/{part}"] = mean_ap(average_precision(*scores))
        else:
            held = {k: r for k, r in result.items() if part in r}
            metrics[f"eval/{part}"] = pooled_accuracy(held, part)
    per_dataset: dict[str, list[float]] = {}  # several data sets: 'base_<name>/<d>'
    for part in parts:
        if "/" in part:
            per_dataset.setdefault(part.split("/", 1)[0], []).append(metrics[f"eval/{part}"])
    for part, values in per_dataset.items():  # averaged over data sets, as the own parts
        metrics[f"eval/{part}"] = sum(values) / len(values)
    parts = sorted({p.split("/", 1)[0] for p in parts})
    for part in parts:
        if part.startswith("base_"):
            name = part[len("base_") :]
            base = metrics[f"eval/{part}"]
            novel = metrics.get(f"eval/novel_{name}", math.nan)
            metrics[f"eval/global_{name}"] = base
            metrics[f"eval/hm_{name}"] = harmonic_mean([own["eval/local"], base, novel])
    return metrics


def last_evaluation(history: list[dict[str, float]], metric: str) -> dict[int, float]:
    """Each client's headline metric (`client/K/<metric>`: 'acc', the local accuracy under
    base-to-novel too, or 'map') in the last evaluated row of `history`, as
    `RoundLoop.evaluation_metrics` kept it when it evaluated that row: what a loop restored
    from a checkpoint reports. An evaluated row is one with `eval/<metric>_mean`."""
    pattern = re.compile(rf"^client/(\d+)/{re.escape(metric)}$")
    for row in reversed(history):
        if f"eval/{metric}_mean" not in row:
            continue
        found = {int(m.group(1)): v for key, v in row.items() if (m := pattern.match(key))}
        if found:
            return found
    return {}


def run_summary(
    cfg,
    data_summary: dict[str, Any],
    history: list[dict[str, float]],
    last_eval: dict[int, float],
    reports: dict[int, dict[str, Any]],
    rounds_completed: int,
    failures: list[dict[str, Any]],
    privacy: DifferentialPrivacy,
    metric: str,
    initial: str = "",
) -> dict[str, Any]:
    """A run's summary.json: per-client partition counts with their reported evaluation
    (and their round-0 one) and the lists of the learner's last report (e.g. the experts a
    client holds), the reported round's test (`eval`) and validation (`val`) metrics and
    which rule chose that round (`selection`, `fedclip.federation.selection`; `eval_last`:
    the last round's under `select: val`), the round-0 baseline, traffic and config.

    data_summary: `FederatedData.summary()`; last_eval: each client's headline metric in
    the last evaluation; initial: what round 0 evaluates (`PromptLearner.initial_state`)."""
    fed = cfg.federation
    by = select_key(fed.select, fed.select_by, metric == "map", cfg.data.base_to_novel)
    chosen, selection = select_round(history, fed.select, by)
    reported = chosen or {}
    part = copy.deepcopy(data_summary)
    start = next((r for r in history if r.get("round") == 0), None)
    for row in part["clients"]:
        k = row["client"]
        row[metric] = last_eval.get(k, float("nan"))
        if fed.select == "val":  # the selected round's, as `eval`
            row[metric] = reported.get(f"client/{k}/{metric}", float("nan"))
        if f"client/{k}/val_{metric}" in reported:
            row[f"val_{metric}"] = reported[f"client/{k}/val_{metric}"]
        if start is not None:
            row[f"{metric}_round0"] = start.get(f"client/{row['client']}/{metric}", float("nan"))
        for key, value in reports.get(row["client"], {}).items():
            if isinstance(value, list | tuple):
                row[key] = [int(v) for v in value]
    final = history[-1] if history else {}
    last = select_round(history, "last", None)[0] or {}
    total_up = sum(r.get("traffic/up_bytes", 0.0) for r in history)
    total_down = sum(r.get("traffic/down_bytes", 0.0) for r in history)
    source = cfg.data.dataset
    return {
        "rounds_completed": rounds_completed,
        "global_model": global_model(cfg),
        "clients": part["clients"],
        "eval": {k: v for k, v in reported.items() if k.startswith("eval/")},
        "val": {k: v for k, v in reported.items() if k.startswith("val/")},
        "selection": selection,
        **(
            {"eval_last": {k: v for k, v in last.items() if k.startswith("eval/")}}
            if fed.select == "val"
            else {}
        ),
        "baseline": None
        if start is None
        else {
            "round": 0,
            "initial": initial,
            "eval": {k: v for k, v in start.items() if k.startswith("eval/")},
        },
        "per_class_ap": {
            k[len("class/") : -len("/ap")]: v
            for k, v in reported.items()
            if k.startswith("class/") and k.endswith("/ap")
        },
        **(
            {"datasets": {"names": part["datasets"], "metrics": DATASETS_CONVENTION}}
            if part.get("datasets")
            else {}
        ),
        "traffic": {"up_bytes": total_up, "down_bytes": total_down},
        "partition": {
            key: part[key] for key in ("train_counts", "val_counts", "test_counts") if key in part
        },
        "config": {
            "learner": type(cfg.learner).__name__,
            "strategy": type(cfg.strategy).__name__,
            "dataset": getattr(source, "name", type(source).__name__),
            "backbone": cfg.backbone.model,
        },
        "federation": {
            "rounds": cfg.federation.rounds,
            "fraction": cfg.federation.fraction,
            "local_epochs": cfg.federation.local_epochs,
            "local_steps": cfg.federation.local_steps,
            "clients": len(part["clients"]),
            "eval_every": cfg.federation.eval_every,
        },
        "optim": asdict(cfg.optim),
        "metric": metric,
        "failures": failures,
        "privacy": {
            **asdict(privacy.cfg),
            "epsilon": final.get("privacy/epsilon") if privacy.enabled else None,
        },
    }


def global_model(cfg) -> str:
    """What `eval/global` evaluates: the learner's global part under the server's
    aggregate, or, for a strategy that aggregates nothing, each client's own model."""
    if not type(cfg.strategy).collects_uploads:
        return "no aggregate: each client's own model on its share of the whole test set"
    return f"the aggregate; {type(cfg.learner).global_description}"


def round_metrics(
    record, aggregation: dict[str, float], privacy: dict[str, float]
) -> dict[str, float]:
    """A round's metrics before evaluation: `round`, `privacy/*`, `train/*`, `client/K/*`,
    `server/*` and `traffic/*`, from its `RoundRecord`."""
    metrics: dict[str, float] = {"round": float(record.round + 1), **privacy}
    losses = record.losses
    finite = [v for v in losses.values() if not math.isnan(v)]
    metrics["train/loss_mean"] = sum(finite) / len(finite) if finite else float("nan")
    metrics.update({f"client/{k}/train_loss": v for k, v in losses.items()})
    metrics.update(record.metrics)
    metrics.update({f"server/{k}": v for k, v in aggregation.items()})
    metrics["train/failed_clients"] = float(len(record.failures))
    metrics.update({f"client/{f['client']}/failed": 1.0 for f in record.failures})
    metrics["traffic/down_bytes"] = float(record.down)
    metrics["traffic/up_bytes"] = float(record.up)
    metrics["traffic/sampled_clients"] = float(len(record.sampled))
    return metrics


def too_many(record, limit: int | None, client_traceback: str | None = None) -> None:
    """Raise FederationError when a round's failures exceed `limit`
    (federation.max_client_failures; None: when every sampled client failed). The error
    carries the last failing client's traceback (`client_traceback`)."""
    failed = len(record.failures)
    if (limit is not None and failed > limit) or (
        limit is None and failed and failed == len(record.sampled)
    ):
        allowed = (
            "every sampled client failed"
            if limit is None
            else f"{failed} clients failed, more than federation.max_client_failures={limit}"
        )
        last = record.failures[-1]
        error = FederationError(
            f"round {record.round + 1}: {allowed}; last: client {last['client']}, {last['reason']}"
        )
        error.client_traceback = client_traceback  # type: ignore[attr-defined]
        raise error
