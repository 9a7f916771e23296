"""Federations over several data sets: MultiDataset, ClassChunks (FedTPG's clients), each
client over its own class list, base and novel per data set averaged over data sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedclip.backbone import BackboneConfig
from fedclip.config import FabricConfig, FederationConfig, FitConfig
from fedclip.data import ClassChunks, Dirichlet, MultiDataset, MultiShapes, Shapes
from fedclip.data.coop import Caltech101
from fedclip.data.federated import DataConfig, FederatedData
from fedclip.data.partition.chunks import chunk_classes
from fedclip.errors import ConfigError, DataError
from fedclip.federation import Federation
from fedclip.learners import OptimConfig, TextualPrompt
from fedclip.methods import get_method
from fedclip.metrics import base_to_novel_metrics, harmonic_mean

from .conftest import tiny_yaml
from .test_flower import task_identity  # noqa: F401  (the Flower tests' fixture)


def fedtpg_chunks(m: int, cpc: int) -> list[list[int]]:
    """FedTPG's init_server, written out with numpy's around and explicit loops."""
    n = int(np.around(m / cpc))
    n = max(n, 1)
    out = []
    for i in range(n):
        if i == n - 1:
            out.append(list(range(i * cpc, m)))
        else:
            out.append(list(range(i * cpc, (i + 1) * cpc)))
    return out


@pytest.mark.parametrize("m", [1, 5, 10, 19, 20, 29, 30, 31, 49, 50, 51, 70, 100, 199])
def test_chunk_rule_is_fedtpg(m):
    assert chunk_classes(list(range(m)), 20) == fedtpg_chunks(m, 20)


def test_chunk_rule_by_hand():
    sizes = {m: [len(c) for c in chunk_classes(list(range(m)), 20)] for m in (50, 51, 30, 10)}
    assert sizes == {50: [20, 30], 51: [20, 20, 11], 30: [20, 10], 10: [10]}


def two_shapes(c1=9, c2=5, **kw):
    return MultiDataset(
        [
            Shapes(num_classes=c1, train_per_class=12, test_per_class=4, image_size=32, **kw),
            Shapes(num_classes=c2, train_per_class=12, test_per_class=4, image_size=32, seed=1,
                   style="tungsten"),
        ]
    )  # fmt: skip


def test_multidataset_source():
    src = two_shapes()
    names = src.classnames
    assert names[:5] == names[9:14]  # the same bare names in both: ids tell them apart
    assert src.class_dataset == [0] * 9 + [1] * 5 and src.offsets == [0, 9]
    assert src.names == ["shapes1", "shapes2"]
    for split in ("train", "test"):
        labels = src.labels(split)
        n = 9 * (12 if split == "train" else 4)
        assert (labels[:n] == np.arange(n) % 9).all() and (
            labels[n:] == 9 + np.arange(len(labels) - n) % 5
        ).all()
        ds = src.dataset(split, None)
        assert len(ds) == len(labels) and ds[n][1] == 9 and ds[n - 1][1] == labels[n - 1]
    assert src.key("train") != two_shapes(c2=6).key("train")
    assert src.key("train") != src.key("test")
    assert src.domain_names is None and src.domains("train") is None


def test_multidataset_refuses_multilabel_and_names_the_missing_member(tmp_path):
    with pytest.raises(ConfigError, match=r"datasets\[1\].*multi-label") as e:
        MultiDataset([Shapes(), MultiShapes()])
    assert "\n" not in str(e.value)
    src = MultiDataset([Shapes(), Caltech101(root=str(tmp_path / "nowhere"))])
    with pytest.raises(DataError, match=r"datasets\[1\] \(caltech101, root .*nowhere") as e:
        src.check()


def chunk_data(seed=0, shots=3, b2n=True, num_clients=None, cpc=2):
    cfg = DataConfig(
        dataset=two_shapes(),
        partitioner=ClassChunks(classes_per_client=cpc, shots=shots),
        num_clients=num_clients,
        base_to_novel=b2n,
    )
    return FederatedData(cfg, seed)


def test_chunks_cover_base_classes_disjoint_consecutive_with_shots():
    data = chunk_data()
    # base: first ceil(9/2)=5 of data set 0 (ids 0-4), ceil(5/2)=3 of data set 1 (ids 9-11)
    assert data.train_classes.tolist() == [0, 1, 2, 3, 4, 9, 10, 11]
    # chunks of 2: 5 -> round(2.5)=2 chunks (2 + 3); 3 -> round(1.5)=2 chunks (2 + 1)
    assert data.own_classes == [[0, 1], [2, 3, 4], [9, 10], [11]]
    assert data.num_clients == 4
    seen = []
    for k, own in enumerate(data.own_classes):
        labels = data.train_labels[data.train_parts[k]]
        assert sorted(set(labels.tolist())) == own
        assert all((labels == c).sum() == 3 for c in own)  # shots
        test = data.test_labels[data.test_parts[k]]
        assert (
            sorted(data.test_parts[k].tolist())
            == np.flatnonzero(np.isin(data.test_labels, own)).tolist()
        )
        assert set(test.tolist()) == set(own)
        seen += own
    assert sorted(seen) == data.train_classes.tolist()  # coverage, disjoint
    flat = np.concatenate(data.train_parts)
    assert len(flat) == len(set(flat.tolist()))
    assert [r["dataset"] for r in data.summary()["clients"]] == ["shapes1"] * 2 + ["shapes2"] * 2
    again, other = chunk_data(), chunk_data(seed=1)
    assert all((a == b).all() for a, b in zip(again.train_parts, data.train_parts, strict=True))
    assert any((a != b).any() for a, b in zip(other.train_parts, data.train_parts, strict=True))
    # labels -> positions in the client's own list
    assert data.train_label_map(1)[torch.tensor([2, 3, 4])].tolist() == [0, 1, 2]
    # per data set shares of base and novel test images, disjoint, covering
    for d, name in enumerate(["shapes1", "shapes2"]):
        for kind in ("base", "novel"):
            got = np.sort(np.concatenate(data.parts[f"{kind}/{name}"]))
            want = np.flatnonzero(np.isin(data.test_labels, data.dataset_classes(d, kind)))
            assert (got == want).all()
    assert data.dataset_classes(1, "novel") == [12, 13]


def test_all_shots_and_without_base_to_novel():
    data = chunk_data(shots=None, b2n=False, cpc=4)
    # 9 -> round(2.25)=2 chunks (4 + 5); 5 -> 1 chunk
    assert data.own_classes == [[0, 1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11, 12, 13]]
    assert sum(len(p) for p in data.train_parts) == len(data.train_labels)
    assert sorted(data.parts) == ["global/shapes1", "global/shapes2", "test", "train"]


def test_num_clients_mismatch_and_null_elsewhere():
    with pytest.raises(ConfigError, match=r"data.num_clients=3, but ClassChunks.* 4 clients") as e:
        chunk_data(num_clients=3)
    assert "\n" not in str(e.value)
    assert chunk_data(num_clients=4).num_clients == 4
    with pytest.raises(ConfigError, match="data.num_clients is null"):
        FederatedData(
            DataConfig(dataset=two_shapes(), partitioner=Dirichlet(), num_clients=None), 0
        )


def test_cli_num_clients(tmp_path, capsys):
    from fedclip.cli import main

    data = {
        "class_path": "fedclip.data.MultiDataset",
        "init_args": {"datasets": [
            {"class_path": "fedclip.data.Shapes", "init_args": {"num_classes": 4, "image_size": 32}},
            {"class_path": "fedclip.data.Shapes", "init_args": {"num_classes": 4, "image_size": 32, "style": "tungsten"}},
        ]},
    }  # fmt: skip
    chunks = {"class_path": "fedclip.data.ClassChunks", "init_args": {"classes_per_client": 2}}
    path = tmp_path / "multi.yaml"
    path.write_text(
        tiny_yaml({"data.dataset": data, "data.partitioner": chunks, "data.num_clients": 3})
    )
    out = tmp_path / "parts"
    assert main(["partition", "--config", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.num_clients=3, but ClassChunks" in err and "\n" not in err
    path.write_text(
        tiny_yaml({"data.dataset": data, "data.partitioner": chunks, "data.num_clients": None})
    )
    assert main(["partition", "--config", str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dataset" in text and "shapes2" in text
    assert (tmp_path / "parts.json").exists()


def test_metrics_per_data_set_by_hand():
    result = {  # two clients of data set a, one of b
        0: {"local": (3, 4), "local/a": (3, 4), "base/a": (2, 4), "novel/a": (1, 4), "base/b": (4, 4), "novel/b": (0, 2)},
        1: {"local": (1, 4), "local/a": (1, 4), "base/a": (2, 4), "novel/a": (1, 4), "base/b": (0, 0), "novel/b": (1, 2)},
        2: {"local": (2, 2), "local/b": (2, 2), "base/a": (0, 0), "novel/a": (2, 4), "base/b": (2, 4), "novel/b": (1, 2)},
    }  # fmt: skip
    m = base_to_novel_metrics(result)
    local_a, local_b = (0.75 + 0.25) / 2, 1.0
    base_a, base_b = 4 / 8, 6 / 8
    novel_a, novel_b = 4 / 12, 2 / 6
    assert m["eval/local/a"] == pytest.approx(local_a) and m["eval/local/b"] == pytest.approx(
        local_b
    )
    assert m["eval/base/a"] == pytest.approx(base_a) and m["eval/novel/b"] == pytest.approx(novel_b)
    local, base, novel = (local_a + local_b) / 2, (base_a + base_b) / 2, (novel_a + novel_b) / 2
    assert m["eval/local"] == pytest.approx(local)
    assert m["eval/base"] == pytest.approx(base) and m["eval/novel"] == pytest.approx(novel)
    assert m["eval/hm"] == pytest.approx(3 / (1 / local + 1 / base + 1 / novel))
    assert m["eval/acc_mean"] == pytest.approx((0.75 + 0.25 + 1.0) / 3)  # over clients
    assert m["eval/dual"] == pytest.approx(2 * local * base / (local + base))


def fit_multi(learner, rounds=1, strategy=None):
    cfg = FitConfig(
        backbone=BackboneConfig(model="fedclip-tiny-vit"),
        learner=learner,
        **({} if strategy is None else {"strategy": strategy}),
        data=DataConfig(
            dataset=two_shapes(c1=6, c2=4),
            partitioner=ClassChunks(classes_per_client=2, shots=4),
            num_clients=None,
            batch_size=4,
            base_to_novel=True,
        ),
        federation=FederationConfig(rounds=rounds),
        optim=OptimConfig(lr=0.05),
        fabric=FabricConfig(accelerator="cpu"),
    )
    fed = Federation(cfg, None, show_progress=False)
    fed.fit()
    return fed


def _hand_accuracy(learner, clip, source, idx, labels, classes) -> tuple[int, int]:
    """The learner's text features of `classes` against raw test images, float64."""
    images = torch.stack([source.dataset("test", clip.preprocess_val)[int(i)][0] for i in idx])
    with torch.no_grad():
        f = clip.encode_image(images).double().numpy()
        t = learner.text_features().double().cpu().numpy()
    assert t.shape[0] == len(classes)
    pred = (f @ t.T).argmax(1)
    want = np.array([classes.index(int(c)) for c in labels])
    return int((pred == want).sum()), len(idx)


