"""Federations on several Fabric ranks: 2 CPU processes (gloo) against 1 process."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fedclip.checkpoint import load_checkpoint
from fedclip.cli import main
from fedclip.config import build_fit_config, fit_parser
from fedclip.federation import (
    FabricExecutor,
    Federation,
    FederationError,
    assign_clients,
    config_fingerprint,
)
from fedclip.progress import Progress

from .conftest import small_config, tiny_yaml
from .test_reliability import assert_same_state, fit_args, wait_for_round

PROMPTFL = (
    {"class_path": "fedclip.learners.TextualPrompt", "init_args": {"n_ctx": 4}},
    {"class_path": "fedclip.strategies.FedAvg"},
)
PFEDMOAP = (
    {
        "class_path": "fedclip.learners.MixtureOfPrompts",
        "init_args": {"n_ctx": 4, "d_gating": 32, "gating_heads": 4},
    },
    {"class_path": "fedclip.strategies.PFedMoAP", "init_args": {"num_experts": 2}},
)


def write_config(tmp_path: Path, method: tuple[dict, dict]) -> Path:
    """5 clients (4 sampled a round) of Dirichlet sizes, 2 rounds, on 2 CPU ranks."""
    learner, strategy = method
    path = tmp_path / "tiny.yaml"
    path.write_text(
        tiny_yaml(
            {
                "seed": 5,
                "learner": learner,
                "strategy": strategy,
                "data.dataset.init_args.train_per_class": 12,
                "data.dataset.init_args.test_per_class": 6,
                "data.partitioner": {
                    "class_path": "fedclip.data.Dirichlet",
                    "init_args": {"alpha": 0.5, "min_size": 4},
                },
                "data.num_clients": 5,
                "federation": {"rounds": 2, "fraction": 0.8},
                "fabric": {"accelerator": "cpu", "devices": 2},
            }
        )
    )
    return path


def one_thread_env() -> dict[str, str]:
    # torch's CPU results depend on the intra-op thread count; Lightning gives each of N
    # CPU processes cores/N threads, so both sides run with one
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_two_ranks(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "fedclip.cli", *args],
        cwd=cwd,
        env=one_thread_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_one_rank(args: list[str], capsys) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--fabric.devices=1"]) == 0
    finally:
        torch.set_num_threads(threads)
        capsys.readouterr()


def ckpt(out: Path, name: str) -> dict:
    return load_checkpoint(out / name / "checkpoints" / "last.ckpt")


def test_assign_clients_balances_by_samples_and_is_deterministic():
    weights = {0: 50, 1: 10, 2: 40, 3: 30, 4: 20, 5: 0}
    owner = assign_clients(list(weights), weights, 2)
    assert set(owner) == set(weights) and set(owner.values()) == {0, 1}
    load = [sum(max(weights[k], 1) for k in owner if owner[k] == r) for r in (0, 1)]
    assert abs(load[0] - load[1]) <= 10  # LPT: 50+20+0 | 40+30+10 → 71 | 80
    assert owner == assign_clients(list(reversed(list(weights))), weights, 2)
    assert set(assign_clients([3], weights, 4).values()) == {0}
    # more ranks than clients: some ranks simply idle
    assert sorted(assign_clients([0, 1], weights, 4).values()) == [0, 1]


def test_fingerprint_ignores_the_number_of_ranks():
    a = {"seed": 1, "fabric": {"devices": 1, "num_nodes": 1, "precision": "32-true"}}
    b = {"seed": 1, "fabric": {"devices": 4, "num_nodes": 2, "precision": "32-true"}}
    c = {"seed": 1, "fabric": {"devices": 4, "num_nodes": 2, "precision": "bf16-mixed"}}
    assert config_fingerprint(a) == config_fingerprint(b) != config_fingerprint(c)


@pytest.mark.distributed
def test_two_processes_equal_one_and_a_signal_to_rank_0_stops_both_promptfl(tmp_path):
    """PromptFL, 5 clients with 4 sampled per round, Dirichlet sizes, on 2 gloo ranks:
    SIGTERM to rank 0 stops both ranks at the end of a round, with one checkpoint; that
    checkpoint equals one process's after as many rounds, bitwise (global state, every
    client's prompt and optimizer state, history)."""
    config = write_config(tmp_path, PROMPTFL)
    out = tmp_path / "runs"
    args = fit_args(config, out, "two", "--federation.rounds=300")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedclip.cli", *args],
        cwd=tmp_path,
        env=one_thread_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    path = out / "two" / "checkpoints" / "last.ckpt"
    try:
        wait_for_round(path, proc, 2, timeout=180)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.count("stopped by SIGTERM") == 1  # reported by rank 0 alone
    two = load_checkpoint(path)
    assert 2 <= two["round"] < 300 and two["partial"] is None  # stopped at a round end
    end = time.monotonic() + 30  # the other rank ends as well
    while time.monotonic() < end and _processes_running("two"):
        time.sleep(0.2)
    assert not _processes_running("two")
    rows = (out / "two" / "csv" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 1 + two["round"]  # header, round 0 (eval at start): logged once
    assert "devices: 2" in (out / "two" / "config.yaml").read_text()

    parser = fit_parser()
    cfg, plain = build_fit_config(parser, parser.parse_args(args[1:] + ["--fabric.devices=1"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = Federation(cfg, tmp_path / "one", plain, show_progress=False)
        one.fit(stop_after=two["round"])
    finally:
        torch.set_num_threads(threads)
    assert_same_state(two, load_checkpoint(one.checkpoint_path))


@pytest.mark.distributed
def test_two_processes_reach_the_one_process_state_pfedmoap_and_resume_on_one(tmp_path, capsys):
    """pFedMoAP (the server's expert pool needs every client's upload; every client keeps a
    personal gate): 2 ranks for 2 rounds equal 1 process; the 2-rank run then resumes on one
    process for a third round and still equals an uninterrupted 3-round run."""
    config = write_config(tmp_path, PFEDMOAP)
    out = tmp_path / "runs"
    run_two_ranks(fit_args(config, out, "two"), tmp_path)
    run_one_rank(fit_args(config, out, "one"), capsys)
    two, one = ckpt(out, "two"), ckpt(out, "one")
    assert_same_state(two, one)
    for a, b in zip(two["clients"], one["clients"], strict=True):  # downloaded experts
        ea, eb = a["learner"]["_extra_state"], b["learner"]["_extra_state"]
        assert torch.equal(ea["expert_ids"], eb["expert_ids"])
        assert torch.equal(ea["expert_ctx"], eb["expert_ctx"])
    assert any(c["learner"]["_extra_state"]["expert_ctx"].numel() for c in two["clients"])
    for name in ("two", "one"):
        run_one_rank(
            [*fit_args(config, out, name), "--resume=true", "--federation.rounds=3"], capsys
        )
    assert ckpt(out, "two")["round"] == 3
    assert_same_state(ckpt(out, "two"), ckpt(out, "one"))


def _processes_running(run_name: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"--run_name={run_name}".encode() in cmd and b"fedclip.cli" in cmd:
                found.append(int(pid))
    return found


@pytest.mark.parametrize("devices", [0, -1])
def test_bad_device_counts_are_refused(tmp_path, capsys, devices):
    config = write_config(tmp_path, PROMPTFL)
    code = main([*fit_args(config, tmp_path / "runs", "bad"), f"--fabric.devices={devices}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "fabric.devices" in err[0]


# ---- the rank logic in one process: two ranks as threads with an in-memory broadcast ----------
class ThreadGroup:
    """`fabric.broadcast` for ranks that are threads of this process."""

    def __init__(self, ranks: int) -> None:
        self.barrier = threading.Barrier(ranks, timeout=120)
        self.slot = None

    def broadcast_for(self, rank: int):
        def broadcast(obj, src=0):
            if rank == src:
                self.slot = copy.deepcopy(obj)  # what the wire would carry
            self.barrier.wait()
            got = copy.deepcopy(self.slot)
            self.barrier.wait()
            return got

        return broadcast


def run_as_ranks(make, ranks: int, rounds: int) -> tuple[list, list]:
    """Build `ranks` federations with `make()` and run `rounds` rounds with each as one rank.
    Returns the federations and each one's exception (or None)."""
    feds = [make() for _ in range(ranks)]
    group = ThreadGroup(ranks)
    errors: list = [None] * ranks
    for r, fed in enumerate(feds):
        fed.fabric.broadcast = group.broadcast_for(r)
        fed.executor = FabricExecutor(fed.runtime)  # the ranks' executor, as one rank of many
        fed.executor.world_size, fed.executor.rank = ranks, r
        fed.world_size, fed.rank = ranks, r

    def work(r: int) -> None:
        try:
            with Progress(rounds, enabled=False) as progress:
                for rnd in range(rounds):
                    feds[r].history.append(feds[r].run_round(rnd, progress))
        except FederationError as e:  # raised by every rank after the same broadcasts
            errors[r] = e
        except Exception as e:  # noqa: BLE001 (compared by the test)
            errors[r] = e
            group.barrier.abort()  # the other ranks would wait for this one forever

    threads = [threading.Thread(target=work, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return feds, errors


def _fails_in_round_1(fed, k: int) -> None:
    real = fed.clients[k].learner.training_loss

    def loss(batch):
        if not fed.history:  # the first round
            raise RuntimeError("sensor unplugged")
        return real(batch)

    fed.clients[k].learner.training_loss = loss


def _strip(history) -> str:
    """The history without wall times, as text (NaN equals NaN there)."""
    rows = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in history]
    return json.dumps(rows, sort_keys=True)


@pytest.mark.distributed
def test_failed_clients_on_other_ranks_are_left_out_everywhere_as_on_one_rank():
    def make():
        cfg = small_config(num_clients=5, rounds=2, fraction=0.8)
        fed = Federation(cfg, None, {}, show_progress=False)
        _fails_in_round_1(fed, 3)
        return fed

    one = make()
    with Progress(2, enabled=False) as progress:
        for rnd in range(2):
            one.history.append(one.run_round(rnd, progress))
    feds, errors = run_as_ranks(make, 3, 2)
    assert errors == [None] * 3
    for fed in feds:
        assert _strip(fed.history) == _strip(one.history)
        assert fed.failures == one.failures and [f["client"] for f in one.failures] == [3]
        for key, t in one.strategy.global_state.items():
            assert torch.equal(fed.strategy.global_state[key], t), key
        for a, b in zip(fed.clients, one.clients, strict=True):
            for key, t in b.learner.state_dict().items():
                assert torch.equal(a.learner.state_dict()[key], t), key
    assert one.history[0]["train/failed_clients"] == 1.0


@pytest.mark.distributed
def test_too_many_failures_raise_on_every_rank_with_the_same_message():
    def make():
        cfg = small_config(num_clients=4, rounds=1)
        cfg.federation.max_client_failures = 1
        fed = Federation(cfg, None, {}, show_progress=False)
        for k in (0, 2):
            _fails_in_round_1(fed, k)
        return fed

    feds, errors = run_as_ranks(make, 2, 1)
    assert all(isinstance(e, FederationError) for e in errors), errors
    assert str(errors[0]) == str(errors[1])
    assert "2 clients failed, more than federation.max_client_failures=1" in str(errors[0])
    partial = feds[0].partial
    assert partial.done == [0, 1, 2, 3] and [f["client"] for f in partial.failures] == [0, 2]
