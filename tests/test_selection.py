"""Model selection without test peeking: the validation hold-out (`data.val_fraction`), the
`val/*` metrics computed beside the test ones at every evaluation, and `federation.select`
(the last round, or the round with the best validation metric, whose test metrics are
reported), down to summary.json, the table, resume, Flower and W&B."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedclip.batch import Input
from fedclip.cli import main
from fedclip.data import IID, Dirichlet, MultiShapes, Shapes
from fedclip.data.federated import DataConfig, FederatedData
from fedclip.data.holdout import hold_out, val_count
from fedclip.errors import ConfigError
from fedclip.federation import Federation
from fedclip.federation.selection import select_key, select_round
from fedclip.federation.summary import eval_metrics

from .conftest import ROOT, small_config, tiny_yaml
from .test_tracking import offline  # noqa: F401 (the offline W&B fixture, by name)

# ---- the hold-out ----------------------------------------------------------------------------


def test_val_count_rounds_half_up():
    assert [val_count(0.25, n) for n in (1, 2, 3, 4, 6, 10)] == [0, 1, 1, 1, 2, 3]
    assert [val_count(0.5, n) for n in (1, 2, 3)] == [1, 1, 2]  # 1.5 -> 2: half up, not even
    assert val_count(0.0, 100) == 0


def test_hold_out_is_stratified_disjoint_complete_and_seeded():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=300)
    parts = [np.sort(p) for p in np.array_split(rng.permutation(300), 3)]
    train, val = hold_out(parts, labels, 0.3, seed=7)
    for part, tr, va in zip(parts, train, val, strict=True):
        assert not np.intersect1d(tr, va).size
        assert np.array_equal(np.sort(np.concatenate([tr, va])), part)
        assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)  # sorted ids
        for c in np.unique(labels[part]):  # per class: floor(0.3 n + 1/2) to validation
            n = int((labels[part] == c).sum())
            assert int((labels[va] == c).sum()) == math.floor(0.3 * n + 0.5)
    again = hold_out(parts, labels, 0.3, seed=7)
    other = hold_out(parts, labels, 0.3, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(val, again[1], strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(val, other[1], strict=True))


def test_hold_out_that_empties_a_client_names_it():
    labels = np.array([0, 1, 0, 0])
    with pytest.raises(ConfigError, match=r"val_fraction=0.5 leaves client 1 no training"):
        hold_out([np.array([0, 2, 3]), np.array([1])], labels, 0.5, seed=0)


def _data(val_fraction: float, **kw) -> FederatedData:
    dataset = kw.pop("dataset", Shapes(num_classes=6, train_per_class=12, test_per_class=6))
    cfg = DataConfig(
        dataset=dataset,
        partitioner=kw.pop("partitioner", Dirichlet(alpha=0.5, min_size=4)),
        num_clients=3,
        val_fraction=val_fraction,
        **kw,
    )
    return FederatedData(cfg, seed=3)


@pytest.mark.parametrize("b2n", [False, True], ids=["plain", "base_to_novel"])
def test_test_splits_do_not_change_with_the_hold_out(b2n):
    plain, held = _data(0.0, base_to_novel=b2n), _data(0.3, base_to_novel=b2n)
    assert "val" not in plain.parts and plain.val_parts is None
    assert sorted(held.parts) == sorted([*plain.parts, "val"])
    for name in plain.parts:
        if name != "train":  # test, global (base, novel): the same samples
            for a, b in zip(plain.parts[name], held.parts[name], strict=True):
                assert np.array_equal(a, b), name
    for k in range(3):
        whole = plain.train_parts[k]
        assert np.array_equal(held.client_parts[k], whole)
        joined = np.sort(np.concatenate([held.train_parts[k], held.val_parts[k]]))
        assert np.array_equal(joined, whole)
        assert held.num_train(k) == len(whole) - len(held.val_parts[k]) < len(whole)
        assert held.local_classes(k) == plain.local_classes(k)
        if b2n:  # validation holds training (base) classes only
            assert set(held.train_labels[held.val_parts[k]]) <= set(range(held.num_base))
    rows = held.summary()["clients"]
    assert [r["train"] for r in rows] == [held.num_train(k) for k in range(3)]
    assert [r["val"] for r in rows] == [len(v) for v in held.val_parts]
    assert (
        held.summary()["val_counts"][0]
        == np.bincount(held.train_labels[held.val_parts[0]], minlength=6).tolist()
    )
    assert "val" not in plain.summary()["clients"][0] and "val_counts" not in plain.summary()


def test_multilabel_hold_out_is_by_the_rarest_label():
    data = _data(0.25, dataset=MultiShapes(num_classes=6, train_images=120, test_images=40))
    for k in range(3):
        part = data.client_parts[k]
        for c in np.unique(data.train_labels[part]):
            n = int((data.train_labels[part] == c).sum())
            got = int((data.train_labels[data.val_parts[k]] == c).sum())
            assert got == val_count(0.25, n)


def test_val_batches_are_training_images_under_the_evaluation_transform(tiny_vit):
    """Under augmentation too: the validation images are the training images through the
    evaluation transform (never augmented), with their training labels."""
    data = _data(0.25, partitioner=IID(), augment=True)
    data.bind(tiny_vit, [Input.IMAGES])
    plain = data.source.dataset("train", tiny_vit.preprocess_val)
    for k in range(3):
        batches = list(data.batches(k, "val"))
        ids = torch.cat([b.index for b in batches]).numpy()
        assert np.array_equal(np.sort(ids), data.val_parts[k])
        for b in batches:
            want = torch.stack([plain[int(i)][0] for i in b.index])
            torch.testing.assert_close(b.images, want)
            assert b.labels.tolist() == data.train_labels[b.index.numpy()].tolist()
    assert data.val_set is not data.train_set


# ---- the metrics -----------------------------------------------------------------------------


def test_val_parts_give_val_metrics_and_leave_the_test_ones_alone():
    test = {0: {"local": (3, 4), "global": (2, 4)}, 1: {"local": (1, 4), "global": (4, 4)}}
    val = {0: {"val_local": (1, 2), "val_global": (2, 2)}, 1: {"val_local": (3, 3), "val_global": (0, 3)}}  # fmt: skip
    both = {k: {**test[k], **val[k]} for k in test}
    counts, names = {0: 4, 1: 4}, ["a", "b"]
    alone = eval_metrics(test, False, False, counts, names)
    got = eval_metrics(both, False, False, counts, names)
    assert {k: v for k, v in got.items() if not k.startswith("val/") and "/val_" not in k} == alone
    assert got["val/acc_mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert got["val/acc_min"] == 0.5 and got["val/acc_max"] == 1.0
    assert got["val/acc_weighted"] == pytest.approx((0.5 * 2 + 1.0 * 3) / 5)  # val counts
    assert got["val/global"] == pytest.approx(2 / 5)  # pooled
    assert got["val/dual"] == pytest.approx(2 / (1 / 0.75 + 1 / 0.4))
    assert (got["client/0/val_acc"], got["client/1/val_acc"]) == (0.5, 1.0)
    assert not any(k.startswith("eval/val") for k in got)  # not taken for a further model


# ---- the selection rule ----------------------------------------------------------------------


def _row(rnd, test, val):
    return {"round": float(rnd), "eval/acc_mean": test, "val/acc_mean": val, "train/x": 1.0}


def test_select_round_follows_validation_never_test():
    history = [
        _row(0, 0.1, 0.99),  # round 0: the baseline, not a candidate
        _row(1, 0.9, 0.2),  # the best test round
        {"round": 2.0, "train/x": 1.0},  # not evaluated
        _row(3, 0.3, 0.6),  # the best validation round ...
        _row(4, 0.5, float("nan")),  # skipped
        _row(5, 0.4, 0.6),  # ... tied later: the earliest stays
        _row(6, 0.7, 0.5),
    ]
    row, sel = select_round(history, "val", "val/acc_mean")
    assert row is history[3] and sel["round"] == 3 and sel["by"] == "val/acc_mean"
    assert sel["rule"] == "val" and sel["rounds_evaluated"] == 5 and "best val" in sel["note"]
    row, sel = select_round(history, "last", None)
    assert row is history[-1] and (sel["round"], sel["by"]) == (6, None)
    row, sel = select_round([_row(0, 0.1, 0.2), _row(1, 0.3, float("nan"))], "val", "val/acc_mean")
    assert sel["round"] == 1 and "no evaluated round has a finite" in sel["note"]
    assert select_round([_row(0, 0.1, 0.2)], "val", "val/acc_mean")[1]["round"] == 0
    assert select_round([], "last", None) == (None, select_round([], "last", None)[1])


def test_select_key_defaults_to_the_headline():
    assert select_key("last", None, False, False) is None
    assert select_key("val", None, False, False) == "val/acc_mean"
    assert select_key("val", None, True, False) == "val/map_mean"
    assert select_key("val", None, False, True) == "val/acc_mean"  # eval/hm has no val twin
    assert select_key("val", "val/global", False, False) == "val/global"


# ---- refused settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--data.val_fraction=1.0"], "data.val_fraction must be in [0, 1), got 1.0"),
        (["--data.val_fraction=-0.1"], "data.val_fraction must be in [0, 1), got -0.1"),
        (["--federation.select=val"], "federation.select: val needs a validation split"),
        (
            ["--data.val_fraction=0.2", "--federation.select=val", "--federation.select_by=eval/acc_mean"],
            "never reported",
        ),
        (
            ["--data.val_fraction=0.2", "--federation.select=val", "--federation.select_by=val/acc_std"],
            "one of val/acc_mean, val/acc_min",
        ),
    ],
    ids=["one", "negative", "val-without-split", "test-metric", "std"],
)  # fmt: skip
def test_bad_selection_settings_exit_2_with_one_line(tmp_path, capsys, flags, needle):
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_yaml({"backbone.pretrained": None}))
    argv = ["fit", "--config", str(config), f"--output_dir={tmp_path}", "--progress=false"]
    assert main([*argv, *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("*/checkpoints"))  # refused before anything ran


# ---- real fits -------------------------------------------------------------------------------


def _fit(tmp_path: Path, config: str, name: str, *extra: str) -> tuple[dict, list[dict]]:
    argv = ["fit", "--config", str(ROOT / "configs" / config), f"--output_dir={tmp_path}"]
    assert main([*argv, f"--run_name={name}", "--progress=false", *extra]) == 0
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / name / "csv" / "metrics.csv")))
    return summary, rows


def _values(row: dict, prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k.startswith(prefix) and v != ""}


def test_quickstart_reports_the_best_validation_round(shapes_cache, tmp_path, capsys):
    """configs/quickstart.yaml (small), val_fraction 0.25, select val: the reported round is
    the argmax of val/acc_mean over the trained rounds of metrics.csv (the earliest of
    ties), and summary.json's eval, val and client rows are that row's."""
    summary, rows = _fit(
        tmp_path, "quickstart.yaml", "q", "--federation.rounds=4",
        "--data.dataset.init_args.train_per_class=12", "--data.dataset.init_args.test_per_class=6",
        "--data.val_fraction=0.25", "--federation.select=val", "--federation.local_epochs=1",
    )  # fmt: skip
    trained = [r for r in rows if float(r["round"]) >= 1 and r.get("val/acc_mean")]
    best = max(trained, key=lambda r: (float(r["val/acc_mean"]), -float(r["round"])))
    sel = summary["selection"]
    assert (sel["rule"], sel["by"], sel["rounds_evaluated"]) == ("val", "val/acc_mean", 4)
    assert sel["round"] == int(float(best["round"]))
    assert summary["eval"] == pytest.approx(_values(best, "eval/"))
    assert summary["val"] == pytest.approx(_values(best, "val/"))
    assert summary["eval_last"] == pytest.approx(_values(rows[-1], "eval/"))
    for client in summary["clients"]:
        k = client["client"]
        assert client["acc"] == pytest.approx(float(best[f"client/{k}/acc"]))
        assert client["val_acc"] == pytest.approx(float(best[f"client/{k}/val_acc"]))
        assert client["train"] == sum(summary["partition"]["train_counts"][k])
        assert client["val"] == sum(summary["partition"]["val_counts"][k]) > 0
    assert f"reported: round {sel['round']} (best val/acc_mean)" in capsys.readouterr().out
    partition = json.loads((tmp_path / "q" / "partition.json").read_text())
    assert partition["val_fraction"] == 0.25 and [c["val"] for c in partition["clients"]]
    # `fedclip evaluate` evaluates the last checkpoint: its table is that, not a selected round
    assert main(["evaluate", "--run_dir", str(tmp_path / "q")]) == 0
    printed = capsys.readouterr().out
    evaluated = json.loads((tmp_path / "q" / "eval.json").read_text())
    assert "reported: round" not in printed
    assert f"{100 * evaluated['eval/acc_mean']:.2f}" in printed


def test_multilabel_quickstart_selects_by_val_map(shapes_cache, tmp_path):
    summary, rows = _fit(
        tmp_path, "multilabel_quickstart.yaml", "ml", "--federation.rounds=2",
        "--backbone.pretrained=null", "--data.dataset.init_args.train_images=160",
        "--data.dataset.init_args.test_images=60", "--data.num_clients=2",
        "--data.partitioner=fedclip.data.IID", "--data.val_fraction=0.25",
        "--federation.select=val", "--federation.local_epochs=1",
    )  # fmt: skip
    assert summary["selection"]["by"] == "val/map_mean"
    assert {"val/map_mean", "val/map_pooled", "val/global", "val/dual"} <= set(summary["val"])
    assert not any(k.startswith("val/class") for k in summary["val"])
    best = max(rows[1:], key=lambda r: (float(r["val/map_mean"]), -float(r["round"])))
    assert summary["selection"]["round"] == int(float(best["round"]))
    assert summary["eval"]["eval/map_mean"] == pytest.approx(float(best["eval/map_mean"]))


def test_base_to_novel_selects_by_val_acc(tmp_path):
    config = tmp_path / "b2n.yaml"
    config.write_text(
        tiny_yaml(
            {
                "backbone.pretrained": None,
                "data.base_to_novel": True,
                "data.val_fraction": 0.25,
                "federation.select": "val",
                "federation.rounds": 2,
            }
        )
    )
    argv = ["fit", "--config", str(config), f"--output_dir={tmp_path}", "--run_name=b"]
    assert main([*argv, "--progress=false"]) == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["selection"]["by"] == "val/acc_mean"
    assert {"val/acc_mean", "val/global"} <= set(summary["val"])
    assert "val/hm" not in summary["val"] and "eval/hm" in summary["eval"]


def _without_run(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "run"}


def test_resumed_run_selects_as_one_run_straight_through(tmp_path):
    def cfg():
        c = small_config(rounds=3)
        c.data.val_fraction, c.federation.select = 0.25, "val"
        return c

    full = Federation(cfg(), tmp_path / "a", show_progress=False)
    full.fit()
    part = Federation(cfg(), tmp_path / "b", show_progress=False)
    part.fit(stop_after=2)
    resumed = Federation(cfg(), tmp_path / "b", show_progress=False)
    resumed.fit(resume=True)
    assert _without_run(resumed.summary()) == _without_run(full.summary())
    assert full.summary()["selection"]["rounds_evaluated"] == 3


@pytest.mark.distributed
def test_flower_carries_the_validation_parts(tmp_path):
    """The Flower loop's val/* metrics and selection equal fedclip's own loop's."""
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    from .test_flower import PROMPTFL, flower_run, ids, reference, results, without_time, write

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    try:
        config = write(tmp_path, PROMPTFL)
        over = "--data.val_fraction=0.25 --federation.select=val --federation.eval_every=1"
        flower = flower_run(config, ids(2), over, fresh_process=True)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    local = reference(config, over)
    assert "val/acc_mean" in flower.history[-1]
    assert without_time(flower.history) == without_time(local.history)
    assert results(flower.summary()) == results(local.summary())
    assert flower.summary()["selection"]["rule"] == "val"


