"""The learner and strategy contract, checked for every registered method.

Each method: one local step changes only tensors it declares trainable (shared or
personal) and never the frozen backbone; its upload holds exactly its declared shared keys
and no personal tensor; its personal state survives a checkpoint round trip and a Flower
record round trip; multi-label and base-to-novel runs either work or are refused in one
line; and a stopped-and-resumed run equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch

from fedclip.data import IID, MultiShapes
from fedclip.data.federated import DataConfig
from fedclip.errors import FedclipError
from fedclip.federation import Federation
from fedclip.federation.records import ClientOutcome, Upload
from fedclip.learners.base import check_contract
from fedclip.methods import CONFIGS, get_method, list_methods

from .conftest import small_config

METHODS = list_methods()


def config(name: str, **over):
    learner, strategy = get_method(name).build(tiny=True)
    return small_config(learner=learner, strategy=strategy, **over)


def state_equal(a, b, key: str = "") -> None:
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), key
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), key
        for k in a:
            state_equal(a[k], b[k], f"{key}/{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), key
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            state_equal(x, y, f"{key}/{i}")
    else:
        assert a == b or (a != a and b != b), key  # NaN equals NaN


def without_time(history) -> str:
    return json.dumps([{k: v for k, v in r.items() if not k.startswith("time/")} for r in history])


@pytest.mark.parametrize("name", METHODS)
def test_one_step_trains_only_declared_tensors_and_uploads_only_shared(name):
    fed = Federation(config(name, rounds=1), None, show_progress=False)
    client = fed.clients[0]
    learner = client.learner
    check_contract(learner)
    shared, personal = set(learner.shared_keys()), set(learner.personal_keys())
    assert not shared & personal
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    backbone = [p.detach().clone() for p in fed.clip.parameters()]
    fed.runtime.fit_client(0, 0)
    changed = {n for n, p in learner.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= shared | personal, (
        f"undeclared tensors trained: {changed - shared - personal}"
    )
    if learner.has_trainable():
        assert changed, "a local epoch changed nothing"
    assert all(torch.equal(p, q) for p, q in zip(fed.clip.parameters(), backbone, strict=True))
    upload = client.upload()
    assert set(upload) == shared
    assert not set(upload) & personal
    if fed.runtime.uploads:
        assert set(fed.strategy.validate_upload(upload, learner.shared_keys())) == shared


@pytest.mark.parametrize("name", METHODS)
def test_personal_state_survives_checkpoint_and_flower_records(name, tmp_path):
    fed = Federation(config(name, rounds=1), tmp_path / "run", show_progress=False)
    fed.fit()
    again = Federation(config(name, rounds=1), None, show_progress=False)
    again.load(fed.checkpoint_path)
    for a, b in zip(fed.clients, again.clients, strict=True):
        state_equal(a.client_state(), b.client_state())
    pytest.importorskip("flwr")
    from fedclip.flower.records import read_state_bytes, read_turn, state_bytes, turn_record

    state = fed.clients[1].client_state()
    state_equal(read_state_bytes(state_bytes(state)), state)
    outcome = ClientOutcome(
        1, down=3, up=4, loss=0.5, metrics={"client/1/x": 1.0}, released=True,
        upload=Upload(fed.clients[1].upload(), 7, {"loss": 0.5}),
        report=fed.clients[1].learner.report(),
    )  # fmt: skip
    back = read_turn(turn_record(outcome), 1)
    state_equal(back.upload.state, outcome.upload.state)
    assert (back.down, back.up, back.loss, back.metrics, back.released, back.report) == (
        3, 4, 0.5, {"client/1/x": 1.0}, True, outcome.report,
    )  # fmt: skip


@pytest.mark.parametrize("name", METHODS)
def test_multilabel_and_base_to_novel_work_or_are_refused(name):
    cfg = config(name, rounds=1)
    cfg.data = DataConfig(
        dataset=MultiShapes(num_classes=4, train_images=16, test_images=8, image_size=32),
        partitioner=IID(),
        num_clients=2,
        batch_size=8,
    )
    works_or_is_refused(cfg, "eval/map_mean")
    cfg = config(name, rounds=1)
    cfg.data.base_to_novel = True
    works_or_is_refused(cfg, "eval/hm")


def works_or_is_refused(cfg, metric: str) -> None:
    """The run gives `metric` in [0, 1], or is refused with one line naming the learner."""
    try:
        fed = Federation(cfg, None, show_progress=False)
    except FedclipError as e:
        assert "\n" not in str(e) and type(cfg.learner).__name__ in str(e)
    else:
        assert 0.0 <= fed.fit()[-1][metric] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_resume_is_bitwise(name, tmp_path):
    whole = Federation(config(name, rounds=2), None, show_progress=False)
    whole.fit()
    first = Federation(config(name, rounds=2), tmp_path / "run", show_progress=False)
    first.fit(stop_after=1)
    second = Federation(config(name, rounds=2), tmp_path / "run", show_progress=False)
    second.fit(resume=True)
    assert without_time(second.history) == without_time(whole.history)
    for a, b in zip(second.clients, whole.clients, strict=True):
        state_equal(a.client_state(), b.client_state())
    if whole.strategy.global_state is not None:
        state_equal(second.strategy.global_state, whole.strategy.global_state)


def test_every_method_has_its_quickstart_and_classes():
    for name in METHODS:
        method = get_method(name)
        assert (CONFIGS / method.quickstart).is_file(), method.quickstart
        if method.paper:
            assert (CONFIGS / method.paper).is_file(), method.paper
        text = (CONFIGS / method.quickstart).read_text()
        assert method.learner in text and method.strategy in text, name
        method.learner_class(), method.strategy_class()  # the class paths resolve


def test_the_readme_method_table_is_the_registry():
    readme = (CONFIGS.parent / "README.md").read_text()
    from fedclip.methods import markdown_table

    assert markdown_table() in readme, "paste fedclip.methods.markdown_table() into README.md"
