"""The command line itself: a fast top-level help listing every command, --version, exact
keys with the closest one on a typo, partition's own keys, and no contradicting notices."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedclip.cli import COMMANDS, main

from .conftest import tiny_yaml

ROOT = Path(__file__).resolve().parents[1]

# calls fedclip.cli.main, then says whether torch (or anything heavy) was imported
PROBE = """
import sys
from fedclip.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "lightning", "open_clip", "jsonargparse") if m in sys.modules)
print("HEAVY", ",".join(heavy), "CODE", code)
"""


def probe(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=60
    )
    return done, time.perf_counter() - start


@pytest.mark.parametrize("flag", ["--help", "-h", None])
def test_top_level_help_lists_the_commands_without_torch(flag):
    done, seconds = probe(*([flag] if flag else []))
    assert done.returncode == 0, done.stderr
    for name in ("fit", "evaluate", "partition", "export", "predict"):
        assert any(line.strip().startswith(name + " ") for line in done.stdout.splitlines()), (
            name,
            done.stdout,
        )
    assert "HEAVY  CODE 0" in done.stdout, done.stdout  # nothing heavy imported
    assert seconds < 5, seconds  # well under 1 s alone; slack for a busy test machine


def test_version_and_unknown_command_without_torch():
    from importlib.metadata import version

    done, _ = probe("--version")
    assert done.stdout.splitlines()[0] == f"fedclip {version('fedclip')}"
    assert "HEAVY  CODE 0" in done.stdout
    done, _ = probe("evaluat")
    assert "HEAVY  CODE 2" in done.stdout
    assert (
        done.stderr.strip() == "fedclip: error: unknown command 'evaluat' (did you mean evaluate?)"
    )


def test_every_command_is_listed_and_importable():
    assert list(COMMANDS) == ["fit", "evaluate", "partition", "export", "predict", "suite",
                              "compare"]  # fmt: skip
    for command in COMMANDS.values():
        module, _, function = command.target.partition(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function))
        assert command.help


@pytest.fixture()
def config(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_yaml({"federation.rounds": 1}))
    return path


@pytest.mark.parametrize(
    "cmd, args, line",
    [
        ("fit", ["--federation.round", "3"], "unknown key --federation.round (did you mean --federation.rounds?)"),
        ("fit", ["--federation.round=3"], "unknown key --federation.round (did you mean --federation.rounds?)"),
        ("fit", ["--res", "true"], "unknown key --res (did you mean --resume?)"),
        ("fit", ["--learner.n_ct=3"], "unknown key --learner.init_args.n_ct (did you mean --learner.init_args.n_ctx?)"),
        ("fit", ["--data.num_client=3"], "unknown key --data.num_client (did you mean --data.num_clients?)"),
        ("partition", ["--data.num_client=3"], "unknown key --data.num_client (did you mean --data.num_clients?)"),
        ("partition", ["--federation.rounds=3"], "unknown key --federation.rounds (see fedclip partition -h)"),
        ("evaluate", ["--run_di=x"], "unknown key --run_di (did you mean --run_dir?)"),
        ("export", ["--run_dir=x", "--client=1"], "unknown key --client (did you mean --clients?)"),
        ("predict", ["--run_dir=x", "a.png", "--top=2"], "unknown key --top (did you mean --top_k?)"),
    ],
)  # fmt: skip
def test_keys_are_exact_and_a_typo_names_the_closest(tmp_path, config, capsys, cmd, args, line):
    argv = [cmd, *(["--config", str(config)] if cmd in {"fit", "partition"} else []), *args]
    argv += [f"--output_dir={tmp_path / 'runs'}"] if cmd == "fit" else []
    code = main(argv)
    err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert code == 2 and err == [f"fedclip {cmd}: error: {line}"], err
    assert not (tmp_path / "runs").exists()


def test_exact_keys_still_parse(config):
    from fedclip.config import build_fit_config, fit_parser

    parser = fit_parser()
    ns = parser.parse_args(["--config", str(config), "--federation.rounds=3", "--learner.n_ctx=2"])
    cfg, _ = build_fit_config(parser, ns)
    assert cfg.federation.rounds == 3 and cfg.learner.n_ctx == 2


def test_partition_help_shows_only_its_keys(capsys):
    with pytest.raises(SystemExit):
        main(["partition", "-h"])
    out = capsys.readouterr().out
    for key in (
        "--seed",
        "--output_dir",
        "--data.num_clients",
        "--data.partitioner",
        "--config",
        "--out",
    ):
        assert key in out, key
    for key in (
        "--resume",
        "--logger",
        "--privacy",
        "--fabric",
        "--optim",
        "--learner",
        "--federation",
    ):
        assert key not in out, key


def test_partition_reads_a_fit_config_and_ignores_its_other_sections(tmp_path, capsys):
    code = main(
        [
            "partition",
            "--config",
            str(ROOT / "configs" / "quickstart.yaml"),
            "--out",
            str(tmp_path / "q"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and (tmp_path / "q.json").is_file() and (tmp_path / "q.png").is_file(), out
    assert "dirichlet" in out.lower()


def test_partition_refuses_an_unknown_top_level_key_in_the_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\nfederatoin: {rounds: 2}\n")
    assert main(["partition", "--config", str(path), "--out", str(tmp_path / "q")]) == 2
    assert "federatoin" in capsys.readouterr().err


def test_open_clip_random_init_notice_is_quiet_where_fedclip_builds(caplog):
    import open_clip

    from fedclip.backbone.config import quiet_random_init
    from fedclip.backbone.registry import register_model_configs

    register_model_configs()  # fedclip's tiny architectures

    with caplog.at_level(logging.WARNING):
        open_clip.create_model("fedclip-tiny-vit")
    assert any("No pretrained weights loaded" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING), quiet_random_init():
        open_clip.create_model("fedclip-tiny-vit")
    assert not any("No pretrained weights loaded" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.WARNING):  # the filter is gone after the block
        open_clip.create_model("fedclip-tiny-vit")
    assert any("No pretrained weights loaded" in r.getMessage() for r in caplog.records)


def test_loading_a_backbone_shows_no_open_clip_notice(caplog):
    from fedclip.backbone import BackboneConfig
    from fedclip.backbone.clip import FrozenCLIP

    with caplog.at_level(logging.INFO):
        FrozenCLIP.from_config(BackboneConfig(model="fedclip-tiny-rn"))
    messages = [r.getMessage() for r in caplog.records]
    assert not any("No pretrained weights loaded" in m for m in messages), messages
    random = [m for m in messages if "RANDOM weights" in m]
    assert random and "fine for" not in random[0] and "pretrained: shapes" in random[0]


def test_lightning_fabric_info_lines_are_off(caplog):
    from fedclip.federation import build_fabric
    from tests.conftest import small_config

    build_fabric(small_config())
    for name in ("lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING
