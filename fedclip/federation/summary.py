"""A run's results as plain data: the logged evaluation metrics and summary.json."""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any

from fedclip.metrics import base_to_novel_metrics, multilabel_metrics, summarize
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
    if multilabel:
        return multilabel_metrics(result, classnames)
    if base_to_novel:
        return base_to_novel_metrics(result)
    s = summarize(result, {k: test_counts[k] for k in result})
    metrics = {f"eval/acc_{name}": v for name, v in s.items()}
    metrics.update({f"client/{k}/acc": v for k, v in result.items()})
    return metrics


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
) -> dict[str, Any]:
    """A run's summary.json: per-client partition counts with their last evaluation and
    the lists of the learner's last report (e.g. the experts a client holds), final metrics,
    traffic and config.

    data_summary: `FederatedData.summary()`; last_eval: each client's headline metric."""
    part = copy.deepcopy(data_summary)
    for row in part["clients"]:
        row[metric] = last_eval.get(row["client"], float("nan"))
        for key, value in reports.get(row["client"], {}).items():
            if isinstance(value, list | tuple):
                row[key] = [int(v) for v in value]
    final = history[-1] if history else {}
    total_up = sum(r.get("traffic/up_bytes", 0.0) for r in history)
    total_down = sum(r.get("traffic/down_bytes", 0.0) for r in history)
    source = cfg.data.dataset
    return {
        "rounds_completed": rounds_completed,
        "clients": part["clients"],
        "eval": {k: v for k, v in final.items() if k.startswith("eval/")},
        "per_class_ap": {
            k[len("class/") : -len("/ap")]: v
            for k, v in final.items()
            if k.startswith("class/") and k.endswith("/ap")
        },
        "traffic": {"up_bytes": total_up, "down_bytes": total_down},
        "partition": {"train_counts": part["train_counts"], "test_counts": part["test_counts"]},
        "config": {
            "learner": type(cfg.learner).__name__,
            "strategy": type(cfg.strategy).__name__,
            "dataset": getattr(source, "name", type(source).__name__),
            "backbone": cfg.backbone.model,
        },
        "optim": asdict(cfg.optim),
        "metric": metric,
        "failures": failures,
        "privacy": {
            **asdict(privacy.cfg),
            "epsilon": final.get("privacy/epsilon") if privacy.enabled else None,
        },
    }
