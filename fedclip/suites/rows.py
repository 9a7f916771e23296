"""The rows of a suite (its methods) and the base config each composes."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedclip.errors import ConfigError
from fedclip.suites.fields import check_keys, fail, flags, read_yaml, slugify, text

METHOD_KEYS = ("name", "method", "learner", "strategy", "config", "overrides")
REGISTERED_KEYS = ("registered", "config", "overrides")
DEFAULT_SECTIONS = {"learner": "TextualPrompt", "strategy": "FedAvg"}  # fit's defaults


@dataclass(frozen=True)
class Row:
    """A method: the table's row `name`, its composed base config and its fit flags."""

    name: str
    slug: str
    config: dict[str, Any]
    source: str  # the config file it was composed from
    overrides: tuple[str, ...]


def _section(path: Path, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("class_path"), str):
        raise fail(path, key, "must be a mapping with a class_path (and init_args)")
    return copy.deepcopy(value)


def _class_name(config: dict[str, Any], section: str) -> str:
    value = config.get(section)
    path = value.get("class_path") if isinstance(value, dict) else value
    return str(path or DEFAULT_SECTIONS[section]).rsplit(".", 1)[-1]


def fit_config(path: Path, key: str, file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise fail(path, key, f"config file not found: {file}")
    loaded = read_yaml(file, "config file")
    if not isinstance(loaded, dict):
        raise fail(path, key, f"{file} does not hold a mapping of fit settings")
    return loaded


def _row(path: Path, key: str, entry: dict[str, Any], base: Path | None) -> Row:
    from fedclip.methods import CONFIGS, get_method

    method = None
    if entry.get("method") is not None:
        try:
            method = get_method(text(path, f"{key}.method", entry["method"]))
        except ConfigError as e:
            raise fail(path, f"{key}.method", str(e)) from None
    name = text(path, f"{key}.name", entry.get("name", method.name if method else None))
    if not slugify(name):
        raise fail(path, f"{key}.name", f"{name!r} has no letter or digit to name a folder")
    config = entry.get("config")
    if config == "quickstart":
        if method is None:
            raise fail(path, f"{key}.config", "'quickstart' needs a method: (or registered:)")
        file, where = CONFIGS / method.quickstart, f"{key}.config"
    elif config is not None:
        file, where = path.parent / text(path, f"{key}.config", config), f"{key}.config"
    elif base is not None:
        file, where = base, "base"
    else:
        raise fail(path, key, "no config: and the suite has no base:")
    composed = fit_config(path, where, file)
    sections = method.config() if method is not None and config is None else {}
    for section in ("learner", "strategy"):
        if section in entry:
            sections[section] = _section(path, f"{key}.{section}", entry[section])
        elif method is not None and config is not None:
            wanted = getattr(method, section).rsplit(".", 1)[-1]
            if _class_name(composed, section) != wanted:
                raise fail(
                    path,
                    f"{key}.config",
                    f"{file} runs {section} "
                    f"{_class_name(composed, section)}, not {method.name}'s {wanted}; "
                    f"give {section}: explicitly or drop config:",
                )
    composed.update(copy.deepcopy(sections))  # whole sections: never merged init_args
    overrides = flags(path, f"{key}.overrides", entry.get("overrides"))
    return Row(name, slugify(name), composed, str(file), overrides)


def method_rows(path: Path, data: dict[str, Any], base: Path | None) -> list[Row]:
    from fedclip.methods import list_methods

    entries = data.get("methods")
    if not isinstance(entries, list) or not entries:
        raise fail(path, "methods", "must be a non-empty list of methods (the table's rows)")
    rows: list[Row] = []
    for i, entry in enumerate(entries):
        key = f"methods[{i}]"
        if not isinstance(entry, dict):
            raise fail(path, key, f"must be a mapping (name, method, ...), got {entry!r}")
        if "registered" in entry:
            check_keys(path, f"{key}.", entry, REGISTERED_KEYS)
            pattern = text(path, f"{key}.registered", entry["registered"])
            names = list_methods(pattern)
            if not names:
                raise fail(
                    path,
                    f"{key}.registered",
                    f"{pattern!r} matches no registered "
                    f"method (registered: {', '.join(list_methods())})",
                )
            rest = {k: v for k, v in entry.items() if k != "registered"}
            rows += [_row(path, f"{key}[{n}]", {"method": n, **rest}, base) for n in names]
        else:
            check_keys(path, f"{key}.", entry, METHOD_KEYS)
            rows.append(_row(path, key, entry, base))
    for attr in ("name", "slug"):
        seen: set[str] = set()
        for row in rows:
            if getattr(row, attr) in seen:
                same = f"the folder name {row.slug!r}" if attr == "slug" else repr(row.name)
                raise fail(path, "methods", f"two rows share {same}; rename one")
            seen.add(getattr(row, attr))
    return rows
