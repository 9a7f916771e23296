"""Eager checks of constructor arguments (partitioners, data sets).

Each returns the value in its canonical type or raises a one-line `ConfigError` naming the
owner, the argument and the value, so a bad argument fails where the object is built rather
than as a TypeError deep inside the first split or the first image.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from fedclip.errors import ConfigError


def integer(owner: str, name: str, value: Any, minimum: int | None = None) -> int:
    """`value` as an int (an integral float is accepted, a bool is not), >= `minimum`."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if ok and not isinstance(value, numbers.Integral):
        ok = math.isfinite(value) and float(value).is_integer()
    if not ok:
        raise ConfigError(f"{owner}: {name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{owner}: {name} must be >= {minimum}, got {value}")
    return int(value)


def positive(owner: str, name: str, value: Any) -> float:
    """`value` as a float, finite and > 0."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not (ok and value > 0 and math.isfinite(value)):
        raise ConfigError(f"{owner}: {name} must be > 0 and finite, got {value!r}")
    return float(value)


def flag(owner: str, name: str, value: Any) -> bool:
    """`value` as a bool; anything but true/false is refused (bool("false") is True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{owner}: {name} must be true or false, got {value!r}")
    return bool(value)
