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

import copy
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedclip.errors import ConfigError
from fedclip.parsing import closest

SUITE_KEYS = ("name", "description", "base", "output_dir", "overrides", "metrics", "methods")
SUITE_KEYS += ("settings", "seeds", "reference")
METHOD_KEYS = ("name", "method", "learner", "strategy", "config", "overrides")
REGISTERED_KEYS = ("registered", "config", "overrides")
# flags every cell's command sets itself
SET_BY_SUITE = ("--seed", "--output_dir", "--run_name", "--resume", "--progress", "--config")
SET_BY_SUITE += ("--print_config",)
DEFAULT_OUTPUT_DIR = "runs/suites"
DEFAULT_SECTIONS = {"learner": "TextualPrompt", "strategy": "FedAvg"}  # fit's defaults


def slugify(text: str) -> str:
    """`text` in lower case with every run of characters outside [a-z0-9_.-] as one '-'."""
    return re.sub(r"[^a-z0-9_.-]+", "-", str(text).lower()).strip("-")


@dataclass(frozen=True)
class Row:
    """A method: the table's row `name`, its composed base config and its fit flags."""

    name: str
    slug: str
    config: dict[str, Any]
    source: str  # the config file it was composed from
    overrides: tuple[str, ...]


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


# ---- reading ---------------------------------------------------------------------------------
def _fail(path: Path, key: str, problem: str) -> ConfigError:
    return ConfigError(f"{path}: {key}: {problem}")


def read_yaml(path: Path, what: str) -> Any:
    """The YAML in `path`; a one-line ConfigError naming it (and the line) when unreadable."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML text file (not UTF-8)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML: {problem}{where}") from e


def _check_keys(path: Path, key: str, entry: dict, allowed: tuple[str, ...]) -> None:
    for k in entry:
        if k not in allowed:
            near = closest(str(k), allowed)
            hint = f"did you mean {near}?" if near else f"allowed: {', '.join(allowed)}"
            raise _fail(path, f"{key}{k}", f"unknown key ({hint})")


def _text(path: Path, key: str, value: Any, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, key, f"must be a non-empty string, got {value!r}")
    return value


def flags(path: Path | str, key: str, value: Any) -> tuple[str, ...]:
    """A list of fit flags (each item split as a shell would: '--a=1' or '--a 1') as argv
    items; refused: an item that is not a flag, or one the suite sets itself."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(
            Path(path),
            key,
            f"must be a list of flags such as '--federation.rounds=5', got {value!r}",
        )
    out: list[str] = []
    for item in value:
        try:
            tokens = shlex.split(item)
        except ValueError as e:
            raise _fail(Path(path), key, f"cannot split {item!r}: {e}") from None
        if not tokens or not tokens[0].startswith("--"):
            raise _fail(Path(path), key, f"{item!r} is not a flag (--key=value)")
        for token in tokens:
            flag = token.split("=", 1)[0]
            if flag in SET_BY_SUITE:
                raise _fail(
                    Path(path),
                    key,
                    f"{flag} is set by the suite for every cell "
                    "(seeds: for the seed, output_dir: for the folder)",
                )
        out += tokens
    return tuple(out)


def _section(path: Path, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("class_path"), str):
        raise _fail(path, key, "must be a mapping with a class_path (and init_args)")
    return copy.deepcopy(value)


def _class_name(config: dict[str, Any], section: str) -> str:
    value = config.get(section)
    path = value.get("class_path") if isinstance(value, dict) else value
    return str(path or DEFAULT_SECTIONS[section]).rsplit(".", 1)[-1]


