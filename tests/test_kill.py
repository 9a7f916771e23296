"""Kills and signals at the edges of a run: every kill resumes to the summary an
uninterrupted run writes; a kill's temporary files are removed; Ctrl-C outside the rounds
exits 130 in one line; a run that stops early writes summary.json marked `stopped`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from fedclip.checkpoint import _temp_name, load_checkpoint, stale_temps
from fedclip.cli import main
from fedclip.report import CHECKPOINT_FILES, RUN_FILES

from .conftest import tiny_yaml

RUN = tiny_yaml(
    {
        "seed": 4,
        "data.num_clients": 3,
        "federation": {"rounds": 2, "local_epochs": 1, "eval_every": 1, "eval_at_start": True},
    }
)


def fit_args(config: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["fit", "--config", str(config), f"--output_dir={out}", f"--run_name={name}",
            "--progress=false", *extra]  # fmt: skip


def results(run_dir: Path) -> str:
    """summary.json without its `run` section (versions, wall time, device), as JSON text
    (NaN equals NaN, key order counts)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return json.dumps({k: v for k, v in summary.items() if k != "run"})


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A config, a finished uninterrupted run of it (`whole`) and that run's results."""
    root = tmp_path_factory.mktemp("kill")
    config = root / "tiny.yaml"
    config.write_text(RUN)
    out = root / "runs"
    assert main(fit_args(config, out, "whole")) == 0
    return root, config, out, results(out / "whole")


def orphans(run_dir: Path) -> list[Path]:
    """Temporary files as the atomic writers name them, as a kill in a write leaves them."""
    made = []
    for folder, names in ((run_dir, RUN_FILES), (run_dir / "checkpoints", CHECKPOINT_FILES)):
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            for whole in (True, False):
                fd, tmp = tempfile.mkstemp(**_temp_name(folder / name, whole), dir=folder)
                os.write(fd, b"half")
                os.close(fd)
                made.append(Path(tmp))
    return made


def driver(tmp_path: Path, patch: str) -> Path:
    """A script that applies `patch` (Python, with os/signal imported) and runs the CLI."""
    path = tmp_path / "driver.py"
    head = "import os, signal, sys\n"
    tail = "\nfrom fedclip.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    path.write_text(head + textwrap.dedent(patch) + tail)
    return path


