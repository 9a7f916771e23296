"""The plots people look at: curves.png and partition.png, checked on the matplotlib figure."""

from __future__ import annotations

import numpy as np
import pytest

from fedclip import report


def history(num_clients: int, rounds: int = 3, loss=(0.30, 0.295, 0.29)) -> list[dict]:
    rows = []
    for rnd in range(rounds + 1):
        accs = [0.2 + 0.05 * rnd + 0.01 * k for k in range(num_clients)]
        row = {
            "round": float(rnd),
            "eval/acc_mean": sum(accs) / len(accs),
            "eval/acc_min": min(accs),
            "eval/acc_max": max(accs),
            "eval/acc_std": 0.01,
        }
        row.update({f"client/{k}/acc": a for k, a in enumerate(accs)})
        if rnd > 0:
            row["train/loss_mean"] = loss[(rnd - 1) % len(loss)]
        rows.append(row)
    return rows


def close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_curves_per_client_lines_mean_reference_and_integer_rounds():
    fig = report.curves_figure(history(3))
    try:
        acc, loss = fig.axes
        assert (acc.get_xlabel(), acc.get_ylabel()) == ("round", "test accuracy (%)")
        assert (loss.get_xlabel(), loss.get_ylabel()) == ("round", "mean local loss")
        labels = [line.get_label() for line in acc.get_lines()]
        assert labels.count("each client") == 1
        thin = [line for line in acc.get_lines() if line.get_color() == "tab:gray"]
        assert len(thin) == 3 and all(line.get_linewidth() < 1 for line in thin)
        (mean,) = [line for line in acc.get_lines() if line.get_label() == "mean over clients"]
        assert mean.get_linewidth() > 2
        (ref,) = [line for line in acc.get_lines() if line.get_label() == report.REFERENCE_LABEL]
        assert ref.get_linestyle() == "--"
        assert list(ref.get_ydata()) == pytest.approx([100 * history(3)[0]["eval/acc_mean"]] * 2)
        fig.canvas.draw()
        for ax in (acc, loss):
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert not fig.axes[0].images  # no heatmap for 3 clients
    finally:
        close(fig)


def test_flat_loss_is_not_a_spike():
    fig = report.curves_figure(history(2))
    try:
        low, high = fig.axes[-1].get_ylim()
        assert low == 0.0 and 0.30 < high < 0.4  # 0.29-0.30 reads as flat
    finally:
        close(fig)
    assert report.loss_limits([0.29, 0.30]) == (0.0, pytest.approx(0.324))
    low, high = report.loss_limits([-1.0, -0.5])
    assert low < -1.0 and high > -0.5


def test_curves_heatmap_for_many_clients():
    fig = report.curves_figure(history(25))
    try:
        acc, heat, loss = fig.axes[:3]
        assert len(heat.images) == 1
        assert heat.images[0].get_array().shape == (25, 4)  # clients x evaluated rounds
        assert (heat.get_xlabel(), heat.get_ylabel()) == ("round", "client")
        assert [t.get_text() for t in heat.get_xticklabels()] == ["0", "1", "2", "3"]
        assert not [line for line in acc.get_lines() if line.get_label() == "each client"]
        assert any(line.get_label() == report.REFERENCE_LABEL for line in acc.get_lines())
        assert loss.get_ylabel() == "mean local loss"
    finally:
        close(fig)


def test_curves_multilabel_and_base_to_novel():
    rows = [
        {
            "round": float(r),
            "eval/map_mean": 0.5,
            "eval/map_min": 0.4,
            "eval/map_max": 0.6,
            "eval/map_pooled": 0.55,
            "client/0/map": 0.5,
        }
        for r in range(2)
    ]
    fig = report.curves_figure(rows)
    try:
        assert fig.axes[0].get_ylabel() == "test mAP (%)"
        assert "pooled mAP" in [line.get_label() for line in fig.axes[0].get_lines()]
    finally:
        close(fig)
    rows = history(2)
    for row in rows:
        row.update({"eval/base": 0.5, "eval/novel": 0.4, "eval/hm": 0.44})
    fig = report.curves_figure(rows)
    try:
        labels = [line.get_label() for line in fig.axes[0].get_lines()]
        assert {"base", "novel", "HM"} <= set(labels)
    finally:
        close(fig)


def test_no_reference_line_without_round_zero():
    fig = report.curves_figure(history(2)[1:])
    try:
        assert report.REFERENCE_LABEL not in [line.get_label() for line in fig.axes[0].get_lines()]
    finally:
        close(fig)


def partition_summary(multilabel: bool | None) -> dict:
    summary = {
        "classnames": ["a", "b", "c"],
        "clients": [{"client": 0, "train": 3}, {"client": 1, "train": 4}],
        "train_counts": [[1, 2, 0], [0, 1, 3]],
    }
    if multilabel is not None:
        summary["multilabel"] = multilabel
    return summary


@pytest.mark.parametrize("multilabel", [None, False, True])
def test_partition_heatmap_labels(multilabel):
    fig = report.partition_figure(partition_summary(multilabel))
    try:
        ax, bar = fig.axes
        if multilabel:
            assert ax.get_xlabel() == "rarest label"
            assert "rarest label" in ax.get_title() and "rarest label" in bar.get_ylabel()
        else:
            assert (ax.get_xlabel(), bar.get_ylabel()) == ("class", "training samples")
        assert [t.get_text() for t in ax.get_yticklabels()] == ["0 (3)", "1 (4)"]
    finally:
        close(fig)
    fig = report.partition_figure(partition_summary(multilabel), "coco: Dirichlet")
    try:
        title = fig.axes[0].get_title()
        assert title.startswith("coco: Dirichlet") and ("rarest" in title) == bool(multilabel)
    finally:
        close(fig)


def test_plot_files_are_written(tmp_path):
    report.plot_curves(history(25), tmp_path / "curves.png")
    report.plot_partition(partition_summary(True), tmp_path / "partition.png")
    for name in ("curves.png", "partition.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_partition_summary_marks_multilabel_data_counted_by_rarest_label():
    """FederatedData.summary() says whether the data are multi-label; its counts then
    count each image once, under its rarest label, which the heatmap says."""
    from fedclip.data import IID, Shapes
    from fedclip.data.federated import DataConfig, FederatedData

    from .test_multilabel_data import Memory

    train = [[1, 1, 0], [1, 0, 0], [1, 0, 1], [0, 1, 0], [1, 1, 1], [1, 0, 0]]
    source = Memory({"train": train, "test": [[1, 0, 0], [0, 1, 1]]})
    cfg = DataConfig(dataset=source, partitioner=IID(), num_clients=2)
    summary = FederatedData(cfg, 0).summary()
    assert summary["multilabel"] is True
    counts = np.asarray(summary["train_counts"])
    assert counts.sum() == len(train)  # each image once, not once per positive label
    assert counts.sum(axis=0).tolist() == np.bincount(source.labels("train"), minlength=3).tolist()
    fig = report.partition_figure(summary)
    try:
        assert "rarest label" in fig.axes[1].get_ylabel()
    finally:
        close(fig)

    single = DataConfig(
        dataset=Shapes(num_classes=3, train_per_class=4, test_per_class=2, image_size=16),
        partitioner=IID(),
        num_clients=2,
    )
    assert FederatedData(single, 0).summary()["multilabel"] is False
