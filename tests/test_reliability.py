"""Crash safety, graceful stops, failing clients and upload validation, on the tiny model."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedclip.checkpoint import CheckpointError, load_checkpoint, save_atomic
from fedclip.cli import main
from fedclip.federation import Federation
from fedclip.learners import MixtureOfPrompts
from fedclip.strategies import FedAvg, PFedMoAP, UploadError

from .conftest import small_config, tiny_yaml


# augment: true makes every step read images, so rounds last long enough to be interrupted
def tiny_run(rounds: int) -> str:
    return tiny_yaml(
        {
            "seed": 3,
            "data.dataset.init_args.train_per_class": 16,
            "data.num_clients": 3,
            "data.augment": True,
            "federation": {"rounds": rounds, "fraction": 0.67, "local_epochs": 1, "eval_every": 5},
        }
    )


def write_config(tmp_path: Path, rounds: int) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_run(rounds))
    return path


def fit_args(config: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["fit", "--config", str(config), f"--output_dir={out}", f"--run_name={name}",
            "--progress=false", *extra]  # fmt: skip


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedclip.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_round(ckpt: Path, proc: subprocess.Popen, at_least: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-2000:]}"
        if ckpt.is_file() and load_checkpoint(ckpt)["round"] >= at_least:
            return
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint of round {at_least} within {timeout} s")


def signal_run(
    args: list[str], cwd: Path, ckpt: Path, at_least: int, sig: int, delay: float = 0.0
) -> tuple[subprocess.Popen, str, int]:
    """Start `fedclip ARGS`, send `sig` once its checkpoint reaches round `at_least` (plus a
    random delay up to `delay` s); returns the process, its stderr and the checkpoint's
    mtime (ns) when the signal went out."""
    proc = start(args, cwd)
    try:
        wait_for_round(ckpt, proc, at_least)
        time.sleep(random.Random().uniform(0.0, delay))
        before = os.stat(ckpt).st_mtime_ns
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc, err, before


def assert_same_state(a: dict, b: dict) -> None:
    """Two federation checkpoints hold bitwise the same state (wall-clock times aside)."""
    assert a["round"] == b["round"]
    for key, t in a["strategy"]["global_state"].items():
        assert torch.equal(t, b["strategy"]["global_state"][key]), key
    for ca, cb in zip(a["clients"], b["clients"], strict=True):
        assert ca["learner"].keys() == cb["learner"].keys()
        for key, t in ca["learner"].items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(t, cb["learner"][key]), key
        assert len(ca["optimizers"]) == len(cb["optimizers"])
        for oa, ob in zip(ca["optimizers"], cb["optimizers"], strict=True):
            for pid, st in oa["state"].items():
                for name, v in st.items():
                    if isinstance(v, torch.Tensor):
                        assert torch.equal(v, ob["state"][pid][name]), (pid, name)
    assert torch.equal(a["sampler"], b["sampler"]) and torch.equal(a["torch_rng"], b["torch_rng"])
    strip = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in a["history"]]
    assert strip == [
        {k: v for k, v in r.items() if not k.startswith("time/")} for r in b["history"]
    ]
    assert a["partial"] is None and b["partial"] is None


# ---- crash safety ----------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    config = write_config(tmp_path, rounds=25)
    out = tmp_path / "runs"
    ckpt = out / "killed" / "checkpoints" / "last.ckpt"
    # anywhere after round 2: training, evaluation or a save
    signal_run(fit_args(config, out, "killed"), tmp_path, ckpt, 2, signal.SIGKILL, delay=0.4)
    killed_at = load_checkpoint(ckpt)  # intact and loadable whatever the moment
    assert 2 <= killed_at["round"] < 25

    assert main([*fit_args(config, out, "killed"), "--resume=true"]) == 0
    assert main(fit_args(config, out, "whole")) == 0
    capsys.readouterr()
    assert_same_state(load_checkpoint(ckpt), load_checkpoint(out / "whole/checkpoints/last.ckpt"))


@pytest.mark.slow
def test_atomic_save_survives_sigkill_during_writes(tmp_path):
    """A process that keeps rewriting a 16 MB checkpoint is killed at random moments: the
    file is always one complete version."""
    path = tmp_path / "c.ckpt"
    writer = (
        "import sys, torch\n"
        "from fedclip.checkpoint import save_atomic\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    save_atomic({'i': i, 'x': torch.full((4_000_000,), float(i))}, sys.argv[1])\n"
    )
    rng = random.Random()
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", writer, str(path)])
        try:
            end = time.monotonic() + 60
            while not path.is_file() and time.monotonic() < end:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.05, 0.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            proc.kill()
        obj = torch.load(path, weights_only=True)
        assert torch.equal(obj["x"], torch.full((4_000_000,), float(obj["i"])))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_writes_a_checkpoint_and_exits(tmp_path, sig):
    config = write_config(tmp_path, rounds=200)
    out = tmp_path / "runs"
    ckpt = out / "stopped" / "checkpoints" / "last.ckpt"
    proc, err, before = signal_run(fit_args(config, out, "stopped"), tmp_path, ckpt, 1, sig)
    assert proc.returncode == 128 + sig, err
    assert f"stopped by {signal.Signals(sig).name}" in err and "--resume true" in err
    state = load_checkpoint(ckpt)
    assert os.stat(ckpt).st_mtime_ns > before  # written on the way out
    assert state["round"] < 200


def test_stop_in_the_middle_of_a_client_resumes_bitwise(tmp_path, monkeypatch):
    """SIGTERM while a client trains: that client is rolled back, the round so far is
    checkpointed, and the resumed run ends where an uninterrupted one does (pFedMoAP, whose
    server pool and personal gating make every client's state matter)."""

    def config():
        return small_config(
            learner=MixtureOfPrompts(n_ctx=4, gating_heads=4),
            strategy=PFedMoAP(num_experts=2),
            num_clients=3,
            rounds=3,
        )

    whole = Federation(config(), tmp_path / "whole", {}, show_progress=False)
    whole.fit()

    stopped = Federation(config(), tmp_path / "stopped", {}, show_progress=False)
    real_step = stopped.clients[1].training_step
    calls = {"n": 0}

    def step_then_signal(batch, i):
        calls["n"] += 1
        if calls["n"] == 3:  # client 1's first step of round 2 (2 steps a round)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(batch, i)

    monkeypatch.setattr(stopped.clients[1], "training_step", step_then_signal)
    stopped.fit()
    assert stopped.stopped_by == signal.SIGTERM
    partial = load_checkpoint(stopped.checkpoint_path)
    assert partial["round"] == 1 and partial["partial"]["done"] == [0]
    assert partial["partial"]["sampled"] == [0, 1, 2]

    resumed = Federation(config(), tmp_path / "stopped", {}, show_progress=False)
    resumed.fit(resume=True)
    assert resumed.stopped_by is None
    assert_same_state(
        load_checkpoint(resumed.checkpoint_path), load_checkpoint(whole.checkpoint_path)
    )


# ---- failing clients -------------------------------------------------------------------------
def _spy_aggregate(fed: Federation) -> list[dict]:
    seen: list[dict] = []
    real = fed.strategy.aggregate

    def spy(rnd, results):
        seen.append(dict(results))
        return real(rnd, results)

    fed.strategy.aggregate = spy
    return seen


def test_a_raising_and_a_nan_client_are_left_out(tmp_path, caplog):
    fed = Federation(small_config(num_clients=4, rounds=1), None, {}, show_progress=False)
    seen = _spy_aggregate(fed)

    def boom(batch):
        raise RuntimeError("disk on fire")

    fed.clients[1].learner.training_loss = boom
    real = fed.clients[2].learner.training_loss
    fed.clients[2].learner.training_loss = lambda batch: real(batch) * float("nan")
    before = {k: v.clone() for k, v in fed.clients[2].learner.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="fedclip.federation"):
        history = fed.fit()
    assert sorted(seen[0]) == [0, 3]  # the others were aggregated
    expected = fed.strategy.global_state["ctx"]
    uploads = [seen[0][k] for k in (0, 3)]
    avg = sum(r.state["ctx"].double() * r.num_samples for r in uploads) / sum(
        r.num_samples for r in uploads
    )
    assert torch.allclose(expected.double(), avg, atol=1e-7)
    row = history[-1]
    assert row["train/failed_clients"] == 2.0 and row["server/aggregated_clients"] == 2.0
    assert row["client/1/failed"] == 1.0 and row["client/2/failed"] == 1.0
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "client 1 failed" in messages and "disk on fire" in messages
    assert "client 2 failed" in messages and "non-finite loss" in messages
    assert [(f["client"], f["round"]) for f in fed.failures] == [(1, 1), (2, 1)]
    after = fed.clients[2].learner.state_dict()  # rolled back: the NaN step left no trace
    received = fed.strategy.global_state  # ... except what evaluation downloaded
    for key, value in before.items():
        if key not in received:
            assert torch.equal(value, after[key]), key
    assert all(torch.isfinite(t).all() for t in fed.strategy.global_state.values())


def test_too_many_failures_stop_the_run_with_a_checkpoint(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path, rounds=2)
    out = tmp_path / "runs"
    from fedclip.client import ClientModule

    real = ClientModule.training_step

    def client_0_fails(self, batch, i):
        if self.client_id == 0:
            raise ValueError("bad batch")
        return real(self, batch, i)

    monkeypatch.setattr(ClientModule, "training_step", client_0_fails)
    code = main([*fit_args(config, out, "r"), "--federation.max_client_failures=0",
                 "--federation.fraction=1.0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    line = [x for x in err.splitlines() if "stopped" in x]
    assert len(line) == 1 and "max_client_failures=0" in line[0] and "bad batch" in line[0]
    state = load_checkpoint(out / "r" / "checkpoints" / "last.ckpt")
    assert state["round"] == 0 and state["partial"]["failures"][0]["reason"].startswith(
        "ValueError: bad batch"
    )
    # raising the limit on resume goes on from the saved round
    resume = [*fit_args(config, out, "r"), "--resume=true", "--federation.fraction=1.0"]
    assert main([*resume, "--federation.max_client_failures=5"]) == 0
    capsys.readouterr()
    assert load_checkpoint(out / "r" / "checkpoints" / "last.ckpt")["round"] == 2


def test_invalid_uploads_are_dropped(tmp_path, caplog):
    fed = Federation(small_config(num_clients=3, rounds=1), None, {}, show_progress=False)
    seen = _spy_aggregate(fed)
    fed.clients[0].upload = lambda: {
        "ctx": torch.full_like(fed.strategy.global_state["ctx"], float("inf"))
    }
    fed.clients[1].upload = lambda: {"ctx": torch.zeros(3, 3)}
    with caplog.at_level(logging.WARNING, logger="fedclip.federation"):
        fed.fit()
    assert sorted(seen[0]) == [2]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "NaN or inf" in text and "shape (3, 3)" in text


def test_validate_upload_names_the_problem():
    s = FedAvg()
    s.initialize(
        {"ctx": torch.zeros(4, 8)}, 2, 0, schema={"ctx": torch.zeros(4, 8), "b": torch.zeros(2)}
    )
    s.validate_upload({"ctx": torch.ones(4, 8)}, ["ctx"])
    s.validate_upload({"b": torch.ones(2)})  # a key of the schema not yet in the global state
    cases = [
        ({"ctx": torch.ones(4, 8), "evil": torch.ones(1)}, None, "unknown tensor 'evil'"),
        ({"ctx": torch.ones(4, 7)}, None, "shape (4, 7)"),
        ({"ctx": torch.ones(4, 8, dtype=torch.float64)}, None, "dtype torch.float64"),
        ({"ctx": torch.full((4, 8), float("nan"))}, None, "NaN or inf"),
        ({"ctx": [1.0]}, None, "not a tensor"),
        ({"b": torch.ones(2)}, ["ctx", "b"], "missing tensors ['ctx']"),
        ([torch.ones(4, 8)], None, "not a dict"),
    ]
    for state, expected, needle in cases:
        with pytest.raises(
            UploadError,
            match=needle.replace("(", r"\(")
            .replace(")", r"\)")
            .replace("[", r"\[")
            .replace("]", r"\]"),
        ):
            s.validate_upload(state, expected)


def test_crafted_pickle_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"format": "fedclip-federation", "version": 2, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()
    save_atomic({"format": "fedclip-federation", "version": 2}, tmp_path / "ok.ckpt")
    assert load_checkpoint(tmp_path / "ok.ckpt")["version"] == 2