def test_loop_gives_the_loggers_the_selected_round():
    """`RoundLoop.summarize_selection` (run by `close`): the selected round's eval/* and
    val/* values and the round, to every logger that keeps a run summary (W&B)."""
    from types import SimpleNamespace

    from fedclip.federation.loop import RoundLoop

    class Keeper:
        def __init__(self):
            self.values = None

        def set_summary(self, values):
            self.values = values

    history = [_row(0, 0.1, 0.3), _row(1, 0.2, 0.8), _row(2, 0.9, 0.4)]
    keeper = Keeper()
    loop = SimpleNamespace(
        cfg=small_config(),
        info=SimpleNamespace(multilabel=False, base_to_novel=False),
        history=history,
        loggers=[keeper, object()],
    )
    RoundLoop.summarize_selection(loop)  # select: last: nothing to change
    assert keeper.values is None
    loop.cfg.federation.select = "val"
    RoundLoop.summarize_selection(loop)
    assert keeper.values == {"eval/acc_mean": 0.2, "val/acc_mean": 0.8, "selection/round": 1}


@pytest.mark.usefixtures("offline")
def test_wandb_summary_keeps_the_selected_value_over_the_last_logged(tmp_path):
    """`WandbTracker.set_summary` after the last row: the W&B summary (what a sweep
    compares) holds the selected round's value, not the last logged one."""
    from fedclip.config import LoggerConfig
    from fedclip.tracking import WandbTracker

    from .test_tracking import offline_runs, records, summary

    tracker = WandbTracker(tmp_path / "r", LoggerConfig(wandb=True, project="fedclip-test"))
    tracker.start(False, "eval/acc_mean", [], 0)
    tracker.log_metrics({"val/acc_mean": 0.9, "eval/acc_mean": 0.5}, step=1)
    tracker.log_metrics({"val/acc_mean": 0.1, "eval/acc_mean": 0.7}, step=2)
    tracker.set_summary({"val/acc_mean": 0.9, "eval/acc_mean": 0.5, "selection/round": 1})
    tracker.finish()
    (offline_run,) = offline_runs(tmp_path / "r")
    got = summary(records(offline_run))
    assert (got["val/acc_mean"], got["eval/acc_mean"], got["selection/round"]) == (0.9, 0.5, 1)


