"""What people look at: the result table, summary.json and the training curves of a run, and
the partition as a table and a heatmap."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fedclip.checkpoint import atomic_path, remove_stale_temps, write_text_atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# more clients than this: the per-client curves become a client x round heatmap
MAX_CLIENT_LINES = 20
REFERENCE_LABEL = "round 0 (before training)"


def _client_series(ev: list[dict[str, float]], name: str) -> dict[int, list[float]]:
    """{client: its headline metric (%) in each evaluated row} (NaN where missing)."""
    pattern = re.compile(rf"^client/(\d+)/{name}$")
    ids = sorted({int(m.group(1)) for r in ev for key in r if (m := pattern.match(key))})
    return {k: [100 * r.get(f"client/{k}/{name}", float("nan")) for r in ev] for k in ids}


def loss_limits(values: list[float]) -> tuple[float, float]:
    """y-limits of the loss axis: from 0 (a loss is never negative) to a little above the
    largest value, so that a 0.29-0.30 wobble reads as flat rather than as a spike; the
    data's own range, padded, if a value is negative."""
    lo, hi = min(values), max(values)
    if lo >= 0:
        top = hi * 1.08 if hi > 0 else 1.0
        return 0.0, top
    pad = max(0.05 * (hi - lo), 0.05 * max(abs(lo), abs(hi)), 1e-3)
    return lo - pad, hi + pad


