"""Where a result came from: package versions, the git commit of fedclip's checkout, the
device. Goes into summary.json's `run` section (the part that differs between otherwise
identical runs)."""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = {
    "fedclip": "fedclip",
    "torch": "torch",
    "open_clip": "open_clip_torch",
    "lightning": "lightning",
    "torchvision": "torchvision",
}


def versions() -> dict[str, str | None]:
    """Installed versions of fedclip and the libraries results depend on (None: absent)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name, dist in PACKAGES.items():
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@functools.lru_cache(maxsize=1)
def git_commit() -> dict[str, Any] | None:
    """{"commit", "dirty"} of the git checkout fedclip runs from, or None when fedclip is not
    run from a checkout (an installed wheel) or git is unavailable."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def device_name(device: Any) -> str:
    """'cpu', or e.g. 'cuda:0 (NVIDIA H200)'."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def run_info(cfg, device: str, wall_s: float) -> dict[str, Any]:
    """summary.json's `run`: versions, git commit, wall time and where it ran."""
    fabric = cfg.fabric
    return {
        "versions": versions(),
        "git": git_commit(),
        "wall_time_s": round(float(wall_s), 3),
        "device": device,
        "accelerator": fabric.accelerator,
        "devices": fabric.devices,
        "num_nodes": fabric.num_nodes,
        "precision": fabric.precision,
    }
