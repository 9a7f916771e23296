"""`fedclip compare`: run folders grouped by config keys, mean ± std over seeds, against a
hand computation; runs that differ in a key not grouped by (or in their selection rule)
are flagged; on a suite's runs it gives the suite's numbers."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedclip.cli import main
from fedclip.suites.table import Entry, tex_escape

from .test_suite import ROOT, check_table, suite, table_rows, write_suite

FEDAVG = {"class_path": "fedclip.strategies.FedAvg", "init_args": {"weighted": True}}
LOCAL = {"class_path": "fedclip.strategies.LocalOnly"}


def fake_run(folder: Path, learner: str, seed: int, acc: float, strategy=FEDAVG, **extra):
    """A run folder as a fit leaves it: config.yaml, summary.json, csv/metrics.csv."""
    folder.mkdir(parents=True)
    config = {
        "seed": seed,
        "output_dir": str(folder.parent),
        "run_name": folder.name,
        "learner": {"class_path": f"fedclip.learners.{learner}", "init_args": {"n_ctx": 4}},
        "strategy": strategy,
        "federation": {"rounds": 2},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {
        "rounds_completed": 2,
        "metric": "acc",
        "stopped": None,
        "eval": {"eval/acc_mean": acc, "eval/acc_min": acc - 0.1},
        **extra,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "csv").mkdir()
    lines = ["round,eval/acc_mean", f"0,{acc / 2}", f"1,{acc * 0.8}", f"2,{acc}"]
    (folder / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    return folder


ACCS = {
    ("TextualPrompt", 0): 0.61,
    ("TextualPrompt", 1): 0.64,
    ("TextualPrompt", 2): 0.70,
    ("MixtureOfPrompts", 0): 0.75,
    ("MixtureOfPrompts", 1): 0.72,
}


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for (learner, seed), acc in ACCS.items():
        fake_run(root / f"{learner.lower()}-seed{seed}", learner, seed, acc)
    return root


def compare(*args: str) -> int:
    return main(["compare", *args])


def test_default_groups_by_what_differs_and_aggregates_seeds(runs, tmp_path, capsys):
    assert compare(str(runs), "--out", str(tmp_path / "cmp")) == 0
    out = capsys.readouterr()
    assert "warning" not in out.err
    rows = {r["row"]: r for r in table_rows(tmp_path / "cmp" / "compare.csv")}
    assert set(rows) == {"TextualPrompt", "MixtureOfPrompts"}  # the seeds are not a key
    for learner in ("TextualPrompt", "MixtureOfPrompts"):
        values = [100 * a for (name, _), a in ACCS.items() if name == learner]
        row = rows[learner]
        assert int(row["n"]) == len(values) and row["metric"] == "eval/acc_mean"
        assert float(row["mean"]) == pytest.approx(np.mean(values), rel=1e-12)
        assert float(row["std"]) == pytest.approx(np.std(values, ddof=1), rel=1e-12)
        assert f"| {learner} | {np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} |" in out.out
    assert "| learner | eval/acc_mean |" in out.out
    for ext in ("md", "tex", "png"):
        assert (tmp_path / "cmp" / f"compare.{ext}").stat().st_size > 0
    # two metrics: one column each
    assert compare(str(runs), "--metric=eval/acc_mean", "--metric=eval/acc_min") == 0
    assert "| learner | eval/acc_mean | eval/acc_min |" in capsys.readouterr().out


def test_by_learner_flags_runs_that_differ_in_strategy(runs, capsys):
    fake_run(runs / "local-seed0", "TextualPrompt", 0, 0.5, strategy=LOCAL)
    assert compare(str(runs), "--by", "learner") == 0
    out = capsys.readouterr()
    warnings = [line for line in out.err.splitlines() if "warning" in line]
    # one line for the class, none for its init_args (they differ with the class)
    assert len(warnings) == 1 and "strategy.class_path" in warnings[0]
    assert "local-seed0=LocalOnly" in warnings[0] and "textualprompt-seed0=FedAvg" in warnings[0]
    assert "differ in strategy.class_path (not grouped by)" in out.out
    values = [100 * a for (name, _), a in ACCS.items() if name == "TextualPrompt"] + [50.0]
    assert f"| TextualPrompt | {np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} |" in out.out
    # grouped by learner and strategy: three rows, nothing flagged
    assert compare(str(runs), "--by=learner,strategy") == 0
    out = capsys.readouterr()
    assert "warning" not in out.err and "| TextualPrompt, LocalOnly | 50.00 |" in out.out


def test_a_different_selection_rule_and_unfinished_runs_are_flagged(runs, capsys):
    fake_run(runs / "val", "TextualPrompt", 5, 0.9, selection={"rule": "val", "round": 1})
    stopped = fake_run(runs / "stopped", "TextualPrompt", 6, 0.1)
    summary = json.loads((stopped / "summary.json").read_text())
    (stopped / "summary.json").write_text(json.dumps({**summary, "stopped": {"round": 1}}))
    started = runs / "started"
    started.mkdir()
    (started / "config.yaml").write_text("seed: 7\n")
    (started / "partition.json").write_text("{}")
    assert compare(str(runs)) == 0
    out = capsys.readouterr()
    assert f"{runs / 'val'} reports its 'val' round, the others their 'last' one" in out.err
    assert f"{stopped} is unfinished or stopped; left out" in out.err
    assert f"{started} is unfinished or stopped; left out" in out.err
    assert "Selection: last; val." in out.out


def test_bad_arguments_are_one_line(runs, tmp_path, capsys):
    assert compare(str(runs), "--by", "lerner") == 2
    assert capsys.readouterr().err.strip() == (
        "fedclip compare: error: --by lerner: no such config key in the runs "
        "(did you mean learner?)"
    )
    (tmp_path / "empty").mkdir()
    assert compare(str(tmp_path / "empty")) == 2
    assert "is not a run folder (no summary.json) and holds none" in capsys.readouterr().err
    assert compare(str(runs), "--metric=acc") == 2


def test_entries_and_tex():
    entry = Entry([60.0, 70.0], expected=3, reference=71.25)
    assert entry.text() == "65.00 ± 7.07 [2/3] (71.25)"
    assert entry.text(tex=True) == r"$65.00 \pm 7.07$ {[}2/3{]} (71.25)"
    assert Entry([60.0], 1).text() == "60.00" and Entry([], 2).text() == "– [0/2]"
    assert tex_escape("a_b & 5%") == r"a\_b \& 5\%"


def test_the_commands_import_no_torch():
    probe = (
        "import sys, fedclip.suites.run, fedclip.suites.compare; "
        "print(sorted(m for m in ('torch', 'lightning', 'open_clip') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "[]", done.stderr


# ---- on a suite's runs -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A suite of 2 methods x 2 settings x 2 seeds, one round, run with --jobs 2."""
    root = tmp_path_factory.mktemp("grid")
    settings = [
        {"name": "tungsten"},
        {"name": "plain", "overrides": ["--data.dataset.init_args.style=plain"]},
    ]
    methods = [{"name": "PromptFL", "method": "promptfl"}, {"name": "CoOp", "method": "coop"}]
    reference = {"source": "made up", "values": {"CoOp": {"plain": 50}}}
    path = write_suite(
        root, "grid", rounds=1, methods=methods, settings=settings, reference=reference
    )
    assert suite(path, "--jobs=2") == 0
    return root / "out" / "grid"


