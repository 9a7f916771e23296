"""W&B sweeps: the shipped sweep files, and `fedclip fit` run exactly as `wandb agent` runs it.

The agent's command line and environment are built by wandb's own agent code
(`wandb.wandb_agent.Agent._command_run`, with the process start replaced by a recorder), so
these tests follow wandb's macro expansion and argument style rather than a copy of it.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import wandb
import yaml
from wandb import wandb_agent
from wandb.proto import wandb_internal_pb2
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from fedclip import sweeps
from fedclip.cli import main
from fedclip.config import FitConfig, LoggerConfig, build_fit_config, fit_parser
from fedclip.federation.settings import check_config
from fedclip.federation.summary import val_metrics
from fedclip.metrics import base_to_novel_metrics, multilabel_metrics, summarize

from .conftest import tiny_yaml

ROOT = Path(__file__).resolve().parents[1]
SWEEP_FILES = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
SWEEP_ID, RUN_ID = "swp0test", "run0test"
# The internal entry of a W&B run's config, which a requeued sweep run gets back as
# `--_wandb=...` (wandb/wandb issues #4237, #9143): a nested dict, spaces and quotes.
WANDB_INTERNAL = {
    "cli_version": "0.31.0",
    "python_version": "3.11.7",
    "start_time": 1795654810.37,
    "t": {"1": [1, 5, 53, 55], "2": [1, 5, 53, 55], "3": [7, 13, 23], "4": "3.11.7"},
}
# The small base config the end-to-end tests substitute for a sweep's (like conftest's
# small_config): 4 Shapes classes at 32 px, 2 clients, the tiny ViT with random weights.
TINY = tiny_yaml({"backbone.pretrained": None, "federation.rounds": 1})


def load_sweep(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def base_config(sweep: dict[str, Any]) -> str:
    """The config file the sweep's command gives to --config."""
    command = [str(c) for c in sweep["command"]]
    return command[command.index("--config") + 1]


def tried_values(spec: dict[str, Any]) -> list[Any]:
    """The values of a sweep parameter worth checking: all listed ones, or the range's ends."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


def agent_arguments(values: dict[str, Any], style: str = "args") -> list[str]:
    """The arguments wandb's agent makes of parameter values, in a command macro's style."""
    return create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})[style]


def nested_get(plain: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        plain = plain[part]
    return plain


def logged_eval_metrics(cfg: FitConfig) -> set[str]:
    """The `eval/*` (and, with `data.val_fraction`, `val/*`) names fedclip logs for this
    config, from fedclip's own metric code."""
    multilabel = type(cfg.data.dataset).multilabel
    if multilabel:
        scores, targets = torch.rand(2, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        names = multilabel_metrics({0: (scores, targets)}, ["a", "b"])
    elif cfg.data.base_to_novel:
        names = base_to_novel_metrics({0: {"local": (1, 2), "base": (1, 2), "novel": (1, 2)}})
    else:
        names = {f"eval/acc_{name}": v for name, v in summarize({0: 0.5}, {0: 1}).items()}
    if cfg.data.val_fraction > 0:
        pair = (torch.rand(2, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0]])) if multilabel else (1, 2)
        names = {
            **names,
            **val_metrics({0: {"val_local": pair, "val_global": pair}}, multilabel, ["a", "b"]),
        }
    return {name for name in names if name.startswith(("eval/", "val/"))}


def constant_arguments(sweep: dict[str, Any]) -> list[str]:
    """The agent's arguments of the sweep's constant parameters (`value:`)."""
    fixed = {k: spec["value"] for k, spec in sweep["parameters"].items() if "value" in spec}
    return agent_arguments(fixed) if fixed else []


# ---- the sweep files ---------------------------------------------------------------------


