"""What the suite file's values must be: each check raises a one-line ConfigError naming
the file and the key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from fedclip.errors import ConfigError
from fedclip.parsing import closest

# flags every cell's command sets itself
SET_BY_SUITE = ("--seed", "--output_dir", "--run_name", "--resume", "--progress", "--config")
SET_BY_SUITE += ("--print_config",)


def slugify(text: str) -> str:
    """`text` in lower case with every run of characters outside [a-z0-9_.-] as one '-'."""
    return re.sub(r"[^a-z0-9_.-]+", "-", str(text).lower()).strip("-")


def fail(path: Path, key: str, problem: str) -> ConfigError:
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


def check_keys(path: Path, key: str, entry: dict, allowed: tuple[str, ...]) -> None:
    for k in entry:
        if k not in allowed:
            near = closest(str(k), allowed)
            hint = f"did you mean {near}?" if near else f"allowed: {', '.join(allowed)}"
            raise fail(path, f"{key}{k}", f"unknown key ({hint})")


def text(path: Path, key: str, value: Any, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise fail(path, key, f"must be a non-empty string, got {value!r}")
    return value


def flags(path: Path | str, key: str, value: Any) -> tuple[str, ...]:
    """A list of fit flags as argv items: '--a=VALUE' is one item, taken whole (VALUE may
    hold spaces and quotes, e.g. JSON), '--a VALUE' two; refused: an item that is not a
    flag, or one the suite sets itself."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail(
            Path(path),
            key,
            f"must be a list of flags such as '--federation.rounds=5', got {value!r}",
        )
    out: list[str] = []
    for item in value:
        head = item.strip().split(None, 1)
        tokens = [item.strip()] if head and "=" in head[0] else head
        if not tokens or not tokens[0].startswith("--"):
            raise fail(Path(path), key, f"{item!r} is not a flag (--key=value)")
        for token in tokens:
            flag = token.split("=", 1)[0]
            if flag in SET_BY_SUITE:
                raise fail(
                    Path(path),
                    key,
                    f"{flag} is set by the suite for every cell "
                    "(seeds: for the seed, output_dir: for the folder)",
                )
        out += tokens
    return tuple(out)