@pytest.mark.slow
def test_a_suite_tabulates_methods_by_settings_and_compare_agrees(grid, tmp_path, capsys):
    ids = {
        (m, s): [f"{m.lower()}-{s}-seed{k}" for k in (0, 1)]
        for m in ("PromptFL", "CoOp")
        for s in ("tungsten", "plain")
    }
    check_table(grid, ids, {("CoOp", "plain"): 50.0})
    assert "| method | tungsten | plain |" in (grid / "suite.md").read_text()
    capsys.readouterr()
    # the suite folder stands for its runs; the default groups: strategy x style
    assert compare(str(grid), "--out", str(tmp_path)) == 0
    out = capsys.readouterr()
    assert "warning" not in out.err
    assert "grouped by strategy.class_path, data.dataset.init_args.style" in out.out
    suite_rows = {(r["row"], r["column"]): r for r in table_rows(grid / "suite.csv")}
    strategy = {"PromptFL": "FedAvg", "CoOp": "LocalOnly"}
    with (tmp_path / "compare.csv").open(newline="") as f:
        compared = {r["row"]: r for r in csv.DictReader(f)}
    assert len(compared) == 4
    for (method, setting), row in suite_rows.items():
        other = compared[
            f"{strategy[method]}, style={'plain' if setting == 'plain' else 'tungsten'}"
        ]
        assert (other["mean"], other["std"], other["n"], other["values"]) == (
            row["mean"],
            row["std"],
            row["n"],
            row["values"],
        )
    # by learner alone: the two methods (strategies) fall into one group, flagged
    assert compare(str(grid / "runs"), "--by", "learner,data.dataset") == 0
    out = capsys.readouterr()
    assert "differ in strategy.class_path" in out.err and "(not grouped by)" in out.out