@pytest.mark.parametrize("method", ["promptfl", "fedpgp"])
def test_federation_local_is_own_classes_and_base_novel_per_data_set(method):
    learner, _ = get_method(method).build(tiny=True)
    fed = fit_multi(learner)
    data, runtime, clip = fed.data, fed.runtime, fed.clip
    final = fed.history[-1]
    # base: ids 0-2 of data set 0 -> round(1.5) = 2 chunks; ids 6-7 of data set 1 -> 1 chunk
    assert data.own_classes == [[0, 1], [2], [6, 7]]
    for k in range(data.num_clients):
        learner = runtime.clients[k].learner
        own = data.client_classes(k)
        assert learner.classnames == [data.all_classnames[c] for c in own]
        idx = data.test_parts[k]
        correct, total = _hand_accuracy(
            learner.eval(), clip, data.source, idx, data.test_labels[idx], own
        )
        assert final[f"client/{k}/acc"] == pytest.approx(correct / total)
    per = {"base": [], "novel": []}
    for d, name in enumerate(data.dataset_names):
        for kind in ("base", "novel"):
            classes = data.dataset_classes(d, kind)
            idx = np.flatnonzero(np.isin(data.test_labels, classes))
            learner = runtime.clients[0].learner
            with runtime.global_pass(0):
                learner.set_classes([data.all_classnames[c] for c in classes])
                c, n = _hand_accuracy(
                    learner, clip, data.source, idx, data.test_labels[idx], classes
                )
                learner.set_classes([data.all_classnames[c] for c in data.client_classes(0)])
            assert final[f"eval/{kind}/{name}"] == pytest.approx(c / n)
            per[kind].append(c / n)
    base, novel = np.mean(per["base"]), np.mean(per["novel"])
    assert final["eval/base"] == pytest.approx(base) and final["eval/novel"] == pytest.approx(novel)
    assert final["eval/hm"] == pytest.approx(harmonic_mean([final["eval/local"], base, novel]))
    summary = fed.summary()
    assert [r["dataset"] for r in summary["clients"]] == ["shapes1", "shapes1", "shapes2"]
    assert summary["datasets"]["names"] == ["shapes1", "shapes2"]


