"""`fedclip compare RUN_DIR... [--by KEYS] [--metric M]... [--out DIR]`: the table of
`fedclip suite` from existing run folders.

A RUN_DIR is a run folder (config.yaml and summary.json), or a folder with run folders
below it (a suite folder, its runs/, an output_dir), which stands for them. Each run's
config.yaml is flattened to dotted keys; runs are grouped by the values of the --by keys
(a key K covers K and every key under it: `--by learner` is learner.class_path and
learner.init_args.*; default: every key whose value differs among the runs, except the
seed, run_name and output_dir), one row per group, mean ± std over its runs (the seeds).
Runs of one group that differ in a key outside --by, and runs whose selection rule
differs from the others', are flagged (a warning line each, and a note under the table).
Stopped or unfinished runs are left out, with a warning.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from fedclip.errors import UsageError
from fedclip.parsing import closest
from fedclip.suites.table import (
    build_table,
    finished,
    headline,
    markdown,
    read_summary,
    selection_note,
    selection_rule,
    write_table,
)

IGNORED = ("seed", "run_name", "output_dir")  # never a group key (the seeds are aggregated)


def compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedclip compare",
        description="Tabulate run folders: one row per group of runs (mean ± std over "
        "seeds), grouped by config keys; flags runs that differ in a key not grouped by.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run folders, or folders holding them"
    )
    parser.add_argument(
        "--by",
        default=None,
        help="comma-separated config keys to group by, "
        "e.g. learner,data.dataset (default: every key that differs but the seed)",
    )
    parser.add_argument(
        "--metric",
        action="append",
        default=None,
        help="summary.json eval key, e.g. eval/acc_mean (repeatable; default: the runs' headline)",
    )
    parser.add_argument("--out", default=None, help="write compare.md/.csv/.tex/.png here")
    return parser


def _is_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and (folder / "summary.json").is_file()


def _started(folder: Path) -> bool:
    """A run folder, finished or not (a fit writes config.yaml and partition.json first)."""
    return _is_run(folder) or (
        (folder / "config.yaml").is_file() and (folder / "partition.json").is_file()
    )


def find_runs(paths: list[str]) -> tuple[list[Path], list[Path]]:
    """(run folders, unfinished run folders: a config.yaml without summary.json) given or
    below the `paths`, in order, each once."""
    runs: list[Path] = []
    unfinished: list[Path] = []
    for given in map(Path, paths):
        if not given.is_dir():
            raise UsageError(f"{given} is not a folder")
        if _is_run(given):
            runs.append(given)
            continue
        if _started(given):
            unfinished.append(given)
            continue
        below = sorted(p.parent for p in given.rglob("config.yaml") if _started(p.parent))
        below = [p for p in below if not any(q in p.parents for q in below)]  # not nested
        found = [p for p in below if _is_run(p)]
        if not found:
            raise UsageError(f"{given} is not a run folder (no summary.json) and holds none")
        runs += found
        unfinished += [p for p in below if not _is_run(p)]
    return list(dict.fromkeys(runs)), list(dict.fromkeys(unfinished))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A config as {dotted key: value}; lists are values, empty mappings are dropped."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _class_key(key: str) -> str | None:
    """The class_path key an init_args key belongs to ('learner.init_args.n_ctx' ->
    'learner.class_path'), or None."""
    head, sep, _ = key.partition(".init_args.")
    return f"{head}.class_path" if sep else None


def _implied(key: str, configs: list[dict[str, Any]]) -> bool:
    """An init_args key among runs of different classes (it differs with the class)."""
    cls = _class_key(key)
    return cls is not None and len({_key(c.get(cls)) for c in configs}) > 1


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(key: str, value: Any) -> str:
    if key.endswith("class_path") and isinstance(value, str):
        return value.rsplit(".", 1)[-1]
    return f"{key.rsplit('.', 1)[-1]}={value}"


def group_keys(configs: dict[Path, dict[str, Any]], by: str | None) -> list[str]:
    """The flattened keys the runs are grouped by: those the --by keys cover, or every key
    whose value differs among the runs (but IGNORED)."""
    keys = list(dict.fromkeys(k for c in configs.values() for k in c))
    if by is None:
        return [
            k
            for k in keys
            if k not in IGNORED and len({_key(c.get(k)) for c in configs.values()}) > 1
        ]
    chosen: list[str] = []
    for name in [b.strip() for b in by.split(",") if b.strip()]:
        covered = [k for k in keys if k == name or k.startswith(name + ".")]
        if not covered:
            prefixes = {
                ".".join(k.split(".")[: i + 1]) for k in keys for i in range(k.count(".") + 1)
            }
            near = closest(name, prefixes)
            raise UsageError(
                f"--by {name}: no such config key in the runs"
                + (f" (did you mean {near}?)" if near else "")
            )
        chosen += [k for k in covered if k not in chosen]
    return chosen


def _warn(line: str) -> None:
    print(f"fedclip compare: warning: {line}", file=sys.stderr)


def _listing(key: str, runs: list[Path], values: list[Any]) -> str:
    short = [_short(key, v).split("=", 1)[-1] for v in values]
    shown = [f"{r.name}={v}" for r, v in zip(runs, short, strict=True)][:4]
    return ", ".join(shown) + (f", ... ({len(runs)} runs)" if len(runs) > 4 else "")


def compare_table(paths: list[str], by: str | None, metrics: list[str] | None):
    """The comparison table of the run folders `paths` (and the warnings printed)."""
    runs, unfinished = find_runs(paths)
    summaries = {p: read_summary(p) for p in runs}
    stopped = [p for p in runs if not finished(summaries[p])]
    for p in unfinished + stopped:
        _warn(f"{p} is unfinished or stopped; left out")
    runs = [p for p in runs if p not in stopped]
    if not runs:
        raise UsageError("no finished run folders to compare")
    configs = {}
    for p in runs:
        try:
            configs[p] = flatten(yaml.safe_load((p / "config.yaml").read_text()) or {})
        except yaml.YAMLError as e:
            raise UsageError(f"{p / 'config.yaml'} is not valid YAML: {e}") from None
    keys = group_keys(configs, by)
    groups: dict[tuple, list[Path]] = {}
    for p in runs:
        groups.setdefault(tuple(_key(configs[p].get(k)) for k in keys), []).append(p)
    varying = [k for i, k in enumerate(keys) if len({g[i] for g in groups}) > 1]
    labels: dict[tuple, str] = {}
    shown: list[str] = []
    for group, members in groups.items():
        first = configs[members[0]]
        parts = []
        for k in varying:
            if first.get(k) is None:
                continue
            if _class_key(k):  # an init arg is shown where it differs within its class
                cls = _class_key(k)
                peers = [
                    configs[m[0]]
                    for m in groups.values()
                    if configs[m[0]].get(cls) == first.get(cls)
                ]
                if len({_key(c.get(k)) for c in peers}) < 2:
                    continue
            parts.append(_short(k, first[k]))
            shown += [k] if k not in shown else []
        label = ", ".join(parts) or "all runs"
        while label in labels.values():
            label += "'"
        labels[group] = label
    notes = []
    for group, members in groups.items():
        others = [
            k
            for k in dict.fromkeys(k for p in members for k in configs[p])
            if k not in keys and k not in IGNORED
        ]
        for k in others:
            values = [configs[p].get(k) for p in members]
            if len({_key(v) for v in values}) > 1 and not _implied(
                k, [configs[p] for p in members]
            ):
                _warn(f"{labels[group]}: its runs differ in {k} ({_listing(k, members, values)})")
                notes.append(
                    f"Note: the runs in row {labels[group]!r} differ in {k} (not grouped by)."
                )
    rules = {p: selection_rule(summaries[p]) for p in runs}
    common = Counter(rules.values()).most_common(1)[0][0]
    for p in runs:
        if rules[p] != common:
            _warn(f"{p} reports its {rules[p]!r} round, the others their {common!r} one")
            notes.append(f"Note: {p.name} is selected by {rules[p]!r}, the others by {common!r}.")
    finished_summaries = [summaries[p] for p in runs]
    metrics = metrics or list(dict.fromkeys(headline(s) for s in finished_summaries))
    rows = [labels[g] for g in groups]
    table_runs = {(labels[g], ""): (members, len(members)) for g, members in groups.items()}
    head = (
        ", ".join(
            k.rsplit(".", 1)[-1] if not k.endswith("class_path") else k.split(".")[0] for k in shown
        )
        or "runs"
    )
    notes = [
        f"Metric: {', '.join(metrics)} in %, mean ± sample std over each group's runs; "
        f"grouped by {', '.join(varying) or 'nothing (one group)'}.",
        selection_note(finished_summaries),
        *dict.fromkeys(notes),
    ]
    title = f"Comparison of {len(runs)} runs"
    return build_table(title, rows, [""], metrics, table_runs, None, notes, row_header=head)


def cmd_compare(argv: list[str]) -> int:
    ns = compare_parser().parse_args(argv)
    if ns.metric:
        bad = [m for m in ns.metric if not m.startswith("eval/")]
        if bad:
            raise UsageError(f"--metric {bad[0]}: a summary.json eval key such as eval/acc_mean")
    table = compare_table(ns.runs, ns.by, ns.metric)
    print(markdown(table), end="")
    if ns.out:
        paths = write_table(table, Path(ns.out), "compare")
        print(f"written: {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0
