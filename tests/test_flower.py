"""fedclip on Flower: the ServerApp and ClientApp reach fedclip's own results.

Most tests drive the real ServerApp loop and ClientApp in this process through a loopback
Grid that serialises every message and node context as Flower does on the wire (and can drop
every node's cache before each message, as a SuperNode's fresh process per message does).
One test runs a real SuperLink and two SuperNodes on loopback and `flwr run`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.common.serde import context_from_proto, context_to_proto  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedclip.client import ClientModule  # noqa: E402
from fedclip.federation import Federation  # noqa: E402
from fedclip.flower import SiteData, client, node  # noqa: E402
from fedclip.flower.node import NodeConfigError, node_identity, site_config  # noqa: E402
from fedclip.flower.server import (  # noqa: E402
    FlowerFederation,
    FlowerSetupError,
    RunOptions,
    flower_reason,
    read_config,
)

from .conftest import tiny_yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

PROMPTFL_RUN = {
    "seed": 3,
    "data.dataset.init_args.train_per_class": 12,
    "data.dataset.init_args.test_per_class": 6,
    "federation": {"rounds": 2, "local_epochs": 1, "eval_every": 2, "eval_at_start": False},
    "optim": {"lr": 0.05},
}
PROMPTFL = tiny_yaml(PROMPTFL_RUN)

# per-client payloads (experts), partial participation, local DP noise drawn on the nodes
PFEDMOAP = tiny_yaml(
    {
        "seed": 5,
        "learner": {
            "class_path": "fedclip.learners.MixtureOfPrompts",
            "init_args": {"n_ctx": 4, "gating_heads": 4},
        },
        "strategy": {"class_path": "fedclip.strategies.PFedMoAP", "init_args": {"num_experts": 2}},
        "data.dataset.init_args.train_per_class": 12,
        "data.dataset.init_args.test_per_class": 6,
        "data.partitioner": {
            "class_path": "fedclip.data.Dirichlet",
            "init_args": {"alpha": 1.0, "min_size": 2},
        },
        "data.num_clients": 3,
        "federation": {"rounds": 3, "fraction": 0.67, "local_epochs": 1, "eval_every": 1},
        "privacy": {"mode": "local", "clip_norm": 0.5, "noise_multiplier": 0.1},
        "optim": {"lr": 0.05},
    }
)

# images through the frozen encoder, and a switch of the trainable (and shared) tensors to
# LoRA factors after round 1 (sigma 10): the phase must survive a node's fresh process
FEDMVP = tiny_yaml(
    {
        "seed": 1,
        "learner": {
            "class_path": "fedclip.learners.FedMVP",
            "init_args": {
                "attributes": "shapes",
                "num_prompts": 4,
                "heads": 4,
                "lora": True,
                "sigma": 10.0,
                "lora_rank": 4,
            },
        },
        "strategy": {"class_path": "fedclip.strategies.FedAvg", "init_args": {"weighted": False}},
        "federation": {"rounds": 2, "local_epochs": 1, "eval_every": 2, "eval_at_start": False},
        "optim": {"lr": 0.003},
    }
)
CONFIGS = {"promptfl": (PROMPTFL, 2), "pfedmoap": (PFEDMOAP, 3), "fedmvp": (FEDMVP, 2)}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def without_time(history: list[dict[str, float]]) -> str:
    """The rows without wall-clock times, as JSON: NaN equals NaN, key order counts."""
    return json.dumps([{k: v for k, v in r.items() if not k.startswith("time/")} for r in history])


def results(summary: dict) -> dict:
    """summary.json without its `run` section (versions, wall time, device: where it ran)."""
    return {k: v for k, v in summary.items() if k != "run"}


def assert_same_state(a: dict, b: dict) -> None:
    """Equal tensors (bit for bit) in nested dicts; other values equal."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_state(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{key}: {a[key]} != {b[key]}"
        else:
            assert a[key] == b[key], key


# ---- a Grid in this process ----------------------------------------------------------------------
def over_the_wire(message: Message) -> Message:
    """The message as its receiver gets it: deflated to Flower's wire objects, inflated."""
    message.metadata.__dict__["_message_id"] = message.object_id
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
    received = inflate_object_from_contents(message.object_id, contents)
    received.metadata.__dict__["_message_id"] = message.object_id
    return received


