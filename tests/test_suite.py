"""`fedclip suite`: a suite file's cells run as ordinary fit run folders, resumably, several
at once; its tables against a hand computation from the runs' summaries; a changed suite,
a bad flag and missing data are refused before anything runs."""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedclip.cli import main
from fedclip.errors import ConfigError
from fedclip.suites import pool
from fedclip.suites.spec import load_suite, slugify

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--data.dataset.init_args.train_per_class=8",
    "--data.dataset.init_args.test_per_class=4",
    "--data.num_clients=2",
    "--federation.local_epochs=1",
]


@pytest.fixture(scope="module", autouse=True)
def tiny_weights():
    """The tiny ViT's Shapes weights in the default cache, before two cells race to make them."""
    from fedclip.backbone.tiny import shapes_weights

    shapes_weights("fedclip-tiny-vit")


def write_suite(folder: Path, name: str = "quick", rounds: int = 2, **over) -> Path:
    spec = {
        "name": name,
        "base": str(ROOT / "configs" / "quickstart.yaml"),
        "output_dir": str(folder / "out"),
        "overrides": [f"--federation.rounds={rounds}", *SMALL],
        "methods": [{"name": "PromptFL", "method": "promptfl"}],
        "seeds": [0, 1],
        "reference": {
            "source": "made up (Nobody, 2099)",
            "values": {"PromptFL": {"Shapes": 98.41}},
        },
        **over,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def suite(path: Path, *extra: str) -> int:
    return main(["suite", "--config", str(path), *extra])


def no_children(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a cell was started")

    monkeypatch.setattr(pool.subprocess, "Popen", refuse)


def table_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def results(run_dir: Path) -> str:
    """summary.json without its `run` section (versions, wall time, device)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return json.dumps({k: v for k, v in summary.items() if k != "run"})


# ---- the suite file --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "over, key",
    [
        ({"seeds": [0, 0]}, "seeds"),
        ({"colour": 1}, "colour"),
        ({"methods": [{"name": "X", "method": "nosuch"}]}, "methods[0].method"),
        ({"methods": [{"method": "promptfl", "nmae": "x"}]}, "methods[0].nmae"),
        ({"methods": [{"name": "X", "config": "quickstart"}]}, "methods[0].config"),
        ({"methods": [{"registered": "nosuch*"}]}, "methods[0].registered"),
        ({"methods": [{"method": "coop"}, {"name": "coop", "method": "promptfl"}]}, "methods"),
        ({"overrides": ["--seed=3"]}, "overrides"),
        ({"overrides": ["federation.rounds=3"]}, "overrides"),
        ({"settings": [{"name": "a"}, {"name": "A"}]}, "settings[1].name"),
        ({"reference": {"values": {"Nobody": {"Shapes": 1.0}}}}, "reference.values.Nobody"),
        ({"reference": {"values": {"PromptFL": {"Cars": 1.0}}}}, "reference.values.PromptFL.Cars"),
        ({"metrics": ["acc_mean"]}, "metrics"),
        ({"base": "nosuch.yaml"}, "base"),
    ],
)
def test_a_bad_suite_file_is_one_line_naming_the_file_and_key(tmp_path, over, key):
    path = write_suite(tmp_path, **over)
    with pytest.raises(ConfigError) as e:
        load_suite(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: {key}"), message


def test_rows_compose_their_sections_whole(tmp_path):
    mine = {"class_path": "fedclip.learners.TextualPrompt", "init_args": {"n_ctx": 2}}
    methods = [
        {"method": "coop"},
        {"name": "Mine (n=2)", "learner": mine},
        {"registered": "promptf?", "config": "quickstart"},
    ]
    loaded = load_suite(write_suite(tmp_path, methods=methods, reference=None))
    coop, own, promptfl = loaded.rows
    # the base's ctx_init and class_token_position are gone: sections are replaced, not merged
    assert coop.config["learner"] == {
        "class_path": "fedclip.learners.TextualPrompt",
        "init_args": {"n_ctx": 16},
    }
    assert coop.config["strategy"]["class_path"] == "fedclip.strategies.LocalOnly"
    assert own.config["learner"] == mine and own.slug == "mine-n-2"
    assert own.config["strategy"]["class_path"] == "fedclip.strategies.FedAvg"  # the base's
    assert promptfl.name == "promptfl" and promptfl.source == str(ROOT / "configs/quickstart.yaml")
    assert loaded.settings[0].name == "Shapes"  # the base's data set
    assert slugify("PromptFL + KD/α") == "promptfl-kd"


# ---- before anything runs --------------------------------------------------------------------
def test_print_commands_prints_every_cell_and_runs_nothing(tmp_path, monkeypatch, capsys):
    no_children(monkeypatch)
    settings = [
        {"name": "Shapes"},
        {"name": "plain", "overrides": ["--data.dataset.init_args.style=plain"]},
    ]
    methods = [{"name": "PromptFL", "method": "promptfl"}, {"name": "CoOp", "method": "coop"}]
    path = write_suite(tmp_path, settings=settings, methods=methods)
    assert suite(path, "--print-commands", "--override=--federation.eval_every=2") == 0
    lines = capsys.readouterr().out.splitlines()
    folder = tmp_path / "out" / "quick"
    record = json.loads((folder / "suite.json").read_text())["cells"]
    ids = [
        f"{m}-{s}-seed{k}"
        for m in ("promptfl", "coop")
        for s in ("shapes", "plain")
        for k in (0, 1)
    ]
    assert list(record) == ids and len(lines) == 8
    for line, cid in zip(lines, ids, strict=True):
        argv = shlex.split(line)
        assert argv[:2] == ["fedclip", "fit"] and argv[2:] == ["--config", *record[cid]["argv"][2:]]
        assert argv[-4:] == [
            f"--seed={cid[-1]}",
            f"--output_dir={folder / 'runs'}",
            f"--run_name={cid}",
            "--progress=false",
        ]
        assert "--federation.eval_every=2" in argv
    assert record["coop-plain-seed1"]["config"]["data"]["dataset"]["init_args"]["style"] == "plain"
    assert record["coop-plain-seed1"]["config"]["seed"] == 1
    assert (folder / "configs" / "coop.yaml").is_file() and not (folder / "runs").exists()
    assert (
        suite(
            path,
            "--print-commands",
            "--override=--federation.eval_every=2",
            "--only",
            "*-plain-seed1",
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("--run_name=")[1].split()[0] for line in lines] == [
        "promptfl-plain-seed1",
        "coop-plain-seed1",
    ]


def test_a_changed_suite_is_refused_naming_the_key(tmp_path, monkeypatch, capsys):
    no_children(monkeypatch)
    assert suite(write_suite(tmp_path, rounds=2), "--print-commands") == 0
    capsys.readouterr()
    assert suite(write_suite(tmp_path, rounds=3)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "promptfl-shapes-seed0" in err
    assert "federation.rounds 2 -> 3" in err and "new name or --output_dir" in err
    # an --override is part of the suite, a new seed adds cells
    assert suite(write_suite(tmp_path, rounds=2), "--override=--optim.lr=0.1") == 2
    assert "optim.lr 0.05 -> 0.1" in capsys.readouterr().err
    assert suite(write_suite(tmp_path, rounds=2, seeds=[0, 1, 2])) == 2
    assert "cells added: promptfl-shapes-seed2" in capsys.readouterr().err


def test_a_bad_override_stops_the_suite_naming_the_cell(tmp_path, monkeypatch, capsys):
    no_children(monkeypatch)
    path = write_suite(tmp_path)
    assert suite(path, "--override=--federation.rounds=zero") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedclip suite: error: cell promptfl-shapes-seed0:") and "\n" not in err
    assert suite(path, "--override=--federation.rounds=0") == 2
    assert "federation.rounds must be >= 1" in capsys.readouterr().err
    assert suite(path, "--override=--learner.init_args.n_ctz=3") == 2
    assert "did you mean --learner.init_args.n_ctx?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_data_is_named_once_and_nothing_runs(tmp_path, monkeypatch, capsys):
    no_children(monkeypatch)
    flags = [
        "--override=--data.dataset=fedclip.data.CIFAR10",
        "--override=--data.dataset.init_args.root=/nonexistent",
    ]
    assert suite(write_suite(tmp_path), *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("fedclip suite: missing: ") and "/nonexistent" in err[0]
    )
    assert not (tmp_path / "out").exists()


# ---- running ---------------------------------------------------------------------------------
def check_table(folder: Path, cells: dict[tuple[str, str], list[str]], reference: dict) -> None:
    """suite.csv against mean / std (ddof 1) of 100 x the runs' eval/acc_mean."""
    rows = {(r["row"], r["column"]): r for r in table_rows(folder / "suite.csv")}
    assert set(rows) == set(cells)
    for key, ids in cells.items():
        values = [
            100
            * json.loads((folder / "runs" / c / "summary.json").read_text())["eval"][
                "eval/acc_mean"
            ]
            for c in ids
        ]
        row = rows[key]
        assert row["metric"] == "eval/acc_mean" and int(row["n"]) == len(ids)
        assert float(row["mean"]) == pytest.approx(np.mean(values), rel=1e-12)
        assert float(row["std"]) == pytest.approx(np.std(values, ddof=1), rel=1e-12)
        assert row["reference"] == (str(reference[key]) if key in reference else "")
        text = f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"
        if key in reference:
            text += f" ({reference[key]:.2f})"
        assert f"| {text} |" in (folder / "suite.md").read_text()


def test_a_suite_runs_its_cells_then_skips_them(tmp_path, monkeypatch, capsys):
    path = write_suite(tmp_path, rounds=1)
    assert suite(path, "--jobs", "2") == 0
    out = capsys.readouterr()
    folder = tmp_path / "out" / "quick"
    ids = ["promptfl-shapes-seed0", "promptfl-shapes-seed1"]
    for cid in ids:
        assert (
            json.loads((folder / "runs" / cid / "summary.json").read_text())["rounds_completed"]
            == 1
        )
        assert (folder / "runs" / f"{cid}.log").is_file()
    assert all((folder / f"suite.{ext}").stat().st_size > 0 for ext in ("md", "csv", "tex", "png"))
    check_table(folder, {("PromptFL", "Shapes"): ids}, {("PromptFL", "Shapes"): 98.41})
    md = (folder / "suite.md").read_text()
    assert "made up (Nobody, 2099)" in md and "last round" in md and out.out == md
    assert r"\pm" in (folder / "suite.tex").read_text()
    assert sum(f"done promptfl-shapes-seed{k} (eval/acc_mean" in out.err for k in (0, 1)) == 2
    # again: every cell is finished, none starts, the same table
    before = {p: (folder / p).read_bytes() for p in ("suite.md", "suite.csv", "suite.tex")}
    no_children(monkeypatch)
    assert suite(path, "--jobs", "2") == 0
    assert "2 of 2 cells finished already: skipped" in capsys.readouterr().err
    assert {p: (folder / p).read_bytes() for p in before} == before


@pytest.mark.slow
def test_jobs_1_and_jobs_2_give_the_same_summaries(tmp_path, capsys):
    path = write_suite(tmp_path, rounds=1)
    assert suite(path, "--jobs=2") == 0
    assert suite(path, "--jobs=1", f"--output_dir={tmp_path / 'one'}") == 0
    capsys.readouterr()
    for cid in ("promptfl-shapes-seed0", "promptfl-shapes-seed1"):
        two = tmp_path / "out" / "quick" / "runs" / cid
        assert results(two) == results(tmp_path / "one" / "quick" / "runs" / cid)
    read = [table_rows(p / "quick" / "suite.csv") for p in (tmp_path / "out", tmp_path / "one")]
    assert read[0] == read[1]


@pytest.mark.slow
def test_an_interrupted_cell_continues_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    from fedclip.client import ClientModule

    path = write_suite(tmp_path, rounds=2, seeds=[0])
    assert suite(path, "--print-commands") == 0
    argv = shlex.split(capsys.readouterr().out.strip())[1:]
    real, calls = ClientModule.training_step, []

    def sigterm_at_the_first_step(self, batch, i):  # a partial round 1 is checkpointed
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch, i)

    monkeypatch.setattr(ClientModule, "training_step", sigterm_at_the_first_step)
    assert main(argv) == 128 + signal.SIGTERM
    monkeypatch.setattr(ClientModule, "training_step", real)
    run_dir = tmp_path / "out" / "quick" / "runs" / "promptfl-shapes-seed0"
    assert json.loads((run_dir / "summary.json").read_text())["stopped"]["signal"] == "SIGTERM"
    capsys.readouterr()
    assert suite(path) == 0
    assert "resumed from its checkpoint" in capsys.readouterr().err
    assert "--resume=true" in (run_dir.parent / f"{run_dir.name}.log").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] is None and summary["rounds_completed"] == 2
    # the same cell uninterrupted, elsewhere: the same results
    assert suite(path, f"--output_dir={tmp_path / 'whole'}") == 0
    assert results(run_dir) == results(tmp_path / "whole" / "quick" / "runs" / run_dir.name)