def test_sweep_files_ship():
    names = {p.stem for p in SWEEP_FILES}
    assert {"promptfl_quickstart", "promptfl_cifar100", "pfedmoap_cifar100"} <= names
    assert {"fedmvp_cifar100_b2n", "dirichlet_alpha_promptfl_cifar100"} <= names
    assert "promptfl_quickstart_val" in names  # model selection on validation splits


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_file_structure(path):
    sweep = load_sweep(path)
    assert sweep["method"] in {"grid", "random", "bayes"}
    assert sweep["metric"]["goal"] in {"maximize", "minimize"}
    # a test metric, or a validation one (never the best test round: see test_selection)
    assert sweep["metric"]["name"].startswith(("eval/", "val/"))
    # the agent reads `program` from the sweep even when `command` does not use ${program}
    assert sweep["program"] == "fedclip"
    command = [str(c) for c in sweep["command"]]
    assert command[:3] == ["${env}", "fedclip", "fit"]
    assert command[-1] == "${args}", "overrides come last, as --key=value"
    assert (ROOT / base_config(sweep)).is_file(), "configs are relative to the repository root"
    assert sweep["parameters"]
    for key, spec in sweep["parameters"].items():
        given = [way for way in ("values", "value", "min") if way in spec]
        assert len(given) == 1, f"{key}: give values, value, or min and max"
        if "min" in spec:
            assert spec["min"] < spec["max"], key
            assert spec.get("distribution") in {"uniform", "log_uniform_values", "int_uniform"}
        if sweep["method"] == "grid":
            assert "values" in spec or "value" in spec, f"{key}: grid needs values"
    if "early_terminate" in sweep:
        stop = sweep["early_terminate"]
        assert stop["type"] == "hyperband" and stop["min_iter"] >= 2 and stop["eta"] >= 2


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_parameters_are_config_keys(path):
    """Every value the sweep can try, as the agent passes it, is accepted by `fedclip fit`
    with the sweep's base config, lands at its key, and builds a valid config."""
    sweep = load_sweep(path)
    parser = fit_parser()
    config = str(ROOT / base_config(sweep))
    for key, spec in sweep["parameters"].items():
        for value in tried_values(spec):
            argv = agent_arguments({key: value})
            ns = parser.parse_args(["--config", config, *argv])
            assert ns.get(key) == value, f"{argv} did not set {key}"
            _, plain = build_fit_config(parser, ns)  # the classes check their arguments
            assert nested_get(plain, key) == value


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_metric_is_logged(path):
    sweep = load_sweep(path)
    parser = fit_parser()
    argv = ["--config", str(ROOT / base_config(sweep)), *constant_arguments(sweep)]
    cfg, _ = build_fit_config(parser, parser.parse_args(argv))
    check_config(cfg)  # e.g. federation.select: val with its validation split
    assert sweep["metric"]["name"] in logged_eval_metrics(cfg)


# ---- fedclip.sweeps ----------------------------------------------------------------------


@pytest.fixture
def under_sweep(monkeypatch):
    monkeypatch.setenv(sweeps.SWEEP_ID_ENV, SWEEP_ID)
    monkeypatch.setenv(sweeps.RUN_ID_ENV, RUN_ID)


@pytest.fixture
def no_sweep(monkeypatch):
    monkeypatch.delenv(sweeps.SWEEP_ID_ENV, raising=False)
    monkeypatch.delenv(sweeps.RUN_ID_ENV, raising=False)


STYLES = [
    "args",
    "args_no_equals",
    "args_no_hyphens",
    "args_no_boolean_flags",
    "args_append_hydra",
    "args_override_hydra",
]


@pytest.mark.parametrize("style", STYLES)
def test_strip_agent_arguments_every_macro_style(style):
    params = {"optim.lr": 0.01, "learner.init_args.n_ctx": 8, "progress": False}
    given = agent_arguments({**params, "_wandb": WANDB_INTERNAL}, style)
    assert any("_wandb" in a for a in given)
    head = ["fit", "--config", "configs/quickstart.yaml"]
    assert sweeps.strip_agent_arguments(head + given) == head + agent_arguments(params, style)


def test_strip_agent_arguments_keeps_everything_else():
    argv = ["fit", "--config", "x.yaml", "--run_name=_wandb", "--logger.tags=[_wandb]"]
    assert sweeps.strip_agent_arguments(argv) == argv


def test_sweep_run_id(monkeypatch, no_sweep):
    assert sweeps.sweep_run_id() is None
    monkeypatch.setenv(sweeps.RUN_ID_ENV, RUN_ID)  # a run id alone is no sweep's
    assert sweeps.sweep_run_id() is None
    monkeypatch.setenv(sweeps.SWEEP_ID_ENV, SWEEP_ID)
    assert sweeps.sweep_run_id() == RUN_ID


def test_sweep_run_name():
    assert sweeps.sweep_run_name("textualprompt-shapes", RUN_ID) == f"textualprompt-shapes-{RUN_ID}"
    named = f"mine-{RUN_ID}"  # its saved config.yaml given again
    assert sweeps.sweep_run_name(named, RUN_ID) == named


def tiny_config(tmp_path: Path, *extra: str) -> tuple[FitConfig, dict[str, Any]]:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    parser = fit_parser()
    return build_fit_config(parser, parser.parse_args(["--config", str(path), *extra]))


def test_configure_sweep_run_outside_a_sweep(tmp_path, no_sweep):
    cfg, plain = tiny_config(tmp_path)
    assert sweeps.configure_sweep_run(cfg, plain) is None
    assert cfg.logger.wandb is False and plain["logger"]["wandb"] is False


