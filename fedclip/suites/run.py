"""`fedclip suite --config S.yaml`: run a grid of `fedclip fit` runs and tabulate them.

Every cell (method x setting x seed, `fedclip.suites.spec`) is an ordinary run folder,
<suite_dir>/runs/<method>-<setting>-seed<S>, its output in <suite_dir>/runs/<cell>.log.
Before anything runs, every cell's config is parsed and built in-process (a bad flag
stops the suite naming its cell) and checked for what it needs on this machine
(`fedclip.suites.requirements`); <suite_dir>/suite.json records each cell's argv and
resolved config, and a later run of a changed suite is refused, naming what changed. A
finished cell is skipped, an interrupted one continues from its checkpoint (--resume).
At the end: suite.md, suite.csv, suite.tex and suite.png in <suite_dir>.

Exit codes: 0 every cell finished; 1 some cell failed (listed with its log; the tables
hold what finished); 2 bad input, nothing run; 130 Ctrl-C or SIGTERM: the running cells
are stopped after a checkpoint and continue on the next run.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from fedclip.errors import UsageError, one_line, user_error
from fedclip.suites.fields import flags
from fedclip.suites.pool import Job, command_line, run_jobs
from fedclip.suites.spec import Cell, Suite, load_suite
from fedclip.suites.table import (
    Table,
    build_table,
    finished,
    headline,
    markdown,
    read_summary,
    selection_note,
    write_table,
)

FORMAT, VERSION = "fedclip-suite", 1
VOLATILE = ("run_name", "output_dir")  # where a cell's run goes, not what it computes


def suite_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedclip suite",
        description="Run a suite of fedclip fit runs (methods x settings x seeds) and write "
        "its table (suite.md/.csv/.tex/.png in the suite folder). Resumable: finished cells "
        "are skipped, interrupted ones continue from their checkpoint.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="the suite file (YAML)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (default 1)")
    parser.add_argument(
        "--print-commands",
        "--print_commands",
        action="store_true",
        help="print one `fedclip fit` line per cell (a SLURM array's lines; finished ones "
        "commented '# done:'), write the composed configs, run nothing",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="FLAG",
        help="a fit flag for every cell, e.g. --override=--backbone.model=fedclip-tiny-vit "
        "(repeatable; part of the suite's identity)",
    )
    parser.add_argument("--output_dir", default=None, help="instead of the suite's output_dir")
    parser.add_argument("--only", default=None, metavar="GLOB", help="run only these cells")
    return parser


def _config_text(suite: Suite, row) -> str:
    head = f"# composed by fedclip suite {suite.path} (row {row.name!r}) from {row.source}\n"
    return head + yaml.safe_dump(row.config, sort_keys=False)


def resolve(suite: Suite, cells: list[Cell]) -> dict[str, tuple[Any, dict[str, Any]]]:
    """{cell id: (FitConfig, plain config)} of every cell, parsed and built as `fedclip fit`
    does; UsageError naming the cell for a flag or value no run can take."""
    from fedclip.config import build_fit_config, check_config_files, fit_parser
    from fedclip.federation.settings import check_config
    from fedclip.parsing import parse_args

    out = {}
    with tempfile.TemporaryDirectory(prefix="fedclip-suite-") as tmp:
        for row in suite.rows:
            (Path(tmp) / f"{row.slug}.yaml").write_text(_config_text(suite, row))
        for cell in cells:
            final = cell.argv[2]
            argv = [*cell.argv[1:]]
            argv[1] = str(Path(tmp) / Path(final).name)
            try:
                check_config_files(argv)
                parser = fit_parser()
                cfg, plain = build_fit_config(parser, parse_args(parser, argv))
                check_config(cfg)
            except Exception as e:
                bad = user_error(e)
                if bad is None:
                    raise
                line = one_line(str(bad)).replace(argv[1], final)
                raise UsageError(f"cell {cell.id}: {line}") from e
            out[cell.id] = (cfg, plain)
    return out


def identity(plain: dict[str, Any]) -> dict[str, Any]:
    """What a cell computes: its resolved config without VOLATILE, as JSON data."""
    return json.loads(json.dumps({k: v for k, v in plain.items() if k not in VOLATILE}))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flat(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def differences(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """'key saved -> given' of every dotted key where two configs differ."""
    a, b = _flat(saved), _flat(given)
    absent = "(absent)"
    return [
        f"{k} {_show(a.get(k, absent))} -> {_show(b.get(k, absent))}"
        for k in sorted(set(a) | set(b))
        if a.get(k, absent) != b.get(k, absent)
    ]


def _names(ids: list[str]) -> str:
    return ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")


def check_unchanged(folder: Path, cells: list[Cell], configs: dict[str, dict]) -> None:
    """Refuse (UsageError, one line) a suite folder made by a different suite: cells added or
    removed, or a cell whose resolved config (saved in suite.json, or in its run folder's
    config.yaml) differs from the one given now."""
    record = folder / "suite.json"
    saved: dict[str, Any] = {}
    if record.is_file():
        try:
            saved = json.loads(record.read_text())["cells"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UsageError(f"{record} is not a fedclip suite record; remove it") from None
    problems, changes = [], {}
    if saved:
        added = [c.id for c in cells if c.id not in saved]
        removed = [cid for cid in saved if cid not in configs]
        problems += [f"cells added: {_names(added)}"] if added else []
        problems += [f"cells removed: {_names(removed)}"] if removed else []
    for cell in cells:
        before = (saved.get(cell.id) or {}).get("config")
        run_config = cell.run_dir / "config.yaml"
        if before is None and run_config.is_file():
            try:
                before = identity(yaml.safe_load(run_config.read_text()) or {})
            except (OSError, yaml.YAMLError):
                raise UsageError(f"{run_config} is not valid YAML") from None
        diff = differences(before, configs[cell.id]) if before is not None else []
        if diff:
            text = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
            changes.setdefault(text, []).append(cell.id)
    for text, ids in list(changes.items())[:3]:
        problems.append(f"{'cell' if len(ids) == 1 else 'cells'} {_names(ids)}: {text}")
    if problems:
        raise UsageError(
            f"{folder} was made by a different suite: {'; '.join(problems)} (give the suite "
            "a new name or --output_dir, or remove that folder)"
        )


def status(cell: Cell, plain: dict[str, Any]) -> str:
    """'done' (finished every round), 'resume' (has a checkpoint) or 'new'."""
    if finished(read_summary(cell.run_dir), plain["federation"]["rounds"]):
        return "done"
    return "resume" if (cell.run_dir / "checkpoints" / "last.ckpt").is_file() else "new"


def _write_folder(suite: Suite, folder: Path, cells: list[Cell], configs: dict) -> None:
    from fedclip.checkpoint import write_text_atomic

    for row in suite.rows:
        write_text_atomic(folder / "configs" / f"{row.slug}.yaml", _config_text(suite, row))
    cells_record = {c.id: {"argv": list(c.argv), "config": configs[c.id]} for c in cells}
    record = {"format": FORMAT, "version": VERSION, "suite": str(suite.path), "cells": cells_record}
    write_text_atomic(folder / "suite.json", json.dumps(record, indent=1))


def suite_table(suite: Suite, folder: Path, cells: list[Cell], rounds: dict[str, int]) -> Table:
    """The suite's table from its finished cells."""
    done = [c for c in cells if finished(read_summary(c.run_dir), rounds[c.id])]
    summaries = [read_summary(c.run_dir) or {} for c in done]
    metrics = suite.metrics or list(dict.fromkeys(headline(s) for s in summaries))
    metrics = metrics or ["eval/acc_mean"]
    runs: dict[tuple[str, str], tuple[list[Path], int]] = {}
    for row in suite.rows:
        for setting in suite.settings:
            ours = [c for c in done if c.row == row.name and c.column == setting.name]
            runs[(row.name, setting.name)] = ([c.run_dir for c in ours], len(suite.seeds))
    notes = [suite.description] if suite.description else []
    notes.append(
        f"Metric: {', '.join(metrics)} in %, mean ± sample std over seeds "
        f"{', '.join(map(str, suite.seeds))} ([n/N]: n of N seeds finished)."
    )
    if suite.reference:
        notes.append(
            f"In parentheses: reference numbers, {suite.reference_source or 'source not given'}."
        )
    notes.append(selection_note(summaries))
    notes.append(f"Run folders: {folder / 'runs'}; suite file: {suite.path}.")

    def reference(row: str, column: str, metric: str) -> float | None:
        return suite.reference_value(row, column, metric, metrics[0])

    rows, columns = [r.name for r in suite.rows], [s.name for s in suite.settings]
    return build_table(f"Suite {suite.name}", rows, columns, metrics, runs, reference, notes)


