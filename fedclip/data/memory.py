"""Sizes that cannot fit: a data set, a client count or a cache this machine's memory cannot
hold is refused in one line before anything is allocated.

The estimates are lower bounds of what fedclip keeps in memory (labels, partition indices,
multi-label targets, the frozen-feature cache, one drawn image per loader process), so a
refusal is never a false alarm; a size under the limit may still be slow.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedclip.errors import ConfigError
from fedclip.progress import human_bytes as human  # the one byte formatting of fedclip

# bytes per sample that every data set costs: its label and its partition indices (int64)
INDEX_BYTES = 3 * 8


def machine_memory() -> int:
    """Bytes of memory this process may use: the physical memory, or the cgroup's limit
    (a container, a SLURM job) when lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def check_fits(setting: str, what: str, needed: int, limit: int | None = None) -> None:
    """ConfigError '<setting>: <what> would need ~X; this machine has Y' when `needed`
    bytes exceed the machine's memory (or `limit`)."""
    limit = machine_memory() if limit is None else limit
    if needed > limit:
        raise ConfigError(
            f"{setting}: {what} would need ~{human(needed)}; this machine has {human(limit)}"
        )


def check_data_plan(data_cfg, cache_bytes_per_image: int = 0) -> None:
    """Refuse a data set whose planned size (`DatasetSource.planned_size`, known before any
    label is listed) cannot fit: labels and indices, multi-label targets, the frozen-feature
    cache of `cache_bytes_per_image` per image, one drawn image per loader process."""
    source = data_cfg.dataset
    plan = getattr(source, "planned_size", None)
    limit = machine_memory()
    counts = {}
    for split in ("train", "test"):
        got = plan(split) if plan is not None else None
        if got is not None:
            counts[split] = got
    if counts:
        total = sum(n for n, _ in counts.values())
        _, arg = max(counts.values())
        setting = f"data.dataset.init_args.{arg}"
        check_fits(setting, f"the labels and indices of {total} images", total * INDEX_BYTES, limit)
        if getattr(source, "multilabel", False):
            c = int(getattr(source, "num_classes", 1))
            check_fits(
                setting,
                f"the targets of {total} images x {c} classes",
                total * (c * 5 + INDEX_BYTES),
                limit,
            )
        if cache_bytes_per_image:
            check_fits(
                setting,
                f"the frozen features of {total} images ({cache_bytes_per_image} bytes each)",
                total * (cache_bytes_per_image + INDEX_BYTES),
                limit,
            )
    pixels = getattr(source, "planned_pixels", None)
    got = pixels() if pixels is not None else None
    if got is not None:
        side, arg = got
        workers = max(1, int(data_cfg.num_workers or 0))
        # an image is drawn as (side, side, 3) arrays: uint8 pixels and int64 noise
        check_fits(
            f"data.dataset.init_args.{arg}",
            f"drawing a {side} x {side} image"
            + (f" in each of {workers} workers" if workers > 1 else ""),
            workers * side * side * 3 * 9,
            limit,
        )
