"""Every registered method with personal parts keeps them wherever it runs: 2 Fabric
ranks equal 1 process, and a Flower run (a fresh process per message) equals fedclip's own
loop, bit for bit, personal tensors included."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedclip.learners.base import make_learner
from fedclip.methods import get_method, list_methods

from .conftest import tiny_yaml
from .test_distributed import ckpt, run_one_rank, run_two_ranks
from .test_flower import (  # noqa: F401  (task_identity: a fixture)
    flower_run,
    ids,
    reference,
    results,
    task_identity,
    without_time,
)
from .test_reliability import assert_same_state, fit_args


def personal_methods() -> list[str]:
    """The registered methods whose learners hold trainable tensors that never travel."""
    from fedclip.backbone import BackboneConfig, load_backbone

    clip = load_backbone(BackboneConfig(model="fedclip-tiny-vit"))
    classes = ["red circle", "green square", "blue triangle", "yellow star"]  # (attributes)
    names = []
    for name in list_methods():
        learner, _ = get_method(name).build(tiny=True)
        if make_learner(learner, clip, classes, 0, client_id=0).personal_keys():
            names.append(name)
    return names


def method_yaml(name: str, **over) -> str:
    m = get_method(name)
    learner = {"class_path": m.learner, "init_args": {**m.learner_args, **m.tiny_args}}
    strategy = {"class_path": m.strategy, "init_args": dict(m.strategy_args)}
    return tiny_yaml(
        {
            "seed": 2,
            "learner": learner,
            "strategy": strategy,
            "data.dataset.init_args.train_per_class": 12,
            "data.dataset.init_args.test_per_class": 6,
            "data.partitioner": {
                "class_path": "fedclip.data.Dirichlet",
                "init_args": {"alpha": 1.0, "min_size": 2},
            },
            "data.num_clients": 3,
            "federation": {"rounds": 2, "fraction": 0.67, "local_epochs": 1, "eval_every": 1},
            "optim": {"lr": 0.05},
            **over,
        }
    )


@pytest.fixture(scope="module")
def personal():
    return personal_methods()


@pytest.mark.distributed
@pytest.mark.parametrize("name", list_methods())
def test_two_ranks_equal_one_with_personal_parts(name, personal, tmp_path, capsys):
    if name not in personal:
        pytest.skip(f"{name} has no personal parts")
    config = tmp_path / "run.yaml"
    config.write_text(method_yaml(name))
    out = tmp_path / "runs"
    run_two_ranks(fit_args(config, out, "two"), tmp_path)
    run_one_rank(fit_args(config, out, "one"), capsys)
    assert_same_state(ckpt(out, "two"), ckpt(out, "one"))


@pytest.mark.distributed
@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("name", list_methods())
def test_flower_equals_fedclip_fit_with_personal_parts(name, personal, tmp_path):
    if name not in personal:
        pytest.skip(f"{name} has no personal parts")
    config = tmp_path / "run.yaml"
    config.write_text(method_yaml(name))
    flower = flower_run(config, ids(3), fresh_process=True)
    local = reference(Path(config))
    # the whole loop state: the aggregate and every client's personal tensors and optimizer
    assert_same_state(flower.state_dict(), local.state_dict())
    assert without_time(flower.history) == without_time(local.history)
    assert results(flower.summary()) == results(local.summary())
