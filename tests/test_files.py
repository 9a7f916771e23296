"""Run files are shareable: every file fedclip writes atomically gets the mode an ordinary
new file gets (0666 less the umask), not mkstemp's 0600."""

from __future__ import annotations

import os
import stat

import pytest

from fedclip.checkpoint import save_atomic, write_text_atomic
from fedclip.cli import main

from .conftest import tiny_yaml


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writers_respect_the_umask(tmp_path, umask):
    for mask, want in ((0o022, 0o644), (0o027, 0o640), (0o077, 0o600)):
        umask(mask)
        save_atomic({"a": 1}, tmp_path / f"x{mask}.ckpt")
        write_text_atomic(tmp_path / f"x{mask}.txt", "hi")
        assert mode(tmp_path / f"x{mask}.ckpt") == want
        assert mode(tmp_path / f"x{mask}.txt") == want


def test_a_run_folder_is_readable_by_the_group(tmp_path, umask):
    umask(0o022)
    config = tmp_path / "run.yaml"
    config.write_text(tiny_yaml({"federation.rounds": 1}))
    run = ["--output_dir", str(tmp_path / "runs"), "--run_name", "r", "--progress", "false"]
    assert main(["fit", "--config", str(config), *run]) == 0
    run_dir = tmp_path / "runs" / "r"
    assert main(["export", "--run_dir", str(run_dir)]) == 0
    assert main(["evaluate", "--run_dir", str(run_dir)]) == 0
    files = ["config.yaml", "summary.json", "curves.png", "partition.json", "partition.png",
             "checkpoints/last.ckpt", "eval.json", "prompts.safetensors"]  # fmt: skip
    assert {f: oct(mode(run_dir / f)) for f in files} == {f: oct(0o644) for f in files}