def curves_figure(history: list[dict[str, float]]):
    """The training curves of a run as a matplotlib Figure.

    Accuracy (mAP for multi-label data) against rounds: each client's as a thin line (a
    client x round heatmap beside it instead once there are more than MAX_CLIENT_LINES
    clients, the min-max band then showing the spread), the mean over clients bold, the
    round-0 evaluation (before training) as a dashed horizontal reference, and the pooled
    base / novel / HM (or pooled mAP) where logged. Then the mean local training loss, on
    an axis from 0. Rounds are integer ticks.
    """
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    name = "map" if any("eval/map_mean" in r for r in history) else "acc"
    title = "mAP" if name == "map" else "accuracy"
    ev = [r for r in history if f"eval/{name}_mean" in r]
    tr = [
        r
        for r in history
        if "train/loss_mean" in r and r["train/loss_mean"] == r["train/loss_mean"]
    ]
    clients = _client_series(ev, name)
    heatmap = len(clients) > MAX_CLIENT_LINES
    fig, axes = plt.subplots(1, 3 if heatmap else 2, figsize=(15 if heatmap else 10, 4))
    acc_ax, loss_ax = axes[0], axes[-1]
    x = [int(r["round"]) for r in ev]
    if ev:
        if heatmap:
            acc_ax.fill_between(
                x,
                [100 * r[f"eval/{name}_min"] for r in ev],
                [100 * r[f"eval/{name}_max"] for r in ev],
                alpha=0.2,
                label="min-max over clients",
            )
        else:
            for i, values in enumerate(clients.values()):
                label = "each client" if i == 0 else None
                acc_ax.plot(x, values, linewidth=0.8, alpha=0.5, color="tab:gray", label=label)
        acc_ax.plot(
            x,
            [100 * r[f"eval/{name}_mean"] for r in ev],
            marker="o",
            linewidth=2.5,
            color="tab:blue",
            label="mean over clients",
            zorder=3,
        )
        start = [r for r in ev if int(r["round"]) == 0]
        if start:
            acc_ax.axhline(
                100 * start[0][f"eval/{name}_mean"],
                linestyle="--",
                color="black",
                linewidth=1,
                label=REFERENCE_LABEL,
            )
        extra = (("eval/base", "base"), ("eval/novel", "novel"), ("eval/hm", "HM"))
        extra += (("eval/map_pooled", "pooled mAP"),)
        for key, label in extra:
            if key in ev[-1]:
                rows = [r for r in ev if key in r]
                acc_ax.plot(
                    [int(r["round"]) for r in rows],
                    [100 * r[key] for r in rows],
                    marker=".",
                    label=label,
                )
        acc_ax.legend(fontsize=8)
    acc_ax.set(xlabel="round", ylabel=f"test {title} (%)", title=f"{title} per round")
    if heatmap:
        ax = axes[1]
        grid = [clients[k] for k in clients]
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
        fig.colorbar(image, ax=ax, label=f"test {title} (%)")
        step = max(1, len(x) // 10)
        ax.set_xticks(range(0, len(x), step), [str(v) for v in x[::step]])
        ax.set(xlabel="round", ylabel="client", title=f"{title} per client and round")
    if tr:
        losses = [r["train/loss_mean"] for r in tr]
        loss_ax.plot([int(r["round"]) for r in tr], losses, marker="o")
        loss_ax.set_ylim(*loss_limits(losses))
    loss_ax.set(xlabel="round", ylabel="mean local loss", title="training loss")
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """curves_figure(history) saved as a PNG at `path`."""
    fig = curves_figure(history)
    fig.savefig(path, dpi=100, format="png")
    _pyplot().close(fig)


def partition_figure(summary: dict[str, Any], title: str = ""):
    """Heatmap of training samples per (client, class), with each client's total, as a
    matplotlib Figure. Multi-label data (`summary["multilabel"]`): each image is counted
    once, under its rarest label (how the partitioners assign it), and the labels say so."""
    import numpy as np

    plt = _pyplot()
    counts = np.asarray(summary["train_counts"], dtype=float)  # (K, C)
    k, c = counts.shape
    multilabel = bool(summary.get("multilabel"))
    fig, ax = plt.subplots(figsize=(min(max(6.0, 4 + 0.12 * c), 24), min(3 + 0.3 * k, 30)))
    image = ax.imshow(counts, aspect="auto", interpolation="nearest", cmap="viridis")
    if multilabel:
        bar, xlabel = "training images (by rarest label)", "rarest label"
        default = "training images per client and rarest label"
    else:
        bar, xlabel, default = "training samples", "class", "training samples per client and class"
    fig.colorbar(image, ax=ax, label=bar)
    ax.set(xlabel=xlabel, ylabel="client", title=title or default)
    if title and multilabel:
        ax.set_title(f"{title}\n(multi-label: each image counted once, by its rarest label)")
    if k <= 40:
        labels = []
        for row in summary["clients"]:
            domain = f" {row['domain']}" if row.get("domain") else ""
            domain += f" {row['dataset']}" if row.get("dataset") else ""
            labels.append(f"{row['client']}{domain} ({row['train']})")
        ax.set_yticks(range(k), labels, fontsize=7)
    names = summary.get("classnames", [])
    if names and c <= 60:
        ax.set_xticks(range(c), names, rotation=90, fontsize=6)
    fig.tight_layout()
    return fig


def plot_partition(summary: dict[str, Any], path: Path, title: str = "") -> None:
    """partition_figure(summary, title) saved as a PNG at `path`."""
    fig = partition_figure(summary, title)
    fig.savefig(path, dpi=100, format="png")
    _pyplot().close(fig)


def partition_table(summary: dict[str, Any], title: str):
    """A rich table: client, domain (when there are domains), data set (over several data
    sets), train (validation, with `data.val_fraction`) and test samples, classes."""
    from rich.table import Table

    named = [key for key in ("domain", "dataset") if any(r.get(key) for r in summary["clients"])]
    counted = ["train", "val", "test"] if "val_counts" in summary else ["train", "test"]
    table = Table(title=title)
    columns = ["client", *named, *counted, "classes"]
    for col in columns:
        table.add_column(col, justify="left" if col in named else "right")
    for row in summary["clients"]:
        cells = [str(row["client"])]
        cells += [str(row.get(key) or "-") for key in named]
        cells += [str(row.get(key, 0)) for key in counted] + [str(row["classes"])]
        table.add_row(*cells)
    table.add_section()
    total = ["all", *([""] * len(named))]
    total += [str(sum(r.get(key, 0) for r in summary["clients"])) for key in counted]
    total += [str(len(summary.get("classnames", [])))]
    table.add_row(*total)
    return table


def write_partition(summary: dict[str, Any], folder: Path, stem: str = "partition") -> list[Path]:
    """`stem`.json (the summary) and `stem`.png (the heatmap) in `folder` (made if need be),
    both or neither: when one cannot be written, nothing is left behind."""
    js, png = folder / f"{stem}.json", folder / f"{stem}.png"
    with atomic_path(js) as tmp_js, atomic_path(png) as tmp_png:
        tmp_js.write_text(json.dumps(summary, indent=1))
        plot_partition(summary, tmp_png)
    return [js, png]


def _pct(value: float) -> str:
    return "-" if value != value else f"{100 * value:.2f}"


def _delta(value: float, start: float | None) -> str:
    if start is None or value != value or start != start:
        return "-"
    return f"{100 * (value - start):+.2f}"


def print_table(fed: Any, title: str) -> None:
    """Print the per-client result table of a federation (anything with `summary()` and
    `metric`, as Federation and the Flower server have), with the pooled rows below and,
    when round 0 was evaluated, each value's change from it (points). Under `select: val`
    the caption names the round reported (the best validation round)."""
    from rich.console import Console
    from rich.table import Table

    summary = fed.summary()
    name = fed.metric
    nan = float("nan")
    baseline = summary.get("baseline")
    start = baseline["eval"] if baseline else None
    caption = [f"round 0: {baseline['initial']}"] if baseline else []
    selection = summary.get("selection") or {}
    if selection.get("rule") == "val":
        caption.append(f"reported: round {selection['round']} (best {selection['by']})")
    table = Table(title=title, caption="\n".join(caption) or None)
    columns = ["client", "train", "test", "classes", "mAP %" if name == "map" else "acc %"]
    for col in columns + (["vs round 0"] if start is not None else []):
        table.add_column(col, justify="right")

    def row(label: str, value: float, before: float | None, counts=("", "", "")) -> None:
        cells = [label, *counts, _pct(value)]
        table.add_row(*cells, *([_delta(value, before)] if start is not None else []))

    for client in summary["clients"]:
        counts = (str(client["train"]), str(client["test"]), str(client["classes"]))
        label = str(client["client"]) + (f" {client['dataset']}" if client.get("dataset") else "")
        row(label, client[name], client.get(f"{name}_round0"), counts)
    ev = summary["eval"]
    if ev:
        table.add_section()
        before = start or {}
        mean, std = ev.get(f"eval/{name}_mean", nan), ev.get(f"eval/{name}_std", nan)
        cells = ["mean", "", "", "", f"{100 * mean:.2f} ± {100 * std:.2f}"]
        delta = _delta(mean, before.get(f"eval/{name}_mean"))
        table.add_row(*cells, *([delta] if start is not None else []))
        keys = [(f"eval/{name}_min", "min")]
        keys += [("eval/map_pooled", "pooled")] if "eval/map_pooled" in ev else []
        if "eval/hm" in ev:  # base-to-novel: the pooled base and novel accuracies, and HM
            keys += [(f"eval/{k}", k) for k in ("base", "novel", "hm")]
        elif "eval/global" in ev:  # the global model on the whole test set, and the HM
            keys += [("eval/global", "global"), ("eval/dual", "dual")]
        # further server-side models (`Strategy.evaluation_models`, e.g. eval/global_gpa)
        keys += [(k, k[len("eval/") :]) for k in sorted(ev) if k.startswith("eval/global_")]
        for key, label in keys:
            row(label, ev.get(key, nan), before.get(key))
    Console().print(table)


# the files a fit writes atomically in its run folder, and in its checkpoints/ folder
RUN_FILES = ["config.yaml", "partition.json", "partition.png", "summary.json", "curves.png"]
RUN_FILES.append("wandb_id")  # fedclip.tracking.ID_FILE
CHECKPOINT_FILES = ["last.ckpt"]


def start_run_folder(run_dir: Path, plain: dict[str, Any], data_summary: dict[str, Any]) -> None:
    """What a fit (or the Flower server's run) writes as it starts or resumes: first it
    removes the temporary files that a kill in the middle of writing one of its files left
    (only those of RUN_FILES and CHECKPOINT_FILES, see `fedclip.checkpoint.stale_temps`),
    then config.yaml (`plain`) and the partition (`data_summary`)."""
    import yaml

    remove_stale_temps(run_dir, RUN_FILES)
    remove_stale_temps(run_dir / "checkpoints", CHECKPOINT_FILES)
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(plain, sort_keys=False))
    write_partition(data_summary, run_dir)


def write_results(fed: Any, run_dir: Path) -> None:
    """summary.json and curves.png of a finished (or stopped: the summary's `stopped`) run,
    each replaced atomically (an interrupt leaves the old file or none, never part of one)."""
    write_text_atomic(run_dir / "summary.json", json.dumps(fed.summary(), indent=2, default=float))
    with atomic_path(run_dir / "curves.png") as tmp:
        plot_curves(fed.history, tmp)
    publish = getattr(fed, "publish_files", None)  # W&B: the plot as an image, the file
    if publish is not None:
        publish([run_dir / "summary.json", run_dir / "curves.png"])