def _fit_config(path: Path, key: str, file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise _fail(path, key, f"config file not found: {file}")
    loaded = read_yaml(file, "config file")
    if not isinstance(loaded, dict):
        raise _fail(path, key, f"{file} does not hold a mapping of fit settings")
    return loaded


def _row(path: Path, key: str, entry: dict[str, Any], base: Path | None) -> Row:
    from fedclip.methods import CONFIGS, get_method

    method = None
    if entry.get("method") is not None:
        try:
            method = get_method(_text(path, f"{key}.method", entry["method"]))
        except ConfigError as e:
            raise _fail(path, f"{key}.method", str(e)) from None
    name = _text(path, f"{key}.name", entry.get("name", method.name if method else None))
    if not slugify(name):
        raise _fail(path, f"{key}.name", f"{name!r} has no letter or digit to name a folder")
    config = entry.get("config")
    if config == "quickstart":
        if method is None:
            raise _fail(path, f"{key}.config", "'quickstart' needs a method: (or registered:)")
        file, where = CONFIGS / method.quickstart, f"{key}.config"
    elif config is not None:
        file, where = path.parent / _text(path, f"{key}.config", config), f"{key}.config"
    elif base is not None:
        file, where = base, "base"
    else:
        raise _fail(path, key, "no config: and the suite has no base:")
    composed = _fit_config(path, where, file)
    sections = method.config() if method is not None and config is None else {}
    for section in ("learner", "strategy"):
        if section in entry:
            sections[section] = _section(path, f"{key}.{section}", entry[section])
        elif method is not None and config is not None:
            wanted = getattr(method, section).rsplit(".", 1)[-1]
            if _class_name(composed, section) != wanted:
                raise _fail(
                    path,
                    f"{key}.config",
                    f"{file} runs {section} "
                    f"{_class_name(composed, section)}, not {method.name}'s {wanted}; "
                    f"give {section}: explicitly or drop config:",
                )
    composed.update(copy.deepcopy(sections))  # whole sections: never merged init_args
    overrides = flags(path, f"{key}.overrides", entry.get("overrides"))
    return Row(name, slugify(name), composed, str(file), overrides)


def _rows(path: Path, data: dict[str, Any], base: Path | None) -> list[Row]:
    from fedclip.methods import list_methods

    entries = data.get("methods")
    if not isinstance(entries, list) or not entries:
        raise _fail(path, "methods", "must be a non-empty list of methods (the table's rows)")
    rows: list[Row] = []
    for i, entry in enumerate(entries):
        key = f"methods[{i}]"
        if not isinstance(entry, dict):
            raise _fail(path, key, f"must be a mapping (name, method, ...), got {entry!r}")
        if "registered" in entry:
            _check_keys(path, f"{key}.", entry, REGISTERED_KEYS)
            pattern = _text(path, f"{key}.registered", entry["registered"])
            names = list_methods(pattern)
            if not names:
                raise _fail(
                    path,
                    f"{key}.registered",
                    f"{pattern!r} matches no registered "
                    f"method (registered: {', '.join(list_methods())})",
                )
            rest = {k: v for k, v in entry.items() if k != "registered"}
            rows += [_row(path, f"{key}[{n}]", {"method": n, **rest}, base) for n in names]
        else:
            _check_keys(path, f"{key}.", entry, METHOD_KEYS)
            rows.append(_row(path, key, entry, base))
    for attr in ("name", "slug"):
        seen: set[str] = set()
        for row in rows:
            if getattr(row, attr) in seen:
                raise _fail(
                    path,
                    "methods",
                    f"two rows are named {row.name!r} "
                    f"({'same folder name ' + row.slug if attr == 'slug' else ''})",
                )
            seen.add(getattr(row, attr))
    return rows


def _settings(path: Path, data: dict[str, Any], rows: list[Row]) -> list[Setting]:
    entries = data.get("settings")
    if entries is None:
        dataset = (rows[0].config.get("data") or {}).get("dataset")
        path_ = dataset.get("class_path") if isinstance(dataset, dict) else dataset
        name = str(path_ or "Shapes").rsplit(".", 1)[-1]
        return [Setting(name, slugify(name), ())]
    if not isinstance(entries, list) or not entries:
        raise _fail(path, "settings", "must be a non-empty list of settings (the columns)")
    settings = []
    for i, entry in enumerate(entries):
        key = f"settings[{i}]"
        if not isinstance(entry, dict):
            raise _fail(path, key, f"must be a mapping (name, overrides), got {entry!r}")
        _check_keys(path, f"{key}.", entry, ("name", "overrides"))
        name = _text(path, f"{key}.name", entry.get("name"))
        if not slugify(name):
            raise _fail(path, f"{key}.name", f"{name!r} has no letter or digit to name a folder")
        if any(s.name == name or s.slug == slugify(name) for s in settings):
            raise _fail(path, f"{key}.name", f"two settings are named {name!r}")
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
        raise _fail(path, "reference", "must be a mapping with source and values")
    _check_keys(path, "reference.", ref, ("source", "values"))
    source = _text(path, "reference.source", ref.get("source"), required=False)
    values = ref.get("values") or {}
    if not isinstance(values, dict):
        raise _fail(path, "reference.values", "must map row names to {column: number}")
    names, columns = [r.name for r in rows], [s.name for s in settings]
    for row, by_column in values.items():
        key = f"reference.values.{row}"
        if row not in names:
            near = closest(str(row), names)
            raise _fail(
                path,
                key,
                f"no such method row ({'did you mean ' + near + '?' if near else 'rows: ' + ', '.join(names)})",
            )
        if not isinstance(by_column, dict):
            raise _fail(path, key, "must map column names to numbers")
        for column, value in by_column.items():
            if column not in columns:
                raise _fail(
                    path, f"{key}.{column}", f"no such setting (columns: {', '.join(columns)})"
                )
            if isinstance(value, dict):
                for metric, number in value.items():
                    if metrics is not None and metric not in metrics:
                        raise _fail(
                            path, f"{key}.{column}.{metric}", f"not one of metrics: {metrics}"
                        )
                    if not _number(number):
                        raise _fail(
                            path, f"{key}.{column}.{metric}", f"must be a number, got {number!r}"
                        )
            elif not _number(value):
                raise _fail(path, f"{key}.{column}", f"must be a number (percent), got {value!r}")
    return source, values


def load_suite(file: str | Path) -> Suite:
    """The validated suite file `file` (ConfigError: one line naming the file and the key)."""
    path = Path(file)
    data = read_yaml(path, "suite file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a suite file is a mapping (name, base, methods, ...)")
    _check_keys(path, "", data, SUITE_KEYS)
    name = _text(path, "name", data.get("name"))
    if name in {".", ".."} or "/" in name or "\\" in name:
        raise _fail(path, "name", f"{name!r} must be a plain folder name")
    description = _text(path, "description", data.get("description"), required=False) or ""
    output_dir = _text(path, "output_dir", data.get("output_dir", DEFAULT_OUTPUT_DIR))
    base = None
    if data.get("base") is not None:
        base = path.parent / _text(path, "base", data["base"])
        _fit_config(path, "base", base)
    metrics = data.get("metrics")
    if metrics is not None and (
        not isinstance(metrics, list)
        or not metrics
        or not all(isinstance(m, str) and m.startswith("eval/") for m in metrics)
    ):
        raise _fail(
            path,
            "metrics",
            f"must be a list of summary.json eval keys such as eval/acc_mean, got {metrics!r}",
        )
    rows = _rows(path, data, base)
    settings = _settings(path, data, rows)
    seeds = data.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise _fail(path, "seeds", f"must be a non-empty list of distinct integers, got {seeds!r}")
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
