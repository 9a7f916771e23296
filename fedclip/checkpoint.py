"""Atomic checkpoint writing and safe loading (`weights_only=True`, never arbitrary pickles)."""

from __future__ import annotations

import errno
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fedclip.errors import CheckpointError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
FORMAT = "fedclip-federation"
VERSION = 2  # 2: failures, the round in progress and privacy state


def file_mode() -> int:
    """The mode an ordinary new file gets here: 0666 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _shareable(fd: int) -> None:
    """Give a temporary file the mode an ordinary new file gets: mkstemp creates it 0600,
    which would hide run files from the rest of a lab."""
    os.fchmod(fd, file_mode())


def _temp_name(path: Path, whole: bool) -> dict[str, str]:
    """mkstemp's prefix and suffix of the temporary file that becomes `path`: save_atomic's
    `.NAME.XXXXXXXX.tmp` (whole), atomic_path's `.STEM.XXXXXXXX.SUFFIX` (which keeps the
    suffix, that writers such as savefig read)."""
    if whole:
        return {"prefix": f".{path.name}.", "suffix": ".tmp"}
    return {"prefix": f".{path.stem}.", "suffix": path.suffix}


# the 8 characters tempfile draws between mkstemp's prefix and suffix
_RANDOM = "[a-z0-9_]{8}"


def stale_temps(folder: Path, names: list[str]) -> list[Path]:
    """The temporary files in `folder` that save_atomic or atomic_path left behind for the
    files `names` (a process killed while writing one of them leaves its temporary file):
    only names of exactly that form (`_temp_name`), nothing else in the folder."""
    patterns = []
    for name in names:
        for whole in (True, False):
            parts = _temp_name(Path(name), whole)
            patterns.append(re.escape(parts["prefix"]) + _RANDOM + re.escape(parts["suffix"]))
    match = re.compile("|".join(f"(?:{p})" for p in patterns)).fullmatch
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if match(p.name) and p.is_file())


def remove_stale_temps(folder: Path, names: list[str]) -> list[Path]:
    """Remove `stale_temps(folder, names)`; returns what was removed. Call it only where no
    other process writes these files (a run's own folder, as its run starts)."""
    removed = []
    for path in stale_temps(folder, names):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def _as_target(error: OSError, path: Path) -> OSError:
    """The same error, naming `path` (the file asked for) instead of its temporary file."""
    return OSError(error.errno, error.strerror or str(error), str(path))


@contextmanager
def _new_folders(folder: Path) -> Iterator[None]:
    """mkdir -p `folder`; the folders it created are removed again when the block fails."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, e.strerror or str(e), str(folder)) from e
        yield
    except BaseException:
        for p in missing:  # deepest first; a folder something else filled meanwhile stays
            try:
                p.rmdir()
            except OSError:
                pass
        raise


@contextmanager
def atomic_path(path: str | Path, whole: bool = False) -> Iterator[Path]:
    """A temporary path next to `path` to write to; renamed over `path` when the block
    succeeds, removed when it fails (the old file, if any, stays as it was; folders made
    for it are removed). An OSError of the file system names `path` (or the folder that
    could not be made), never the temporary file. whole: the temporary file is named
    `.NAME.XXXXXXXX.tmp` (save_atomic's), else `.STEM.XXXXXXXX.SUFFIX` (`_temp_name`)."""
    path = Path(path)
    with _new_folders(path.parent):
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        try:
            fd, tmp = tempfile.mkstemp(**_temp_name(path, whole), dir=path.parent)
        except OSError as e:
            raise _as_target(e, path) from e
        try:
            _shareable(fd)
            os.close(fd)
            yield Path(tmp)
            os.replace(tmp, path)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            if e.filename not in {tmp, None}:
                raise
            raise _as_target(e, path) from e
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`:
    a crash at any moment leaves either the old or the new file, never a torn one."""
    path = Path(path)
    with atomic_path(path, whole=True) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file so that a crash leaves the old or the new content, never a mix."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def load_checkpoint(path: str | Path, expect_format: str = FORMAT) -> dict[str, Any]:
    """Load a fedclip checkpoint with weights_only=True; refuse anything else in one line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. old pickle protocols: the error says enough
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = _ANSI.sub("", str(e))
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        what = (
            f"it holds {found.group(1)}, not only tensors and plain containers (loading it "
            "could run code)"
            if found
            else f"it is corrupt or holds objects other than tensors and plain containers "
            f"({(text.strip().splitlines() or [type(e).__name__])[0][:160]})"
        )
        raise CheckpointError(f"refusing checkpoint {path}: {what}") from e
    except Exception as e:  # truncated zip, not a torch file, ...
        first = _ANSI.sub("", str(e)).strip().splitlines()
        raise CheckpointError(
            f"corrupt checkpoint {path}: {type(e).__name__}: {first[0][:160] if first else ''}"
        ) from e
    if not isinstance(obj, dict) or obj.get("format") != expect_format:
        raise CheckpointError(f"{path} is not a {expect_format} checkpoint")
    if obj.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {obj.get('version')}, expected {VERSION}"
        )
    return obj
