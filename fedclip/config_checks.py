"""Checks of a config's shape and numbers that no single class can make for itself.

`check_layout` refuses a config file that is not a mapping of settings, or whose sections
(`data`, `learner.init_args`, ...) are not mappings, naming the file, the section and what it
got (jsonargparse would fail deep inside with a TypeError, or say only "Unexpected config").
The sections are read from the dataclasses of the config (FitConfig for `fedclip fit`), so a
new section is checked without a change here.

`check_numbers` walks a parsed plain config and refuses, naming the dotted key, every float
that is NaN or infinite (no fedclip setting takes one: a NaN would compare false against
every bound, and e.g. switch a proximal term off without a word) and every integer numpy and
torch cannot take: seeds (`seed`, `*_seed`) must be in [0, 2**32), the generators' common
range, and any other integer must fit in 64 bits.

`check_selection` refuses a `federation.select` that cannot be made: 'val' without a
validation split, or a `select_by` that is not a validation metric (never a test one).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from pathlib import Path
from typing import Any

from fedclip.errors import ConfigError, UsageError

SEED_LIMIT = 2**32
INT_LIMIT = 2**63


def describe(value: Any) -> str:
    """'a list', 'an integer', ... for a message."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names.update({list: "a list", dict: "a mapping", bytes: "bytes"})
    return names.get(type(value), type(value).__name__)


def _fields(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an unresolvable annotation: no section below it is checked
        return {}


def _is_class_section(tp: Any) -> bool:
    """A pluggable part given as class_path + init_args (a learner, a data set, ...)."""
    return (
        inspect.isclass(tp)
        and not dataclasses.is_dataclass(tp)
        and tp.__module__.split(".")[0] not in {"builtins", "typing", "pathlib"}
    )


def _check_section(file: str, key: str, value: Any, tp: Any) -> None:
    if value is None:
        return  # jsonargparse takes null as "the default" or names it itself
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UsageError(f"{file}: section '{key}' must be a mapping, got {describe(value)}")
        hints = _fields(tp)
        for name, sub in value.items():
            if str(name) in hints:
                _check_section(file, f"{key}.{name}", sub, hints[str(name)])
    elif _is_class_section(tp):
        if isinstance(value, str):
            return  # a class path alone
        if not isinstance(value, dict):
            raise UsageError(
                f"{file}: section '{key}' must be a class path or a mapping (class_path, "
                f"init_args), got {describe(value)}"
            )
        for part in ("init_args", "dict_kwargs"):
            if value.get(part) is not None and not isinstance(value[part], dict):
                raise UsageError(
                    f"{file}: section '{key}.{part}' must be a mapping, got {describe(value[part])}"
                )


def _nest(loaded: dict[Any, Any]) -> dict[str, Any]:
    """Dotted top-level keys ('learner.init_args: ...') as nested mappings."""
    out: dict[str, Any] = {}
    for key, value in loaded.items():
        *parents, leaf = str(key).split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[leaf] = value
    return out


def check_layout(path: str | Path, loaded: Any, schema: type) -> None:
    """UsageError naming `path` unless the loaded YAML is a mapping whose sections (the
    dataclass and class fields of `schema`) are mappings."""
    if loaded is None:
        raise UsageError(
            f"{path}: expected a mapping of settings at the top level, got an empty file"
        )
    if not isinstance(loaded, dict):
        raise UsageError(
            f"{path}: expected a mapping of settings at the top level, got {describe(loaded)}"
        )
    hints = _fields(schema)
    for key, value in _nest(loaded).items():
        if key in hints:
            _check_section(str(path), key, value, hints[key])


def _is_seed(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf == "seed" or leaf.endswith("_seed")


def check_numbers(plain: Any, prefix: str = "") -> None:
    """ConfigError naming the dotted key of the first non-finite float or out-of-range
    integer in a plain config (mappings and lists are walked)."""
    if isinstance(plain, dict):
        for key, value in plain.items():
            check_numbers(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(plain, list | tuple):
        for i, value in enumerate(plain):
            check_numbers(value, f"{prefix}[{i}]")
    elif isinstance(plain, float) and not math.isfinite(plain):
        raise ConfigError(f"{prefix} must be a finite number, got {plain}")
    elif isinstance(plain, int) and not isinstance(plain, bool):
        if _is_seed(prefix) and not 0 <= plain < SEED_LIMIT:
            raise ConfigError(f"{prefix} must be in [0, 2**32), got {plain}")
        if not -INT_LIMIT <= plain < INT_LIMIT:
            raise ConfigError(f"{prefix} must be in [-2**63, 2**63), got {plain}")


def val_metric_choices(multilabel: bool) -> list[str]:
    """The validation metrics `federation.select_by` may name (higher is better; the
    `val/*` keys `fedclip.federation.summary.val_metrics` logs)."""
    name = "map" if multilabel else "acc"
    pooled = ["val/map_pooled"] if multilabel else []
    return (
        [f"val/{name}_{s}" for s in ("mean", "min", "max", "weighted")]
        + pooled
        + [
            "val/global",
            "val/dual",
        ]
    )


def check_selection(fed: Any, val_fraction: float, multilabel: bool) -> None:
    """ConfigError (one line) for a `federation.select` / `select_by` no run can honour:
    'val' without `data.val_fraction` > 0, or a `select_by` outside `val_metric_choices`."""
    if fed.select not in ("last", "val"):
        raise ConfigError(f"federation.select must be 'last' or 'val', got {fed.select!r}")
    if fed.select == "val" and not val_fraction > 0:
        raise ConfigError(
            "federation.select: val needs a validation split: set data.val_fraction in (0, 1), "
            f"got {val_fraction}"
        )
    choices = val_metric_choices(multilabel)
    if fed.select_by is not None and fed.select_by not in choices:
        test = " (a test metric: the best test round is never reported)"
        hint = test if str(fed.select_by).startswith("eval/") else ""
        raise ConfigError(
            f"federation.select_by must be a validation metric, one of {', '.join(choices)}; "
            f"got {fed.select_by!r}{hint}"
        )
