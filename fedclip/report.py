"""What people look at: the result table, summary.json and the training curves of a run, and
the partition as a table and a heatmap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedclip.checkpoint import atomic_path, write_text_atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """Accuracy (mean, min-max band) and training loss against rounds."""
    plt = _pyplot()
    name = "map" if any("eval/map_mean" in r for r in history) else "acc"
    ev = [r for r in history if f"eval/{name}_mean" in r]
    tr = [
        r
        for r in history
        if r.get("train/loss_mean") == r.get("train/loss_mean") and "train/loss_mean" in r
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if ev:
        x = [r["round"] for r in ev]
        axes[0].plot(
            x, [100 * r[f"eval/{name}_mean"] for r in ev], marker="o", label="mean over clients"
        )
        axes[0].fill_between(
            x,
            [100 * r[f"eval/{name}_min"] for r in ev],
            [100 * r[f"eval/{name}_max"] for r in ev],
            alpha=0.2,
            label="min-max",
        )
        extra = (("eval/base", "base"), ("eval/novel", "novel"), ("eval/hm", "HM"))
        extra += (("eval/map_pooled", "pooled mAP"),)
        for key, label in extra:
            if key in ev[0]:
                axes[0].plot(x, [100 * r[key] for r in ev], marker=".", label=label)
        axes[0].legend()
    title = "mAP" if name == "map" else "accuracy"
    axes[0].set(xlabel="round", ylabel=f"test {title} (%)", title=title)
    if tr:
        axes[1].plot([r["round"] for r in tr], [r["train/loss_mean"] for r in tr], marker="o")
    axes[1].set(xlabel="round", ylabel="mean local loss", title="training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_partition(summary: dict[str, Any], path: Path, title: str = "") -> None:
    """Heatmap of training samples per (client, class), with each client's total."""
    import numpy as np

    plt = _pyplot()
    counts = np.asarray(summary["train_counts"], dtype=float)  # (K, C)
    k, c = counts.shape
    fig, ax = plt.subplots(figsize=(min(4 + 0.12 * c, 24), min(2 + 0.3 * k, 30)))
    image = ax.imshow(counts, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=ax, label="training samples")
    ax.set(xlabel="class", ylabel="client", title=title or "training samples per client and class")
    if k <= 40:
        labels = []
        for row in summary["clients"]:
            domain = f" {row['domain']}" if row.get("domain") else ""
            labels.append(f"{row['client']}{domain} ({row['train']})")
        ax.set_yticks(range(k), labels, fontsize=7)
    names = summary.get("classnames", [])
    if names and c <= 60:
        ax.set_xticks(range(c), names, rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def partition_table(summary: dict[str, Any], title: str):
    """A rich table: client, domain (when there are domains), train and test samples, classes."""
    from rich.table import Table

    has_domain = any(row.get("domain") for row in summary["clients"])
    table = Table(title=title)
    columns = ["client", *(["domain"] if has_domain else []), "train", "test", "classes"]
    for col in columns:
        table.add_column(col, justify="left" if col == "domain" else "right")
    for row in summary["clients"]:
        cells = [str(row["client"])]
        if has_domain:
            cells.append(str(row.get("domain") or "-"))
        cells += [str(row["train"]), str(row["test"]), str(row["classes"])]
        table.add_row(*cells)
    table.add_section()
    total = ["all", *([""] if has_domain else [])]
    total += [
        str(sum(r["train"] for r in summary["clients"])),
        str(sum(r["test"] for r in summary["clients"])),
        str(len(summary.get("classnames", []))),
    ]
    table.add_row(*total)
    return table


def write_partition(summary: dict[str, Any], folder: Path, stem: str = "partition") -> list[Path]:
    """`stem`.json (the summary) and `stem`.png (the heatmap) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    js, png = folder / f"{stem}.json", folder / f"{stem}.png"
    write_text_atomic(js, json.dumps(summary, indent=1))
    with atomic_path(png) as tmp:
        plot_partition(summary, tmp)
    return [js, png]


def print_table(fed: Any, title: str) -> None:
    """Print the per-client result table of a federation (anything with `summary()` and
    `metric`, as Federation and the Flower server have), with the pooled rows below."""
    from rich.console import Console
    from rich.table import Table

    summary = fed.summary()
    name = fed.metric
    nan = float("nan")
    table = Table(title=title)
    for col in ("client", "train", "test", "classes", "mAP %" if name == "map" else "acc %"):
        table.add_column(col, justify="right")
    for row in summary["clients"]:
        value = row[name]
        table.add_row(
            str(row["client"]),
            str(row["train"]),
            str(row["test"]),
            str(row["classes"]),
            "-" if value != value else f"{100 * value:.2f}",
        )
    ev = summary["eval"]
    if ev:
        table.add_section()
        mean, std = ev.get(f"eval/{name}_mean", nan), ev.get(f"eval/{name}_std", nan)
        table.add_row("mean", "", "", "", f"{100 * mean:.2f} ± {100 * std:.2f}")
        table.add_row("min", "", "", "", f"{100 * ev.get(f'eval/{name}_min', nan):.2f}")
        if "eval/map_pooled" in ev:
            table.add_row("pooled", "", "", "", f"{100 * ev['eval/map_pooled']:.2f}")
        if "eval/hm" in ev:  # base-to-novel: the pooled base and novel accuracies, and HM
            for key in ("base", "novel", "hm"):
                table.add_row(key, "", "", "", f"{100 * ev[f'eval/{key}']:.2f}")
    Console().print(table)


def write_results(fed: Any, run_dir: Path) -> None:
    """summary.json and curves.png of a finished (or stopped) run, each replaced atomically."""
    write_text_atomic(run_dir / "summary.json", json.dumps(fed.summary(), indent=2, default=float))
    with atomic_path(run_dir / "curves.png") as tmp:
        plot_curves(fed.history, tmp)
    publish = getattr(fed, "publish_files", None)  # W&B: the plot as an image, the file
    if publish is not None:
        publish([run_dir / "summary.json", run_dir / "curves.png"])
