"""`fedclip.cli.main`'s one catch: bad input (a FedclipError or a parser error) is one stderr
line and exit code 2; any other exception leaves main with its traceback (exit code 1)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import pytest
from jsonargparse import ArgumentParser

import fedclip.cli as cli
from fedclip.errors import (
    BackboneError,
    CheckpointError,
    ConfigError,
    DataError,
    DeviceError,
    FedclipError,
    UsageError,
)


def _command(error: BaseException):
    def command(argv: list[str]) -> int:
        raise error

    return command


def _run(monkeypatch, capsys, error: BaseException) -> tuple[int, list[str]]:
    monkeypatch.setitem(cli.COMMANDS, "fit", _command(error))
    capsys.readouterr()
    code = cli.main(["fit"])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("optim.lr must be > 0, got -1"),
        UsageError("run_name '..' must be a plain folder name"),
        DataError("CIFAR-100 not found in /nowhere:\n  pass download: true"),
        BackboneError("unknown open_clip model 'ViT-Q'"),
        CheckpointError("corrupt checkpoint x.ckpt"),
        DeviceError("fabric.accelerator 'cuda': no GPU on this machine"),
        argparse.ArgumentError(None, 'Parser key "seed":\n  Expected an int'),
    ],
    ids=lambda e: type(e).__name__,
)
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, error):
    monkeypatch.delenv("FEDCLIP_DEBUG", raising=False)
    code, lines = _run(monkeypatch, capsys, error)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("fedclip fit: error: "), lines
    first = str(error).splitlines()[0].strip()
    assert first in lines[0]


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bug"),
        OSError("bug"),
        FileNotFoundError("bug"),
        KeyError("bug"),
        TypeError("bug"),
        RuntimeError("bug"),
        AssertionError("bug"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_bug_leaves_main_with_its_traceback(monkeypatch, capsys, error):
    """Python exits with code 1 and prints the traceback of an exception that leaves main."""
    monkeypatch.delenv("FEDCLIP_DEBUG", raising=False)
    monkeypatch.setitem(cli.COMMANDS, "fit", _command(error))
    with pytest.raises(type(error)) as e:
        cli.main(["fit"])
    assert e.value is error and e.value.__traceback__ is not None
    assert "error:" not in capsys.readouterr().err  # no one-line message pretends bad input


def test_fedclip_debug_reraises_bad_input(monkeypatch, capsys):
    monkeypatch.setenv("FEDCLIP_DEBUG", "1")
    monkeypatch.setitem(cli.COMMANDS, "fit", _command(ConfigError("x")))
    with pytest.raises(ConfigError):
        cli.main(["fit"])


def test_user_errors_are_fedclip_errors_and_bugs_are_not():
    from fedclip.errors import ClientFailure, FederationError, UploadError

    for cls in (ConfigError, UsageError, DataError, BackboneError, CheckpointError, DeviceError):
        assert issubclass(cls, FedclipError)
    for cls in (UploadError, ClientFailure, FederationError):
        assert not issubclass(cls, FedclipError)


# ---- what jsonargparse wraps ----------------------------------------------------------------
@dataclass
class Checked:
    """A config section that checks itself.

    Args:
        lr: must be > 0.
        bug: raise a plain ValueError instead (a bug, not bad input).
    """

    lr: float = 1.0
    bug: bool = False

    def __post_init__(self) -> None:
        if self.bug:
            raise ValueError("bug in __post_init__")
        if self.lr <= 0:
            raise ConfigError(f"checked.lr must be > 0, got {self.lr}")


@dataclass
class Outer:
    """Args:
    checked: optional, so jsonargparse checks it as a Union and wraps its errors.
    """

    checked: Checked | None = None


def _parse_command(argv: list[str]) -> int:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Outer, nested_key=None, fail_untyped=True, sub_configs=True)
    ns = parser.parse_args(argv)
    parser.instantiate(ns) if hasattr(parser, "instantiate") else parser.instantiate_classes(ns)
    return 0


def test_config_error_wrapped_by_jsonargparse_is_bad_input(monkeypatch, capsys):
    monkeypatch.delenv("FEDCLIP_DEBUG", raising=False)
    monkeypatch.setitem(cli.COMMANDS, "fit", _parse_command)
    with pytest.raises(Exception) as e:  # what jsonargparse raises: the ConfigError, or a
        _parse_command(['--checked={"lr": -1}'])  # ValueError that wraps it
    assert cli.user_error(e.value) is not None
    capsys.readouterr()
    assert cli.main(["fit", '--checked={"lr": -1}']) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["fedclip fit: error: checked.lr must be > 0, got -1.0"], lines


def test_a_bug_wrapped_by_jsonargparse_stays_a_bug(monkeypatch):
    monkeypatch.delenv("FEDCLIP_DEBUG", raising=False)
    monkeypatch.setitem(cli.COMMANDS, "fit", _parse_command)
    with pytest.raises(ValueError) as e:
        cli.main(["fit", '--checked={"bug": true}'])
    assert not isinstance(e.value, FedclipError)


def test_only_jsonargparse_wrappers_are_looked_through():
    try:
        try:
            raise ConfigError("inner")
        except ConfigError as inner:
            raise ValueError("our own code turned bad input into a bug") from inner
    except ValueError as outer:
        assert cli.user_error(outer) is None


def test_a_bug_in_a_custom_learner_keeps_its_traceback_and_the_checkpoint(tmp_path):
    """A learner (given by class_path) whose training raises: every client fails, the run
    stops with exit 1, the client's traceback is on stderr and in run.log, and the
    checkpoint of the round so far loads."""
    import subprocess
    import sys

    from fedclip.checkpoint import load_checkpoint

    from .conftest import tiny_yaml

    (tmp_path / "buggy_learner.py").write_text(
        "from fedclip.learners import TextualPrompt\n\n\n"
        "class Buggy(TextualPrompt):\n"
        "    def training_loss(self, batch):\n"
        "        raise RuntimeError('bug in my learner')\n"
    )
    config = tmp_path / "run.yaml"
    config.write_text(
        tiny_yaml({"learner": {"class_path": "buggy_learner.Buggy", "init_args": {"n_ctx": 4}}})
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    run = subprocess.run(
        [sys.executable, "-m", "fedclip.cli", "fit", "--config", str(config),
         f"--output_dir={tmp_path / 'runs'}", "--run_name=bug", "--progress=false"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback (most recent call last)" in run.stderr
    assert "RuntimeError: bug in my learner" in run.stderr
    assert "in training_loss" in run.stderr  # the learner's own frame
    run_dir = tmp_path / "runs" / "bug"
    assert "RuntimeError: bug in my learner" in (run_dir / "run.log").read_text()
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert state["round"] == 0 and len(state["partial"]["failures"]) == 2