def test_configure_sweep_run_under_a_sweep(tmp_path, under_sweep):
    cfg, plain = tiny_config(tmp_path)
    assert sweeps.configure_sweep_run(cfg, plain) == f"textualprompt-shapes-{RUN_ID}"
    assert cfg.logger.wandb is True and plain["logger"]["wandb"] is True
    cfg, plain = tiny_config(tmp_path, "--run_name=lr-sweep")
    assert sweeps.configure_sweep_run(cfg, plain) == f"lr-sweep-{RUN_ID}"


def test_wandb_init_kwargs(tmp_path, monkeypatch, no_sweep):
    run_dir = tmp_path / "runs" / "one"
    logger = LoggerConfig(project="p", tags=["t"], group="g", job_type="train", notes="n")
    own = sweeps.wandb_init_kwargs(run_dir, logger, "abc123")
    assert own["id"] == "abc123" and own["resume"] == "allow"
    assert (own["name"], own["dir"], own["project"]) == ("one", str(run_dir), "p")
    assert (own["tags"], own["group"], own["job_type"], own["notes"]) == (["t"], "g", "train", "n")
    monkeypatch.setenv(sweeps.SWEEP_ID_ENV, SWEEP_ID)
    monkeypatch.setenv(sweeps.RUN_ID_ENV, RUN_ID)
    under = sweeps.wandb_init_kwargs(run_dir, logger, "abc123")
    assert under["id"] is None, "under a sweep the agent's WANDB_RUN_ID is the run id"
    assert {k: v for k, v in under.items() if k != "id"} == {
        k: v for k, v in own.items() if k != "id"
    }


def test_continue_sweep_run(tmp_path, monkeypatch, no_sweep):
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"x")
    assert not sweeps.continue_sweep_run(ckpt)
    monkeypatch.setenv(sweeps.SWEEP_ID_ENV, SWEEP_ID)
    monkeypatch.setenv(sweeps.RUN_ID_ENV, RUN_ID)
    assert sweeps.continue_sweep_run(ckpt)
    assert not sweeps.continue_sweep_run(tmp_path / "none.ckpt")


class FakeRun:
    def __init__(self) -> None:
        self.preempting = False

    def mark_preempting(self) -> None:
        self.preempting = True


@pytest.mark.parametrize(
    ("sweep", "opt_in", "signum", "requeued"),
    [
        (True, "1", signal.SIGTERM, True),
        (True, None, signal.SIGTERM, False),  # opt-in: SIGTERM may be the sweep's own stop
        (True, "1", signal.SIGINT, False),  # how W&B stops a run from inside it
        (True, "1", None, False),
        (False, "1", signal.SIGTERM, False),
    ],
)
def test_requeue_if_preempted(monkeypatch, no_sweep, sweep, opt_in, signum, requeued):
    if sweep:
        monkeypatch.setenv(sweeps.SWEEP_ID_ENV, SWEEP_ID)
        monkeypatch.setenv(sweeps.RUN_ID_ENV, RUN_ID)
    if opt_in is None:
        monkeypatch.delenv(sweeps.REQUEUE_ENV, raising=False)
    else:
        monkeypatch.setenv(sweeps.REQUEUE_ENV, opt_in)
    run = FakeRun()
    monkeypatch.setattr(wandb, "run", run)
    assert sweeps.requeue_if_preempted(signum) is requeued
    assert run.preempting is requeued


# ---- end to end --------------------------------------------------------------------------


def wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of a run's .wandb transaction log. wandb 0.31 has no Python reader (its
    wandb-core writes the file): after the 7-byte header ':W&B', 0xBEE1, version, it is
    LevelDB's log format, 32 KiB blocks of chunks with a 7-byte header (crc32c, length,
    type: 1 full, 2 first, 3 middle, 4 last), each record one serialized Record."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, parts, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            out.append(record)
            parts = b""
    return out


def wandb_run(run_dir: Path) -> tuple[wandb_internal_pb2.RunRecord, dict[str, Any]]:
    """The W&B run (id, sweep, config) and its summary, from the W&B files in a fedclip run
    folder. The summary is files/wandb-summary.json when wandb wrote it (online), otherwise
    the summary updates of the transaction log replayed in order, as W&B's server does."""
    (log,) = run_dir.glob("wandb/*run-*/run-*.wandb")
    records = wandb_records(log)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    written = log.parent / "files" / "wandb-summary.json"
    if written.is_file():
        return run, json.loads(written.read_text())
    summary: dict[str, Any] = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                summary[key] = json.loads(item.value_json)
            for item in record.summary.remove:
                summary.pop("/".join(item.nested_key) if item.nested_key else item.key, None)
    return run, summary


