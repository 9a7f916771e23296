"""Shared fixtures: fedclip's tiny random-weight open_clip architectures and small configs."""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torchvision
import yaml

from fedclip.backbone import BackboneConfig, load_backbone
from fedclip.config import FabricConfig, FederationConfig, FitConfig
from fedclip.data import IID, Shapes
from fedclip.data.federated import DataConfig
from fedclip.learners import OptimConfig, TextualPrompt
from fedclip.strategies import FedAvg


@pytest.fixture(scope="session")
def tiny_vit():
    return load_backbone(BackboneConfig(model="fedclip-tiny-vit"))


@pytest.fixture(scope="session")
def tiny_rn():
    return load_backbone(BackboneConfig(model="fedclip-tiny-rn"))


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory):
    """fedclip-tiny-vit pre-trained on Shapes, cached for this test session only."""
    old = os.environ.get("FEDCLIP_CACHE")
    os.environ["FEDCLIP_CACHE"] = str(tmp_path_factory.mktemp("fedclip-cache"))
    yield
    if old is None:
        del os.environ["FEDCLIP_CACHE"]
    else:
        os.environ["FEDCLIP_CACHE"] = old


TINY_RUN = {
    "seed": 0,
    "backbone": {"model": "fedclip-tiny-vit"},
    "learner": {"class_path": "fedclip.learners.TextualPrompt", "init_args": {"n_ctx": 4}},
    "data": {
        "dataset": {
            "class_path": "fedclip.data.Shapes",
            "init_args": {
                "num_classes": 4,
                "train_per_class": 8,
                "test_per_class": 4,
                "image_size": 32,
            },
        },
        "partitioner": {"class_path": "fedclip.data.IID"},
        "num_clients": 2,
        "batch_size": 8,
    },
    "federation": {"rounds": 2, "local_epochs": 1},
    "fabric": {"accelerator": "cpu"},
}


def tiny_yaml(over: dict | None = None) -> str:
    """The YAML of a tiny `fedclip fit` run (4 Shapes classes at 32 px, 2 IID clients, the
    tiny ViT with random weights, CoOp with 4 context tokens, 2 rounds on the CPU).

    over: {dotted key: value}, each setting (replacing) the value at that path, e.g.
    {"seed": 3, "federation.rounds": 1, "learner": {...}, "data.dataset.init_args.image_size": 64}.
    """
    run = copy.deepcopy(TINY_RUN)
    for key, value in (over or {}).items():
        *path, leaf = key.split(".")
        node = run
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = copy.deepcopy(value)
    return yaml.safe_dump(run, sort_keys=False)


def small_config(**over) -> FitConfig:
    """2 clients, 2 rounds, 4 classes of Shapes at 32 px: seconds on a CPU."""
    cfg = FitConfig(
        seed=over.pop("seed", 0),
        backbone=BackboneConfig(model=over.pop("model", "fedclip-tiny-vit")),
        learner=over.pop("learner", TextualPrompt(n_ctx=4)),
        strategy=over.pop("strategy", FedAvg()),
        data=DataConfig(
            dataset=Shapes(num_classes=4, train_per_class=12, test_per_class=6, image_size=32),
            partitioner=over.pop("partitioner", IID()),
            num_clients=over.pop("num_clients", 2),
            batch_size=8,
            augment=over.pop("augment", False),
        ),
        federation=FederationConfig(
            rounds=over.pop("rounds", 2),
            fraction=over.pop("fraction", 1.0),
            local_epochs=over.pop("local_epochs", 1),
        ),
        optim=OptimConfig(lr=over.pop("lr", 0.05)),
        fabric=FabricConfig(accelerator="cpu"),
    )
    assert not over, f"unknown overrides {over}"
    return cfg


@pytest.fixture
def skip_md5(monkeypatch):
    # torchvision verifies every CIFAR file against the md5 of the published archive, which the
    # tiny fakes cannot match. Its CIFAR code checks files with the module-level check_integrity
    # (both the batches, via CIFAR10._check_integrity, and the meta file, in _load_meta), so
    # make that test only that the file exists: patching _check_integrity alone would still fail
    # on the meta file, and "exists" keeps the missing-data path real.
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar100_full(root: Path, per_class: tuple[int, int] = (6, 2)) -> None:
    """A small CIFAR-100 with all 100 classes and 20 superclasses in the real
    cifar-100-python pickle layout."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    coarse_of = [c % 20 for c in range(100)]
    for split, n in zip(("train", "test"), per_class, strict=True):
        fine = np.repeat(np.arange(100), n).tolist()
        _dump(
            folder / split,
            {
                "filenames": [f"{i}.png" for i in range(len(fine))],
                "batch_label": split,
                "fine_labels": fine,
                "coarse_labels": [coarse_of[f] for f in fine],
                "data": rng.integers(0, 256, size=(len(fine), 3072), dtype=np.uint8),
            },
        )
    _dump(
        folder / "meta",
        {
            "fine_label_names": [f"class_{c}" for c in range(100)],
            "coarse_label_names": [f"group_{g}" for g in range(20)],
        },
    )


def fit_shipped_config_offline(name: str, tmp_path: Path, *extra: str) -> dict:
    """`fedclip fit` of configs/`name` for one round with the tiny random-weight ViT on
    the data under tmp_path/data, in process; returns the run's summary.json."""
    import json

    from fedclip.cli import main

    code = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / name),
            "--backbone.model=fedclip-tiny-vit",
            "--backbone.pretrained=null",
            f"--data.dataset.init_args.root={tmp_path / 'data'}",
            "--data.num_workers=0",
            "--federation.rounds=1",
            "--fabric.accelerator=cpu",
            f"--output_dir={tmp_path / 'runs'}",
            "--run_name=offline",
            "--progress=false",
            *extra,
        ]
    )
    assert code == 0, f"fedclip fit --config {name} exited with {code}"
    return json.loads((tmp_path / "runs" / "offline" / "summary.json").read_text())
