"""The table of `fedclip suite` and `fedclip compare`: final metrics of run folders, mean ±
sample std over seeds, as Markdown, long-form CSV, LaTeX (booktabs) and a PNG of curves.

A run's value is 100 x its summary.json `eval[metric]` (the reported test metrics, at the
round its selection rule chose: summary.json `selection.rule`, 'last' when absent); its
curve is that metric per round from csv/metrics.csv. An entry (row, column, metric) holds
the values of its finished runs: `mean ± std` (ddof 1; one run: the mean alone), `[n/N]`
when only n of its N runs are there, and the reference number in parentheses when given.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """A run folder's summary.json, or None when it is absent or not whole JSON."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def finished(summary: dict[str, Any] | None, rounds: int | None = None) -> bool:
    """A summary of a run that was not stopped and (with `rounds`) did every round."""
    if not summary or summary.get("stopped"):
        return False
    return rounds is None or summary.get("rounds_completed") == rounds


def headline(summary: dict[str, Any]) -> str:
    """The run's headline metric (`fedclip.tracking.headline_metric`), from its summary:
    multi-label when its metric is 'map', base-to-novel when it reports eval/hm."""
    from fedclip.tracking import headline_metric

    base_to_novel = "eval/hm" in (summary.get("eval") or {})
    return headline_metric(summary.get("metric") == "map", base_to_novel)


def selection(summary: dict[str, Any]) -> str:
    """How the reported round was chosen: 'last', or e.g. 'val (round 7, by eval/acc_mean)'."""
    chosen = summary.get("selection") or {}
    rule = str(chosen.get("rule", "last"))
    if rule == "last":
        return rule
    return f"{rule} (by {chosen['by']})" if chosen.get("by") else rule


def selection_rule(summary: dict[str, Any]) -> str:
    return str((summary.get("selection") or {}).get("rule", "last"))


def read_curve(run_dir: Path, metric: str) -> dict[int, float]:
    """{round: 100 x metric} from a run's csv/metrics.csv (the last row of a round wins)."""
    path = Path(run_dir) / "csv" / "metrics.csv"
    curve: dict[int, float] = {}
    try:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                value, rnd = row.get(metric), row.get("round")
                if value not in (None, "") and rnd not in (None, ""):
                    curve[int(float(rnd))] = 100 * float(value)
    except (OSError, ValueError, csv.Error):
        return {}
    return curve


@dataclass
class Entry:
    """The values (percent) of one (row, column, metric) over its runs."""

    values: list[float]
    expected: int
    reference: float | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else None

    def text(self, tex: bool = False) -> str:
        pm = r" \pm " if tex else " ± "
        if not self.values:
            body = "--" if tex else "–"
        elif self.std is None:
            body = f"{self.mean:.2f}"
        else:
            body = f"{self.mean:.2f}{pm}{self.std:.2f}"
        if tex and self.values:
            body = f"${body}$"
        if self.n < self.expected:
            body += (
                r" {[}" + f"{self.n}/{self.expected}" + r"{]}"
                if tex
                else f" [{self.n}/{self.expected}]"
            )
        if self.reference is not None:
            body += f" ({self.reference:.2f})"
        return body


@dataclass
class Table:
    """Rows x columns x metrics of entries, the runs behind each (row, column) for the
    curves, and the notes printed under the table."""

    title: str
    rows: list[str]
    columns: list[str]  # '' for a table whose columns are its metrics alone
    metrics: list[str]
    entries: dict[tuple[str, str, str], Entry]
    runs: dict[tuple[str, str], list[Path]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    row_header: str = "method"

    def headers(self) -> list[tuple[str, str, str]]:
        """(label, column, metric) of every value column."""
        out = []
        for column in self.columns:
            for metric in self.metrics:
                if not column or len(self.columns) == 1 and len(self.metrics) > 1:
                    label = metric
                elif len(self.metrics) == 1:
                    label = column
                else:
                    label = f"{column} {metric}"
                out.append((label, column, metric))
        return out


def build_table(
    title: str,
    rows: list[str],
    columns: list[str],
    metrics: list[str],
    runs: dict[tuple[str, str], tuple[list[Path], int]],
    reference: Any = None,
    notes: list[str] | None = None,
    row_header: str = "method",
) -> Table:
    """The table of `runs`: {(row, column): (its finished run folders, runs expected)};
    reference(row, column, metric) -> number or None."""
    entries: dict[tuple[str, str, str], Entry] = {}
    found: dict[tuple[str, str], list[Path]] = {}
    for row in rows:
        for column in columns:
            folders, expected = runs.get((row, column), ([], 0))
            found[(row, column)] = list(folders)
            summaries = [read_summary(p) or {} for p in folders]
            for metric in metrics:
                values = [
                    100 * float(s["eval"][metric])
                    for s in summaries
                    if metric in (s.get("eval") or {})
                ]
                ref = reference(row, column, metric) if reference else None
                entries[(row, column, metric)] = Entry(values, expected, ref)
    return Table(title, rows, columns, metrics, entries, found, list(notes or []), row_header)


def selection_note(summaries: list[dict[str, Any]]) -> str:
    """The notes' line on how each run's reported round was chosen."""
    rules = sorted({selection(s) for s in summaries})
    if not rules:
        return "Selection: no finished runs."
    if rules == ["last"]:
        return "Selection: the last round of every run."
    return "Selection: " + "; ".join(rules) + "."


# ---- writers ---------------------------------------------------------------------------------
def markdown(table: Table) -> str:
    headers = table.headers()
    lines = [f"## {table.title}", ""]
    lines.append("| " + " | ".join([table.row_header, *(h for h, _, _ in headers)]) + " |")
    lines.append("|" + "---|" * (len(headers) + 1))
    for row in table.rows:
        cells = [table.entries[(row, c, m)].text() for _, c, m in headers]
        lines.append("| " + " | ".join([row, *cells]) + " |")
    if table.notes:
        lines += ["", *table.notes]
    return "\n".join(lines) + "\n"


def long_csv(table: Table) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["row", "column", "metric", "mean", "std", "n", "values", "reference"])
    for row in table.rows:
        for column in table.columns:
            for metric in table.metrics:
                e = table.entries[(row, column, metric)]
                writer.writerow(
                    [
                        row,
                        column,
                        metric,
                        "" if e.mean is None else repr(e.mean),
                        "" if e.std is None else repr(e.std),
                        e.n,
                        ";".join(repr(v) for v in e.values),
                        "" if e.reference is None else repr(float(e.reference)),
                    ]
                )
    return out.getvalue()


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


