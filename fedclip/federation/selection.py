"""Which evaluated round a run reports (`federation.select`): the last one, or the one with
the best validation metric (`data.val_fraction`), whose test metrics are then reported.

Every evaluation computes both the validation and the test metrics, so the choice needs no
extra checkpoint: it is read from the history. The test metrics never choose a round.
"""

from __future__ import annotations

import math
from typing import Any

from fedclip.tracking import headline_metric


def select_key(select: str, select_by: str | None, multilabel: bool, base_to_novel: bool):
    """The validation metric `select: val` maximises: `select_by`, or `val/` + the
    headline's name (val/acc_mean, val/map_mean; val/acc_mean under base-to-novel, whose
    headline eval/hm has no validation counterpart); None for `select: last`."""
    if select != "val":
        return None
    if select_by is not None:
        return select_by
    headline = headline_metric(multilabel, False)  # eval/hm: no validation counterpart
    return "val/" + headline[len("eval/") :]


def is_evaluated(row: dict[str, Any]) -> bool:
    """A history row that holds an evaluation (test metrics)."""
    return any(key.startswith("eval/") for key in row)


def select_round(history: list[dict[str, Any]], select: str, by: str | None):
    """(the reported row or None, summary.json's `selection`).

    Candidates: the evaluated rows of trained rounds (round 0 only when none was). `last`:
    the last of them; `val`: the one with the largest finite `by` (ties: the earliest), or,
    when no candidate has one, the last (the note says so)."""
    rows = [r for r in history if is_evaluated(r)]
    trained = [r for r in rows if r.get("round", 0) >= 1]
    candidates = trained or rows
    chosen, note = None, "no round was evaluated: eval is empty"
    if candidates:
        chosen = candidates[-1]
        note = "eval: the test metrics of the last evaluated round"
    if select == "val" and candidates:
        scored = [r for r in candidates if _finite(r.get(by))]
        if scored:
            chosen = max(scored, key=lambda r: (r[by], -r["round"]))
            note = (
                f"eval: the test metrics of the round with the best {by} on the clients' "
                "validation splits (ties: the earliest), not the best test round"
            )
        else:
            note = f"no evaluated round has a finite {by}: eval is the last evaluated round's"
    selection = {
        "rule": select,
        "round": None if chosen is None else int(chosen["round"]),
        "by": by if select == "val" else None,
        "rounds_evaluated": len(trained),
        "note": note,
    }
    return chosen, selection


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