def agent_command(
    monkeypatch, tmp_path: Path, sweep: dict[str, Any], args: dict[str, Any]
) -> tuple[list[str], dict[str, str]]:
    """The command and environment `wandb agent` starts for a run with these parameter
    values, by wandb's own agent code, in tmp_path (the agent's working directory)."""
    monkeypatch.chdir(tmp_path)
    # the agent sets these in its own environment: set first, so that they are restored
    for name, value in (
        ("WANDB_SWEEP_ID", SWEEP_ID),
        ("WANDB_RUN_ID", "unset"),
        ("WANDB_SWEEP_PARAM_PATH", "unset"),
        ("WANDB_DIR", str(tmp_path)),
    ):
        monkeypatch.setenv(name, value)
    started: dict[str, Any] = {}

    class Recorder:  # stands in for the process the agent would start
        def __init__(self, command=None, env=None, **_):
            started.update(command=command, env=env)

    monkeypatch.setattr(wandb_agent, "AgentProcess", Recorder)
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id=SWEEP_ID)
    agent._sweep_command = list(sweep["command"])  # what Agent.run reads from the sweep
    agent._command_run(
        {
            "type": "run",
            "run_id": RUN_ID,
            "program": sweep["program"],
            "args": {key: {"value": value} for key, value in args.items()},
        }
    )
    return started["command"], started["env"]


@pytest.mark.slow
def test_agent_command_runs_fedclip_fit(tmp_path, monkeypatch):
    """A requeued sweep run: the agent's exact command, `--_wandb=...` included, in a fresh
    process with W&B offline. It exits 0, logs the sweep's metric to the W&B summary, names
    its folder after the run id and saves the sweep's values in its config.yaml."""
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "promptfl_quickstart.yaml")
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(TINY)
    sweep["command"] = [str(tiny) if c == base_config(sweep) else c for c in sweep["command"]]
    values = {key: tried_values(spec)[0] for key, spec in sweep["parameters"].items()}
    small = {"output_dir": str(tmp_path / "runs"), "progress": False}  # constant parameters
    command, env = agent_command(
        monkeypatch, tmp_path, sweep, {**values, **small, "_wandb": WANDB_INTERNAL}
    )
    assert command[:5] == ["/usr/bin/env", "fedclip", "fit", "--config", str(tiny)]
    assert f"--_wandb={WANDB_INTERNAL}" in command
    assert (env["WANDB_SWEEP_ID"], env["WANDB_RUN_ID"]) == (SWEEP_ID, RUN_ID)

    bin_dir = str(Path(sys.executable).parent)  # where the venv's `fedclip` script lives
    env.update(
        WANDB_MODE="offline",
        PATH=f"{bin_dir}:{env.get('PATH', '')}",
        PYTHONPATH=f"{ROOT}:{env.get('PYTHONPATH', '')}",  # this checkout's fedclip
    )
    assert shutil.which("fedclip", path=env["PATH"]), "no `fedclip` script beside python"
    done = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "logging to W&B" in done.stderr  # logger.wandb was false: said, and turned on

    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name == f"textualprompt-shapes-{RUN_ID}"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    for key, value in values.items():
        assert nested_get(saved, key) == value, key
    assert saved["logger"]["wandb"] is True and saved["run_name"] == run_dir.name

    run, summary = wandb_run(run_dir)
    assert (run.run_id, run.sweep_id) == (RUN_ID, SWEEP_ID), "the W&B run is the agent's"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert {key: config[key] for key in values} == values  # the agent's parameter file
    metric = sweep["metric"]["name"]
    final = json.loads((run_dir / "summary.json").read_text())["eval"][metric]
    assert math.isclose(summary[metric], final, rel_tol=1e-6), "summary: the final round's"


def test_requeued_sweep_run_continues_from_its_checkpoint(tmp_path, monkeypatch, under_sweep):
    """Started again with the same run id (and `--_wandb=...`), a sweep run continues from
    the checkpoint in its folder instead of being refused for lack of --resume."""
    monkeypatch.setenv("WANDB_MODE", "disabled")  # W&B itself is the test above's
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(TINY)
    argv = ["fit", "--config", str(tiny), f"--output_dir={tmp_path}", "--progress=false"]
    try:
        assert main(argv) == 0
        wandb.finish()  # as the first process would at its exit
        requeued = [*argv, "--federation.rounds=2", f"--_wandb={WANDB_INTERNAL}"]
        assert main(requeued) == 0
    finally:
        wandb.finish()
        wandb.teardown()  # the process-wide W&B setup keeps this test's disabled mode
    summary = json.loads((tmp_path / f"textualprompt-shapes-{RUN_ID}" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