class LoopbackGrid(Grid):
    """Nodes 100, 101, ... with the given node configs, served by fedclip's ClientApp here.

    fresh_process: drop every node's cached client before each message (a SuperNode runs
    each message in a new process); silent: node ids that never answer a train message."""

    def __init__(
        self, node_configs: list[dict], fresh_process: bool = True, silent: tuple = ()
    ) -> None:
        self.contexts = {
            100 + i: context_to_proto(Context(1, 100 + i, nc, RecordDict(), {}))
            for i, nc in enumerate(node_configs)
        }
        self.fresh_process = fresh_process
        self.silent = set(silent)
        self.replies: dict[str, Message] = {}
        node._NODES.clear()  # another run's nodes (these runs all have run id 1)
        node._DATA.clear()

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        return None

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for message in messages:
            received = over_the_wire(message)
            ids.append(received.metadata.message_id)
            node_id = received.metadata.dst_node_id
            if node_id in self.silent and received.metadata.message_type == "train":
                continue
            if self.fresh_process:
                node._NODES.clear()
                node._DATA.clear()
            context = context_from_proto(self.contexts[node_id])
            try:
                reply = client.app(received, context)
            except Exception as ex:  # what flwr-clientapp replies when the ClientApp raises
                reply = Message(Error(0, f"{type(ex)}:<'{ex}'>"), reply_to=received)
            self.contexts[node_id] = context_to_proto(context)
            self.replies[received.metadata.message_id] = over_the_wire(reply)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        raise NotImplementedError


@pytest.fixture
def task_identity():
    """A ServerApp process's identity (Flower's Message constructor reads it)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def flower_run(
    config: Path, node_configs: list[dict], overrides: str = "", **kw
) -> FlowerFederation:
    options = RunOptions(config=str(config), overrides=f"--progress=false {overrides}")
    cfg, plain, progress = read_config(options, None)
    grid = LoopbackGrid(
        node_configs, **{k: kw.pop(k) for k in ("fresh_process", "silent") if k in kw}
    )
    fed = FlowerFederation(grid, cfg, plain, None, show_progress=progress, **kw)
    fed.connect()
    fed.fit()
    return fed


def reference(config: Path, overrides: str = "") -> Federation:
    cfg, plain, _ = read_config(RunOptions(config=str(config), overrides=overrides), None)
    fed = Federation(cfg, None, plain, show_progress=False)
    fed.fit()
    return fed


def ids(n: int) -> list[dict]:
    return [{"client-id": k} for k in reversed(range(n))]  # node order != client order


# ---- same results --------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize(
    "method,fresh_process",
    [("promptfl", True), ("promptfl", False), ("pfedmoap", True), ("pfedmoap", False),
     ("fedmvp", True)],
    ids=lambda v: {True: "deployment", False: "simulation"}.get(v, v),
)  # fmt: skip
def test_flower_loop_equals_fedclip_fit(tmp_path, task_identity, method, fresh_process):
    """Every message in a fresh process (deployment) or with the nodes' clients kept
    (simulation): bitwise the global state, metrics and summary of fedclip's own loop."""
    text, num_clients = CONFIGS[method]
    config = write(tmp_path, text)
    flower = flower_run(config, ids(num_clients), fresh_process=fresh_process)
    local = reference(config)
    assert_same_state(flower.strategy.global_state, local.strategy.global_state)
    assert without_time(flower.history) == without_time(local.history)
    assert results(flower.summary()) == results(local.summary())
    if method == "fedmvp":  # round 2 uploaded the LoRA factors only
        assert flower.history[-1]["traffic/up_bytes"] < flower.history[0]["traffic/up_bytes"]
    if method == "pfedmoap":  # the server's pool of contexts, and the experts clients hold
        for k in local.strategy.pool:
            assert_same_state(flower.strategy.pool[k], local.strategy.pool[k])
        assert [r.get("experts") for r in flower.summary()["clients"]] == [
            r.get("experts") for r in local.summary()["clients"]
        ]