def run_driver(script: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


# ---- a finished run, resumed ----------------------------------------------------------------
@pytest.mark.parametrize("damage", ["deleted", "truncated", "intact"])
def test_resuming_a_finished_run_rewrites_its_summary_without_training(ws, damage, capsys):
    root, config, out, reference = ws
    run_dir = out / "whole"  # resumed in place: each case must come back to the same
    summary = run_dir / "summary.json"
    if damage == "deleted":
        summary.unlink()
    elif damage == "truncated":  # e.g. written by hand, or by a tool that is not atomic
        summary.write_text(summary.read_text()[:200])
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes(), os.stat(ckpt).st_mtime_ns
    capsys.readouterr()
    assert main([*fit_args(config, out, run_dir.name), "--resume=true"]) == 0
    captured = capsys.readouterr()
    assert (ckpt.read_bytes(), os.stat(ckpt).st_mtime_ns) == before  # nothing trained
    assert results(run_dir) == reference
    assert all(c["acc"] == c["acc"] for c in json.loads(summary.read_text())["clients"])
    assert "had finished: nothing trained" in captured.err
    assert "round 2" in captured.out and "run folder:" in captured.out
    rows = [line for line in captured.out.splitlines() if line.strip().startswith("│")]
    client_rows = [r for r in rows if r.split("│")[1].strip() in {"0", "1", "2"}]
    assert len(client_rows) == 3 and all(" - " not in r for r in client_rows)  # no NaN


def test_last_evaluation_is_restored_for_every_headline_metric():
    from fedclip.federation.summary import last_evaluation

    history = [
        {"round": 0.0, "eval/acc_mean": 0.5, "client/0/acc": 0.4, "client/1/acc": 0.6},
        {"round": 1.0, "eval/acc_mean": 0.7, "client/0/acc": 0.8, "client/1/acc": 0.6,
         "client/0/base": 0.1, "client/0/novel": 0.2},  # base-to-novel: acc is the local one
        {"round": 2.0, "train/loss_mean": 1.0, "client/0/train_loss": 1.0, "client/0/acc": 9.0},
        {"round": 3.0, "transfer/x/client/0/acc": 0.0, "eval/acc_mean": float("nan")},
    ]  # fmt: skip
    found = last_evaluation(history, "acc")
    assert found == {0: 0.8, 1: 0.6}  # a training row (even with a learner's `acc`) is not one
    multilabel = [{"round": 1.0, "eval/map_mean": 0.3, "client/0/map": 0.2, "client/1/map": 0.4}]
    assert last_evaluation(multilabel, "map") == {0: 0.2, 1: 0.4}
    assert last_evaluation(multilabel, "acc") == {}
    assert last_evaluation([], "acc") == {}


# ---- temporary files a kill leaves ----------------------------------------------------------
def test_stale_temps_match_only_the_writers_own_names(tmp_path):
    made = orphans(tmp_path)
    keep = [".summary.json", "summary.tmp", ".summary.short.json", ".eval.abcdefgh.json",
            ".summary.ABCDEFGH.json", ".last.ckpt.abcdefgh.bak", "notes.txt",
            ".curves.abcdefgh.png.extra"]  # fmt: skip
    for name in keep:
        (tmp_path / name).write_text("mine")
    (tmp_path / ".summary.abcdefgh.json").mkdir()  # a folder, whatever its name
    found = stale_temps(tmp_path, RUN_FILES) + stale_temps(
        tmp_path / "checkpoints", CHECKPOINT_FILES
    )
    assert sorted(found) == sorted(made)
    assert stale_temps(tmp_path / "absent", RUN_FILES) == []


def test_a_new_run_and_a_resume_remove_a_kills_temp_files(ws, capsys):
    root, config, out, reference = ws
    run_dir = out / "fresh"  # killed before its first checkpoint: a new fit starts here
    made = orphans(run_dir)
    (run_dir / "notes.txt").write_text("mine")
    assert main(fit_args(config, out, "fresh", "--federation.rounds=1")) == 0
    assert not any(p.exists() for p in made)
    assert (run_dir / "notes.txt").read_text() == "mine"
    made = orphans(run_dir)  # killed again; then resumed (finished: nothing to train)
    assert main([*fit_args(config, out, "fresh", "--federation.rounds=1"), "--resume=true"]) == 0
    capsys.readouterr()
    assert not any(p.exists() for p in made)
    assert {p.name for p in run_dir.iterdir() if p.name.startswith(".")} == set()


@pytest.mark.slow
@pytest.mark.parametrize("target", ["summary.json", "curves.png"])
def test_sigkill_while_writing_results_then_resume_gives_the_uninterrupted_summary(
    ws, tmp_path, target, capsys
):
    """SIGKILL in the middle of writing summary.json (or curves.png), after the last
    checkpoint: the resume trains nothing, writes the summary an uninterrupted run writes
    and removes the temporary file the kill left."""
    root, config, out, reference = ws
    name = f"killed-{target.split('.')[0]}"
    script = driver(
        tmp_path,
        f"""
        from fedclip import report
        from fedclip.checkpoint import atomic_path
        real_text, real_plot = report.write_text_atomic, report.plot_curves

        def text(path, content):
            if path.name != {target!r}:
                return real_text(path, content)
            with atomic_path(path) as tmp:
                tmp.write_text(content[: len(content) // 2])
                os.kill(os.getpid(), signal.SIGKILL)

        def plot(history, path):
            if {target!r} == "curves.png":
                path.write_bytes(b"half a png")
                os.kill(os.getpid(), signal.SIGKILL)
            return real_plot(history, path)

        report.write_text_atomic, report.plot_curves = text, plot
        """,
    )
    proc = run_driver(script, fit_args(config, out, name), root)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_dir = out / name
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["round"] == 2
    left = stale_temps(run_dir, RUN_FILES)
    assert len(left) == 1 and left[0].name.startswith(f".{target.split('.')[0]}.")
    assert (run_dir / "summary.json").exists() == (target == "curves.png")
    assert main([*fit_args(config, out, name), "--resume=true"]) == 0
    capsys.readouterr()
    assert not left[0].exists()
    assert results(run_dir) == reference


# ---- Ctrl-C outside the rounds --------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_during_start_up_exits_130_in_one_line(ws, tmp_path):
    root, config, out, reference = ws
    script = driver(
        tmp_path,
        """
        from fedclip.federation import inprocess
        real = inprocess.load_backbone

        def interrupted(cfg):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the backbone is built
            return real(cfg)

        inprocess.load_backbone = interrupted
        """,
    )
    proc = run_driver(script, fit_args(config, out, "startup"), root)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "fedclip fit: interrupted (files are replaced whole: none is half-written)"
    ]
    assert not (out / "startup").exists()  # nothing was written yet


@pytest.mark.slow
@pytest.mark.parametrize("ctrl_c", ["second", "first"])
def test_ctrl_c_while_plots_are_written_exits_130_in_one_line(ws, tmp_path, ctrl_c):
    """`second`: Ctrl-C stops the rounds, a second one comes while curves.png is written;
    `first`: a finished run's first Ctrl-C comes then. Either way: exit 130, one line, no
    traceback, summary.json whole, no temporary file left, the checkpoint intact."""
    root, config, out, reference = ws
    name = f"plots-{ctrl_c}"
    script = driver(
        tmp_path,
        f"""
        from fedclip import report
        from fedclip.client import ClientModule
        real_plot, real_step = report.plot_curves, ClientModule.training_step
        steps = []

        def step(self, batch, i):
            steps.append(1)
            if {ctrl_c!r} == "second" and len(steps) == 1:
                os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: stop the rounds
            return real_step(self, batch, i)

        def plot(history, path):
            os.kill(os.getpid(), signal.SIGINT)
            return real_plot(history, path)

        report.plot_curves, ClientModule.training_step = plot, step
        """,
    )
    proc = run_driver(script, fit_args(config, out, name), root)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if "aborted" in x]
    assert len(lines) == 1 and "while writing the results" in lines[0] and "--resume" in lines[0]
    run_dir = out / name
    summary = json.loads((run_dir / "summary.json").read_text())  # whole
    assert not (run_dir / "curves.png").exists() and stale_temps(run_dir, RUN_FILES) == []
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    if ctrl_c == "second":
        assert summary["stopped"]["reason"] == "signal" and summary["stopped"]["signal"] == "SIGINT"
        assert state["round"] < 2
    else:
        assert summary["stopped"] is None and state["round"] == 2


