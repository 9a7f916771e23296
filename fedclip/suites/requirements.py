"""What a suite cell needs before it can run (a placeholder: the data set's files)."""

from __future__ import annotations

from typing import Any

from fedclip.errors import FedclipError


def missing_pieces(cfg: Any) -> list[str]:
    """One line per piece the built FitConfig `cfg` lacks on this machine ([] when none)."""
    try:
        cfg.data.dataset.check()
    except FedclipError as e:
        return [str(e)]
    return []