@pytest.mark.distributed
def test_simulation_node_ids_and_failing_and_silent_nodes(tmp_path, task_identity, monkeypatch):
    """Flower's simulation names nodes by partition-id; a client whose training raises and a
    node that never answers are failed clients of the round, as in fedclip fit."""
    config = write(tmp_path, PFEDMOAP)
    real = ClientModule.training_step

    def client_1_fails(self, batch, i):
        if self.client_id == 1:
            raise RuntimeError("disk on fire")
        return real(self, batch, i)

    monkeypatch.setattr(ClientModule, "training_step", client_1_fails)
    nodes = [{"partition-id": k} for k in range(3)]
    flower = flower_run(config, nodes, "--federation.max_client_failures=2")
    local = reference(config, "--federation.max_client_failures=2")
    assert without_time(flower.history) == without_time(local.history)
    assert flower.failures == local.failures
    assert any("disk on fire" in f["reason"] for f in flower.failures)

    silent = flower_run(
        config, nodes, "--federation.max_client_failures=2", silent=(102,), node_timeout=0.5
    )
    reasons = [f["reason"] for f in silent.failures if f["client"] == 2]
    assert reasons and all("no reply from node 102" in r for r in reasons)


# ---- one-line errors -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "nodes,message",
    [
        ([{}, {"client-id": 1}], "has no client-id: start it with --node-config"),
        ([{"client-id": 0}, {"client-id": 0}], "both report client-id 0"),
        (
            [{"client-id": 0}, {"client-id": 5}],
            "node 101: NodeConfigError: client-id 5 is not a client of this run",
        ),
        ([{"client-id": k} for k in range(3)], "3 node(s) connected, but the config has 2 clients"),
        ([{"client-id": 0}], "1 node(s) connected, but the config has 2 clients"),
        ([{"client-id": "0"}, {"client-id": 1}], "client-id must be an integer >= 0, got '0'"),
    ],
)
def test_bad_node_setups_stop_with_one_line(tmp_path, task_identity, nodes, message):
    with pytest.raises(FlowerSetupError) as err:
        flower_run(write(tmp_path, PROMPTFL), nodes, connect_timeout=0.1)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_serverapp_set_up_failure_exits_2_with_one_line(tmp_path, task_identity, caplog):
    """A wrong number of SuperNodes (`num-supernodes` in a simulation) ends the ServerApp
    with exit status 2 and one logged line, before any run folder is written."""
    from fedclip.flower import server

    run_config = {
        "config": str(write(tmp_path, PROMPTFL)),
        "overrides": f"--progress=false --output_dir={tmp_path / 'runs'} --run_name=x",
        "connect-timeout": 0.1,
    }
    context = Context(1, 0, {}, RecordDict(), run_config)
    with pytest.raises(SystemExit) as stop:
        server.main(LoopbackGrid([{"client-id": 0}]), context)
    assert stop.value.code == 2
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(lines) == 1 and "1 node(s) connected, but the config has 2 clients" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_flower_reason_and_run_options():
    reason = "<class 'fedclip.flower.node.NodeConfigError'>:<'no client'>"
    assert flower_reason(SimpleNamespace(error=Error(0, reason))) == "NodeConfigError: no client"
    with pytest.raises(FlowerSetupError, match="no fedclip config"):
        RunOptions.from_run_config({"overrides": ""})
    options = RunOptions.from_run_config({"config": "a.yaml", "node-timeout": 5})
    assert options.node_timeout == 5.0 and options.overrides == ""