def test_per_data_set_parts_survive_flower_records():
    from fedclip.flower.records import eval_record, read_eval

    result = {"local": (3, 4), "local/a": (3, 4), "base/a": (1, 2), "novel/b": (0, 0)}
    assert read_eval(eval_record(result, {}))[0] == result


def test_class_specific_contexts_are_refused_in_one_line():
    cfg = FitConfig(
        backbone=BackboneConfig(model="fedclip-tiny-vit"),
        learner=TextualPrompt(n_ctx=4, csc=True),
        data=DataConfig(
            dataset=two_shapes(), partitioner=ClassChunks(2, shots=2), num_clients=None
        ),
        fabric=FabricConfig(accelerator="cpu"),
    )
    with pytest.raises(ConfigError, match=r"csc.*its own classes") as e:
        Federation(cfg, None, show_progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_fedmvp_runs_over_several_data_sets():
    learner, _ = get_method("fedmvp").build(tiny=True)
    fed = fit_multi(learner)
    final = fed.history[-1]
    for k in range(fed.data.num_clients):
        own = fed.data.client_classes(k)
        assert fed.runtime.clients[k].learner.classnames == [
            fed.data.all_classnames[c] for c in own
        ]
    parts = [final["eval/local"], final["eval/base"], final["eval/novel"]]
    assert final["eval/hm"] == pytest.approx(harmonic_mean(parts))
    assert final["eval/base"] == pytest.approx(
        (final["eval/base/shapes1"] + final["eval/base/shapes2"]) / 2
    )


MULTI_DATA = {
    "class_path": "fedclip.data.MultiDataset",
    "init_args": {"datasets": [
        {"class_path": "fedclip.data.Shapes",
         "init_args": {"num_classes": 6, "train_per_class": 4, "test_per_class": 2, "image_size": 32}},
        {"class_path": "fedclip.data.Shapes",
         "init_args": {"num_classes": 4, "train_per_class": 4, "test_per_class": 2, "image_size": 32,
                       "style": "tungsten"}},
    ]},
}  # fmt: skip


@pytest.mark.distributed
@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("method", ["promptfl", "fedpgp"])
def test_flower_equals_fit_over_several_data_sets(tmp_path, method):
    """Flower nodes build their clients over their own class lists as `fedclip fit` does:
    bitwise the same global state, metrics and summary."""
    from .test_flower import assert_same_state, flower_run, ids, reference, results, without_time

    m = get_method(method)
    over = {
        "learner": {"class_path": m.learner, "init_args": {**m.learner_args, **m.tiny_args}},
        "data.dataset": MULTI_DATA,
        "data.partitioner": {"class_path": "fedclip.data.ClassChunks",
                             "init_args": {"classes_per_client": 2, "shots": 3}},
        "data.num_clients": None,
        "data.base_to_novel": True,
        "federation.rounds": 1,
    }  # fmt: skip
    config = tmp_path / "run.yaml"
    config.write_text(tiny_yaml(over))
    flower = flower_run(config, ids(3), fresh_process=False)
    local = reference(config)
    assert_same_state(flower.strategy.global_state, local.strategy.global_state)
    assert without_time(flower.history) == without_time(local.history)
    assert results(flower.summary()) == results(local.summary())
    assert "eval/base/shapes2" in local.history[-1]


def test_further_evaluation_models_are_evaluated_per_data_set():
    """GPA's model after one round is that round's aggregate: its per-data-set base and
    novel accuracies, averaged over data sets, equal the global part's."""
    from fedclip.strategies import GaussianPromptAggregation

    fed = fit_multi(TextualPrompt(n_ctx=4), strategy=GaussianPromptAggregation())
    last = fed.history[-1]
    for kind in ("base", "novel", "hm"):
        assert last[f"eval/{kind}_gpa"] == pytest.approx(last[f"eval/{kind}"]), kind
    assert not any(k.startswith("eval/base/") and "gpa" in k for k in last)