def latex(table: Table) -> str:
    headers = table.headers()
    lines = [f"% {tex_escape(table.title)}", r"\begin{tabular}{l" + "c" * len(headers) + "}"]
    lines.append(r"\toprule")
    lines.append(
        " & ".join(tex_escape(h) for h in [table.row_header, *(h for h, _, _ in headers)]) + r" \\"
    )
    lines.append(r"\midrule")
    for row in table.rows:
        cells = [table.entries[(row, c, m)].text(tex=True) for _, c, m in headers]
        lines.append(" & ".join([tex_escape(row), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {tex_escape(note)}" for note in table.notes]
    return "\n".join(lines) + "\n"


def curves_figure(table: Table):
    """One panel per column, one line per row: the first metric per round, mean over the
    runs with their min-max as a band."""
    from matplotlib.ticker import MaxNLocator

    from fedclip.report import _pyplot

    plt = _pyplot()
    metric = table.metrics[0]
    n = len(table.columns)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    colours = plt.get_cmap("tab20" if len(table.rows) > 10 else "tab10")
    styles = ("-", "--", ":", "-.")  # with the colours: up to 80 rows apart
    legend: dict[str, object] = {}
    for ax, column in zip(axes[0], table.columns, strict=True):
        for i, row in enumerate(table.rows):
            curves = [read_curve(p, metric) for p in table.runs.get((row, column), [])]
            by_round: dict[int, list[float]] = {}
            for curve in curves:
                for rnd, value in curve.items():
                    by_round.setdefault(rnd, []).append(value)
            if not by_round:
                continue
            x = sorted(by_round)
            mean = [float(np.mean(by_round[r])) for r in x]
            colour = colours(i % colours.N)
            style = styles[(i // colours.N) % len(styles)]
            (line,) = ax.plot(x, mean, style, color=colour, marker="o", markersize=3)
            legend.setdefault(row, line)
            lo, hi = [min(by_round[r]) for r in x], [max(by_round[r]) for r in x]
            ax.fill_between(x, lo, hi, alpha=0.15, color=colour, linewidth=0)
        ax.set(xlabel="round", ylabel=f"{metric} (%)", title=column or metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not ax.lines:
            ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    if legend:  # one legend for every panel, beside them
        fig.legend(
            list(legend.values()), list(legend), loc="center left", bbox_to_anchor=(1.0, 0.5),
            fontsize=8, ncol=1 if len(legend) <= 16 else 2, frameon=False,
        )  # fmt: skip
    fig.suptitle(f"{table.title}: mean over runs, band min-max", fontsize=10)
    fig.tight_layout()
    return fig


def write_table(table: Table, folder: Path, stem: str) -> list[Path]:
    """`stem`.md, .csv, .tex and .png in `folder` (made if need be), each written whole."""
    from fedclip.checkpoint import atomic_path, write_text_atomic
    from fedclip.report import _pyplot

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.{ext}" for ext in ("md", "csv", "tex", "png")]
    for path, text in zip(paths, (markdown(table), long_csv(table), latex(table)), strict=False):
        write_text_atomic(path, text)
    fig = curves_figure(table)
    with atomic_path(paths[3]) as tmp:
        fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight")
    _pyplot().close(fig)
    return paths