def test_node_identity_and_data_root(tmp_path):
    assert node_identity({"client-id": 2, "data-root": "/srv/a"}) == (2, "/srv/a")
    assert node_identity({"partition-id": 1, "num-partitions": 2}) == (1, None)
    with pytest.raises(NodeConfigError, match="data-root must be a folder path"):
        node_identity({"client-id": 0, "data-root": 3})
    _, plain, _ = read_config(RunOptions(config=str(write(tmp_path, PROMPTFL))), None)
    with pytest.raises(NodeConfigError, match="Shapes has no root folder"):
        site_config(plain, "/srv/a")
    cifar = tiny_yaml(
        {
            **PROMPTFL_RUN,
            "data.dataset": {"class_path": "fedclip.data.CIFAR100", "init_args": {"root": "data"}},
        }
    )
    _, plain, _ = read_config(RunOptions(config=str(write(tmp_path, cifar))), None)
    assert site_config(plain, str(tmp_path / "site-a")).data.dataset.root == str(
        tmp_path / "site-a"
    )


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["promptfl", "pfedmoap"])
def test_flower_run_resumes_from_its_checkpoint_and_export_and_evaluate_read_it(
    tmp_path, task_identity, method, capsys
):
    """A Flower run stopped after round 1 resumes on nodes that lost every state (a new
    Grid, fresh processes): the clients' personal states go back from the server's
    checkpoint, and the result equals an uninterrupted `fedclip fit` bit for bit. The run
    folder is `fedclip fit`'s: `fedclip export` and `fedclip evaluate` read it."""
    import yaml

    from fedclip.cli import main

    text, num_clients = CONFIGS[method]
    config = write(tmp_path, text)
    run_dir = tmp_path / "runs" / "flower"
    options = RunOptions(config=str(config), overrides="--progress=false")
    cfg, plain, _ = read_config(options, None)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    first = FlowerFederation(
        LoopbackGrid(ids(num_clients)), cfg, plain, run_dir, show_progress=False
    )
    first.connect()
    first.fit(stop_after=1)
    assert first.round == 1
    cfg, plain, _ = read_config(options, None)
    second = FlowerFederation(
        LoopbackGrid(ids(num_clients)), cfg, plain, run_dir, show_progress=False
    )
    second.connect()
    second.load(run_dir / "checkpoints" / "last.ckpt")
    second.fit(resume=True)
    local = reference(config)
    assert_same_state(second.strategy.global_state, local.strategy.global_state)
    assert without_time(second.history) == without_time(local.history)
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    for k, one in enumerate(local.clients):
        assert_same_state(saved["clients"][k]["learner"], one.client_state()["learner"])

    assert main(["export", "--run_dir", str(run_dir)]) == 0
    assert (run_dir / "prompts.safetensors").is_file()
    assert main(["evaluate", "--run_dir", str(run_dir)]) == 0
    evaluated = json.loads((run_dir / "eval.json").read_text())
    metric = "eval/acc_mean"
    assert evaluated[metric] == pytest.approx(local.history[-1][metric], abs=1e-6)


def test_site_data_gives_every_client_all_its_samples():
    labels = torch.arange(10).remainder(3).numpy()
    parts = SiteData()(labels, 3, seed=0)
    assert all(p.tolist() == list(range(10)) for p in parts)
    assert all(len(p) == 4 for p in SiteData().split_test(parts, labels, labels[:4], 0))


@pytest.mark.parametrize("module", ["fedclip.flower.server", "fedclip.flower.client"])
def test_missing_flwr_names_the_extra(monkeypatch, module):
    for name in [m for m in sys.modules if m == "flwr" or m.startswith("flwr.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if flwr were not installed
    for name in ("fedclip.flower._flwr", "fedclip.flower.records", module):
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r"install fedclip\[flower\]"):
        importlib.import_module(module)


# ---- a real SuperLink and two SuperNodes -----------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def stop_all(procs: list[subprocess.Popen]) -> list[int]:
    """SIGTERM every started process and all it started (SuperExec, ServerApp, ClientApps),
    then SIGKILL what is left; returns the pids still running after that (none expected)."""
    pids: list[int] = []
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for proc in procs:  # again before SIGKILL: a process may have started one meanwhile
            pids += [p for p in [*descendants(proc.pid), proc.pid] if p not in pids]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        end = time.monotonic() + wait
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, end - time.monotonic()))
        alive = [p for p in pids if _state(p) != "Z"]
        if not alive:
            break
    return alive