def test_several_data_sets_get_val_metrics_among_their_own_classes():
    """MultiDataset + ClassChunks under base-to-novel: each client's validation split is
    among its own (base) classes, and the run reports val/acc_mean and val/global."""
    from fedclip.backbone import BackboneConfig
    from fedclip.config import FabricConfig, FederationConfig, FitConfig
    from fedclip.data import ClassChunks
    from fedclip.learners import OptimConfig, TextualPrompt

    from .test_multidataset import two_shapes

    cfg = FitConfig(
        backbone=BackboneConfig(model="fedclip-tiny-vit"),
        learner=TextualPrompt(n_ctx=4),
        data=DataConfig(
            dataset=two_shapes(c1=6, c2=4),
            partitioner=ClassChunks(classes_per_client=2, shots=4),
            num_clients=None,
            batch_size=4,
            base_to_novel=True,
            val_fraction=0.25,
        ),
        federation=FederationConfig(rounds=1, select="val"),
        optim=OptimConfig(lr=0.05),
        fabric=FabricConfig(accelerator="cpu"),
    )
    fed = Federation(cfg, None, show_progress=False)
    fed.fit()
    data = fed.data
    for k in range(data.num_clients):
        held = data.train_labels[data.val_parts[k]]
        own = data.client_classes(k)
        assert set(held) <= set(own) and len(held) == len(own)  # 1 of its 4 shots per class
    row = fed.history[-1]
    assert {"val/acc_mean", "val/global", "eval/hm"} <= set(row) and "val/hm" not in row
    assert fed.summary()["selection"] == {**fed.summary()["selection"], "round": 1}
