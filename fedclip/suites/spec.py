"""The suite file of `fedclip suite --config S.yaml`: a grid of `fedclip fit` runs.

    name: quick                        # the suite folder: <output_dir>/<name>
    description: one paragraph         # optional
    base: ../quickstart.yaml           # the base fit config, relative to this file
    output_dir: runs/suites            # optional (default runs/suites)
    overrides: ["--federation.rounds=5"]   # optional: fit flags for every cell
    metrics: [eval/acc_mean]           # optional (default: the runs' headline metric)
    methods:                           # the table's rows
      - name: PromptFL                 # row label (slugified: part of the cell's name)
        method: promptfl               # a registry name: learner + strategy of the method
        overrides: ["--learner.init_args.n_ctx=16"]
      - name: CoOp
        method: coop
        config: quickstart             # the method's own config instead of `base`
      - name: Mine
        learner: {class_path: ..., init_args: {...}}   # and/or strategy: {...}
      - registered: "fed*"             # one row per registered method matching the glob
        config: quickstart
    settings:                          # the columns (default: one, the base's data set)
      - name: plain
        overrides: ["--data.dataset.init_args.style=plain"]
    seeds: [0, 1]                      # default [0]
    reference:                         # optional: published numbers (percent)
      source: "Paper (Author et al., 2025), Table 1"
      values: {PromptFL: {plain: 71.2}}   # or {column: {metric: number}} for several

A row's base config is its `config:` (a path relative to the suite file, or `quickstart`:
its method's configs/<quickstart>) or else `base`. Its `learner:` / `strategy:` sections
are replaced whole by the row's own (explicit ones, or else its method's, when it has no
`config:`); a row with `config:` and a `method:` whose classes differ from the config's is
refused. Every problem is a one-line ConfigError naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedclip.errors import ConfigError
from fedclip.parsing import closest
from fedclip.suites.fields import check_keys, fail, flags, read_yaml, slugify, text
from fedclip.suites.rows import Row, fit_config, method_rows

SUITE_KEYS = ("name", "description", "base", "output_dir", "overrides", "metrics", "methods")
SUITE_KEYS += ("settings", "seeds", "reference")
DEFAULT_OUTPUT_DIR = "runs/suites"


@dataclass(frozen=True)
class Setting:
    """A column: its `name` and its fit flags."""

    name: str
    slug: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Cell:
    """One `fedclip fit` run of the grid; `argv` starts with 'fit'."""

    id: str
    row: str
    column: str
    seed: int
    argv: tuple[str, ...]
    run_dir: Path


@dataclass
class Suite:
    """A loaded, validated suite file."""

    path: Path
    name: str
    description: str
    output_dir: str
    overrides: tuple[str, ...]
    metrics: list[str] | None
    rows: list[Row]
    settings: list[Setting]
    seeds: list[int]
    reference_source: str | None
    reference: dict[str, dict[str, Any]]

    def folder(self, output_dir: str | None = None) -> Path:
        """The suite folder: <output_dir>/<name> (output_dir: the command line's, if any)."""
        return Path(output_dir or self.output_dir) / self.name

    def cells(self, folder: Path, extra: tuple[str, ...] = ()) -> list[Cell]:
        """Every cell, method by method, then setting, then seed; `extra`: the command
        line's --override flags (after the suite's, the method's and the setting's)."""
        cells = []
        for row in self.rows:
            config = folder / "configs" / f"{row.slug}.yaml"
            for setting in self.settings:
                for seed in self.seeds:
                    cid = f"{row.slug}-{setting.slug}-seed{seed}"
                    argv = ("fit", "--config", str(config), *self.overrides, *row.overrides)
                    argv += (*setting.overrides, *extra, f"--seed={seed}")
                    argv += (f"--output_dir={folder / 'runs'}", f"--run_name={cid}")
                    argv += ("--progress=false",)
                    cell = Cell(cid, row.name, setting.name, seed, argv, folder / "runs" / cid)
                    cells.append(cell)
        seen: dict[str, Cell] = {}
        for cell in cells:
            if cell.id in seen:
                raise ConfigError(
                    f"{self.path}: cells ({seen[cell.id].row}, {seen[cell.id].column}) and "
                    f"({cell.row}, {cell.column}) would share the run folder {cell.id}; rename one"
                )
            seen[cell.id] = cell
        return cells

    def reference_value(self, row: str, column: str, metric: str, first: str) -> float | None:
        """The reference number of (row, column, metric); a plain number is the first
        metric's (`first`)."""
        value = self.reference.get(row, {}).get(column)
        if isinstance(value, dict):
            return value.get(metric)
        return value if metric == first else None


def _settings(path: Path, data: dict[str, Any], rows: list[Row]) -> list[Setting]:
    entries = data.get("settings")
    if entries is None:
        dataset = (rows[0].config.get("data") or {}).get("dataset")
        path_ = dataset.get("class_path") if isinstance(dataset, dict) else dataset
        name = str(path_ or "Shapes").rsplit(".", 1)[-1]
        return [Setting(name, slugify(name), ())]
    if not isinstance(entries, list) or not entries:
        raise fail(path, "settings", "must be a non-empty list of settings (the columns)")
    settings = []
    for i, entry in enumerate(entries):
        key = f"settings[{i}]"
        if not isinstance(entry, dict):
            raise fail(path, key, f"must be a mapping (name, overrides), got {entry!r}")
        check_keys(path, f"{key}.", entry, ("name", "overrides"))
        name = text(path, f"{key}.name", entry.get("name"))
        if not slugify(name):
            raise fail(path, f"{key}.name", f"{name!r} has no letter or digit to name a folder")
        if any(s.name == name or s.slug == slugify(name) for s in settings):
            raise fail(path, f"{key}.name", f"two settings are named {name!r}")
        overrides = flags(path, f"{key}.overrides", entry.get("overrides"))
        settings.append(Setting(name, slugify(name), overrides))
    return settings


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _reference(path, data, rows, settings, metrics) -> tuple[str | None, dict]:
    ref = data.get("reference")
    if ref is None:
        return None, {}
    if not isinstance(ref, dict):
        raise fail(path, "reference", "must be a mapping with source and values")
    check_keys(path, "reference.", ref, ("source", "values"))
    source = text(path, "reference.source", ref.get("source"), required=False)
    values = ref.get("values") or {}
    if not isinstance(values, dict):
        raise fail(path, "reference.values", "must map row names to {column: number}")
    names, columns = [r.name for r in rows], [s.name for s in settings]
    for row, by_column in values.items():
        key = f"reference.values.{row}"
        if row not in names:
            near = closest(str(row), names)
            hint = f"did you mean {near}?" if near else f"rows: {', '.join(names)}"
            raise fail(path, key, f"no such method row ({hint})")
        if not isinstance(by_column, dict):
            raise fail(path, key, "must map column names to numbers")
        for column, value in by_column.items():
            if column not in columns:
                raise fail(
                    path, f"{key}.{column}", f"no such setting (columns: {', '.join(columns)})"
                )
            if isinstance(value, dict):
                for metric, number in value.items():
                    if metrics is not None and metric not in metrics:
                        raise fail(
                            path, f"{key}.{column}.{metric}", f"not one of metrics: {metrics}"
                        )
                    if not _number(number):
                        raise fail(
                            path, f"{key}.{column}.{metric}", f"must be a number, got {number!r}"
                        )
            elif not _number(value):
                raise fail(path, f"{key}.{column}", f"must be a number (percent), got {value!r}")
    return source, values


def load_suite(file: str | Path) -> Suite:
    """The validated suite file `file` (ConfigError: one line naming the file and the key)."""
    path = Path(file)
    data = read_yaml(path, "suite file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a suite file is a mapping (name, base, methods, ...)")
    check_keys(path, "", data, SUITE_KEYS)
    name = text(path, "name", data.get("name"))
    if name in {".", ".."} or "/" in name or "\\" in name:
        raise fail(path, "name", f"{name!r} must be a plain folder name")
    description = text(path, "description", data.get("description"), required=False) or ""
    output_dir = text(path, "output_dir", data.get("output_dir", DEFAULT_OUTPUT_DIR))
    base = None
    if data.get("base") is not None:
        base = path.parent / text(path, "base", data["base"])
        fit_config(path, "base", base)
    metrics = data.get("metrics")
    if metrics is not None and (
        not isinstance(metrics, list)
        or not metrics
        or not all(isinstance(m, str) and m.startswith("eval/") for m in metrics)
    ):
        raise fail(
            path,
            "metrics",
            f"must be a list of summary.json eval keys such as eval/acc_mean, got {metrics!r}",
        )
    rows = method_rows(path, data, base)
    settings = _settings(path, data, rows)
    seeds = data.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise fail(path, "seeds", f"must be a non-empty list of distinct integers, got {seeds!r}")
    source, reference = _reference(path, data, rows, settings, metrics)
    overrides = flags(path, "overrides", data.get("overrides"))
    return Suite(
        path,
        name,
        description,
        output_dir,
        overrides,
        metrics,
        rows,
        settings,
        seeds,
        source,
        reference,
    )