def _state(pid: int) -> str:
    """A process's state letter ("Z" also for one that is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, f"flower-superlink exited:\n{log.read_text()[-3000:]}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"flower-superlink did not listen on {port} within {timeout} s")


@pytest.mark.distributed
@pytest.mark.skipif(sys.platform != "linux", reason="process clean-up reads /proc")
def test_superlink_and_two_supernodes_equal_fedclip_fit(tmp_path):
    """`flwr run` on a SuperLink and two SuperNodes (each message in a fresh ClientApp
    process) gives bitwise the global prompts, metrics and summary of fedclip's own loop."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "flwr").exists():
        pytest.skip("the flwr command is not installed next to this Python")
    config = write(tmp_path, PROMPTFL)
    port = free_port()
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),  # Flower's config, installed apps and state: in tmp_path
        "OMP_NUM_THREADS": "1",  # torch's results depend on the number of threads
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
    }
    logs = {name: tmp_path / f"{name}.log" for name in ("superlink", "node0", "node1")}
    commands = {
        "superlink": ["flower-superlink", "--insecure", "--port", str(port),
                      "--disable-runtime-dependency-installation"],
        **{
            f"node{k}": ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                         "--port", str(free_port()), "--node-config", f"client-id={k}"]
            for k in (0, 1)
        },
    }  # fmt: skip
    procs: list[subprocess.Popen] = []
    run = None
    try:
        for name, command in commands.items():
            with open(logs[name], "w") as out:
                procs.append(
                    subprocess.Popen(
                        [str(bin_dir / command[0]), *command[1:]],
                        cwd=tmp_path,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )  # fmt: skip
                )
            if name == "superlink":
                wait_for_port(port, procs[0], logs[name])
        run_config = (
            f"config='{config}' node-timeout=300 connect-timeout=120 "
            f"overrides='--output_dir={tmp_path / 'runs'} --run_name=flower'"
        )
        run = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(ROOT / "flower_app"), "test",
             "--run-config", run_config, "--stream"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420,
        )  # fmt: skip
        run_dir = tmp_path / "runs" / "flower"
        assert (run_dir / "summary.json").is_file(), "the run wrote no summary.json"
    except BaseException:
        print("---- flwr run\n", "" if run is None else (run.stdout + run.stderr)[-6000:])
        for name, path in logs.items():
            print(f"---- {name}\n{path.read_text()[-3000:]}")
        raise
    finally:
        survivors = stop_all(procs)
    assert not survivors, f"Flower processes still running after SIGKILL: {survivors}"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the nodes ran
    try:
        local = reference(config)
    finally:
        torch.set_num_threads(threads)
    server = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert_same_state(server["strategy"]["global_state"], local.strategy.global_state)
    assert without_time(server["history"]) == without_time(local.history)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert results(summary) == results(json.loads(json.dumps(local.summary(), default=float)))
    assert (run_dir / "csv" / "metrics.csv").is_file() and (run_dir / "config.yaml").is_file()


def test_flower_run_logs_its_config_and_plots_to_wandb(tmp_path, task_identity, monkeypatch):
    """A ServerApp run with logger.wandb (offline): its W&B run holds the resolved config,
    nested as the run folder's config.yaml, the logger settings and the plots, as a
    `fedclip fit` run's does."""
    import wandb
    import yaml

    from fedclip.flower import server

    from .test_tracking import records
    from .test_tracking import run_config as wandb_config

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = (
        f"--progress=false --output_dir={tmp_path / 'runs'} --run_name=fl --federation.rounds=1"
        " --logger.wandb=true --logger.group=flower --logger.job_type=deploy"
    )
    run_config = {"config": str(write(tmp_path, PROMPTFL)), "overrides": overrides}
    try:
        server.main(LoopbackGrid(ids(2)), Context(1, 0, {}, RecordDict(), run_config))
    finally:
        wandb.finish()
        wandb.teardown()
    run_dir = tmp_path / "runs" / "fl"
    (offline_run,) = run_dir.glob("wandb/offline-run-*")
    recs = records(offline_run)
    (run,) = recs["run"]
    config = wandb_config(run)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert {k: v for k, v in config.items() if k != "_wandb"} == saved
    assert config["learner"]["class_path"] == "fedclip.learners.TextualPrompt"
    assert (run.run_group, run.job_type, run.display_name) == ("flower", "deploy", "fl")
    assert run.run_id == (run_dir / "wandb_id").read_text().strip()
    images = sorted(p.name.split("_")[0] for p in offline_run.glob("files/media/images/plots/*"))
    assert images == ["curves", "partition"]
    assert (offline_run / "files" / "fl" / "summary.json").is_file()
