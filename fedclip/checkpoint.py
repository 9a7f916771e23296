"""Atomic checkpoint writing and safe loading (`weights_only=True`, never arbitrary pickles)."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "fedclip-federation"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, foreign or unsafe; the message is one line."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`:
    a crash at any moment leaves either the old or the new file, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, expect_format: str = FORMAT) -> dict[str, Any]:
    """Load a fedclip checkpoint with weights_only=True; refuse anything else in one line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refusing checkpoint {path}: it is corrupt or carries objects other than tensors "
            f"and plain containers ({first[:160]})"
        ) from e
    except Exception as e:  # truncated zip, not a torch file, ...
        raise CheckpointError(
            f"corrupt checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        ) from e
    if not isinstance(obj, dict) or obj.get("format") != expect_format:
        raise CheckpointError(f"{path} is not a {expect_format} checkpoint")
    if obj.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {obj.get('version')}, expected {VERSION}"
        )
    return obj