def test_children_divide_the_cores_among_the_jobs(monkeypatch):
    import subprocess
    import sys

    monkeypatch.setattr(pool, "usable_cores", lambda: 2)
    assert pool.child_env(1)["OMP_NUM_THREADS"] == "2"
    assert pool.child_env(3)["MKL_NUM_THREADS"] == "1"
    env = pool.child_env(2)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    probe = "import torch; print(torch.get_num_threads())"  # what a fit's torch really uses
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "1", done.stderr


@pytest.mark.slow
def test_ctrl_c_stops_the_cells_in_one_line_and_the_suite_goes_on_later(tmp_path, capsys):
    import subprocess
    import sys
    import time

    path = write_suite(tmp_path, rounds=6, seeds=[0])
    args = [sys.executable, "-m", "fedclip.cli", "suite", "--config", str(path)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    log = tmp_path / "out" / "quick" / "runs" / "promptfl-shapes-seed0.log"
    ckpt = log.with_suffix("") / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not ckpt.is_file():  # a round done (of 6)
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1].strip().splitlines()
    assert proc.returncode == 130
    assert err[-1].startswith("fedclip suite: interrupted; the running cells were stopped")
    assert "stopped by SIGTERM after a checkpoint" in log.read_text()  # the child, not killed
    assert suite(path) == 0
    assert "resumed from its checkpoint" in capsys.readouterr().err
    summary = json.loads((log.with_suffix("") / "summary.json").read_text())
    assert summary["stopped"] is None and summary["rounds_completed"] == 6