# ---- runs that stop early write a summary marked stopped ------------------------------------
def test_too_many_failures_write_a_summary_marked_stopped(ws, monkeypatch, capsys):
    root, config, out, reference = ws
    from fedclip.client import ClientModule

    real = ClientModule.training_step

    def client_1_fails(self, batch, i):
        if self.client_id == 1:
            raise ValueError("bad batch")
        return real(self, batch, i)

    monkeypatch.setattr(ClientModule, "training_step", client_1_fails)
    args = fit_args(config, out, "failing", "--federation.fraction=1.0")
    assert main([*args, "--federation.max_client_failures=0"]) == 1
    assert "stopped:" in capsys.readouterr().err
    run_dir = out / "failing"
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped = summary["stopped"]
    assert stopped["reason"] == "client failures" and stopped["exit_code"] == 1
    assert (stopped["round"], stopped["partial"]) == (1, True)
    assert "max_client_failures=0" in stopped["error"] and "bad batch" in stopped["error"]
    assert summary["rounds_completed"] == 0
    assert [(f["round"], f["client"]) for f in summary["failures"]] == [(1, 1)]
    assert summary["failures"][0]["reason"].startswith("ValueError: bad batch")
    assert (run_dir / "curves.png").is_file()
    # the same run resumed with a higher limit finishes: the summary is no longer stopped
    assert main([*args, "--resume=true", "--federation.max_client_failures=5"]) == 0
    capsys.readouterr()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] is None and summary["rounds_completed"] == 2
    assert [(f["round"], f["client"]) for f in summary["failures"]] == [(1, 1), (2, 1)]


def test_a_signal_stop_writes_a_summary_marked_stopped(ws, monkeypatch, capsys):
    root, config, out, reference = ws
    from fedclip.client import ClientModule

    real = ClientModule.training_step
    calls = []

    def step_then_sigterm(self, batch, i):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch, i)

    monkeypatch.setattr(ClientModule, "training_step", step_then_sigterm)
    assert main(fit_args(config, out, "sigterm")) == 128 + signal.SIGTERM
    capsys.readouterr()
    summary = json.loads((out / "sigterm" / "summary.json").read_text())
    assert summary["stopped"] == {
        "round": 1, "partial": True, "exit_code": 143, "reason": "signal", "signal": "SIGTERM"
    }  # fmt: skip
    monkeypatch.setattr(ClientModule, "training_step", real)
    assert main([*fit_args(config, out, "sigterm"), "--resume=true"]) == 0
    capsys.readouterr()
    assert results(out / "sigterm") == reference


# ---- the Flower server ----------------------------------------------------------------------
@pytest.mark.slow
def test_flower_server_resume_of_a_finished_run_and_a_stopped_run(tmp_path, monkeypatch):
    pytest.importorskip("flwr")
    from flwr.app import Context, RecordDict

    from fedclip.flower import server

    from .test_flower import LoopbackGrid, ids

    saved = _flower_identity()
    try:
        config = tmp_path / "run.yaml"
        config.write_text(RUN)
        base = f"--progress=false --output_dir={tmp_path / 'runs'} --federation.rounds=1"

        def serve(name: str, resume: bool = False, extra: str = "") -> None:
            run_config = {"config": str(config), "overrides": f"{base} --run_name={name} {extra}"}
            run_config["resume"] = "true" if resume else "false"
            server.main(LoopbackGrid(ids(3)), Context(1, 0, {}, RecordDict(), run_config))

        serve("fl")
        run_dir = tmp_path / "runs" / "fl"
        expected = results(run_dir)
        (run_dir / "summary.json").unlink()
        made = orphans(run_dir)
        serve("fl", resume=True)
        assert results(run_dir) == expected and not any(p.exists() for p in made)
        assert (
            json.loads(expected)["clients"][0]["acc"] == json.loads(expected)["clients"][0]["acc"]
        )

        from fedclip.client import ClientModule

        real = ClientModule.training_step

        def fails(self, batch, i):
            raise ValueError("bad batch")

        monkeypatch.setattr(ClientModule, "training_step", fails)
        with pytest.raises(SystemExit) as stop:
            serve("flfail")
        assert stop.value.code == 1
        monkeypatch.setattr(ClientModule, "training_step", real)
        summary = json.loads((tmp_path / "runs" / "flfail" / "summary.json").read_text())
        assert summary["stopped"]["reason"] == "client failures"
        assert {f["client"] for f in summary["failures"]} == {0, 1, 2}
    finally:
        _restore_identity(saved)


def _flower_identity():
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    return saved


def _restore_identity(saved) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