def _say(line: str) -> None:
    print(f"fedclip suite: {line}", file=sys.stderr, flush=True)


def cmd_suite(argv: list[str]) -> int:
    from fedclip.suites.requirements import missing_pieces

    ns = suite_parser().parse_args(argv)
    if ns.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {ns.jobs}")
    suite = load_suite(ns.config)
    extra = flags("the command line", "--override", ns.override)
    folder = suite.folder(ns.output_dir)
    cells = suite.cells(folder, extra)
    built = resolve(suite, cells)
    configs = {cid: identity(plain) for cid, (_, plain) in built.items()}
    check_unchanged(folder, cells, configs)
    selected = [c for c in cells if ns.only is None or fnmatch.fnmatch(c.id, ns.only)]
    if not selected:
        raise UsageError(
            f"--only {ns.only!r} matches no cell (cells: {_names([c.id for c in cells])})"
        )
    state = {c.id: status(c, built[c.id][1]) for c in selected}
    todo = [c for c in selected if state[c.id] != "done"]
    missing = list(dict.fromkeys(line for c in todo for line in missing_pieces(built[c.id][0])))
    if ns.print_commands:
        for line in missing:
            _say(f"missing (on this machine): {line}")
        _write_folder(suite, folder, cells, configs)
        for c in selected:
            resume = ("--resume=true",) if state[c.id] == "resume" else ()
            line = command_line((*c.argv, *resume))
            print(f"# done: {line}" if state[c.id] == "done" else line)
        return 0
    if missing:
        for line in missing:
            _say(f"missing: {line}")
        return 2
    _write_folder(suite, folder, cells, configs)
    if len(selected) > len(todo):
        _say(f"{len(selected) - len(todo)} of {len(selected)} cells finished already: skipped")
    rounds = {cid: plain["federation"]["rounds"] for cid, (_, plain) in built.items()}
    jobs = [
        Job(
            c,
            (*c.argv, "--resume=true") if state[c.id] == "resume" else c.argv,
            c.run_dir.with_name(c.run_dir.name + ".log"),
            state[c.id] == "resume",
        )
        for c in todo
    ]
    first = suite.metrics[0] if suite.metrics else None

    def detail(job: Job) -> str:
        summary = read_summary(job.cell.run_dir) or {}
        metric = first or headline(summary)
        value = (summary.get("eval") or {}).get(metric)
        return f"{metric} {100 * value:.1f}" if isinstance(value, int | float) else "no metric"

    try:
        outcomes = run_jobs(jobs, ns.jobs, detail)
    except KeyboardInterrupt:
        _say(
            f"interrupted; the running cells were stopped after a checkpoint (continue: "
            f"fedclip suite --config {ns.config})"
        )
        return 130
    table = suite_table(suite, folder, cells, rounds)
    write_table(table, folder, "suite")
    print(markdown(table), end="")
    failed = [o for o in outcomes if o.code != 0]
    if failed:
        _say(f"{len(failed)} of {len(jobs)} cells failed:")
        for o in failed:
            print(f"  {o.job.cell.id} (exit {o.code}): {o.job.log}", file=sys.stderr)
        return 1
    return 0
