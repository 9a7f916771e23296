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
    classnames: every class's name (multi-label per-class AP)."""
    own = {k: {p: v for p, v in r.items() if is_own(p)} for k, r in result.items()}
    if multilabel:
        metrics = multilabel_metrics(own, classnames)
    elif base_to_novel:
        metrics = base_to_novel_metrics(own)
    else:
        metrics = accuracy_metrics(own, {k: test_counts[k] for k in result})
    return {**metrics, **model_metrics(result, multilabel, metrics)}


OWN_PARTS = {"local", "global", "base", "novel"}  # the others: `Strategy.evaluation_models`


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
    """A run's summary.json: per-client partition counts with their last evaluation (and
    their round-0 one) and the lists of the learner's last report (e.g. the experts a
    client holds), final metrics, the round-0 baseline, traffic and config.

    data_summary: `FederatedData.summary()`; last_eval: each client's headline metric;
    initial: what round 0 evaluates (`PromptLearner.initial_state`)."""
    part = copy.deepcopy(data_summary)
    start = next((r for r in history if r.get("round") == 0), None)
    for row in part["clients"]:
        row[metric] = last_eval.get(row["client"], float("nan"))
        if start is not None:
            row[f"{metric}_round0"] = start.get(f"client/{row['client']}/{metric}", float("nan"))
        for key, value in reports.get(row["client"], {}).items():
            if isinstance(value, list | tuple):
                row[key] = [int(v) for v in value]
    final = history[-1] if history else {}
    total_up = sum(r.get("traffic/up_bytes", 0.0) for r in history)
    total_down = sum(r.get("traffic/down_bytes", 0.0) for r in history)
    source = cfg.data.dataset
    return {
        "rounds_completed": rounds_completed,
        "global_model": global_model(cfg),
        "clients": part["clients"],
        "eval": {k: v for k, v in final.items() if k.startswith("eval/")},
        "baseline": None
        if start is None
        else {
            "round": 0,
            "initial": initial,
            "eval": {k: v for k, v in start.items() if k.startswith("eval/")},
        },
        "per_class_ap": {
            k[len("class/") : -len("/ap")]: v
            for k, v in final.items()
            if k.startswith("class/") and k.endswith("/ap")
        },
        **(
            {"datasets": {"names": part["datasets"], "metrics": DATASETS_CONVENTION}}
            if part.get("datasets")
            else {}
        ),
        "traffic": {"up_bytes": total_up, "down_bytes": total_down},
        "partition": {"train_counts": part["train_counts"], "test_counts": part["test_counts"]},
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
