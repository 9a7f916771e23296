"""`fedclip` end to end: fit, resume, evaluate, bad input (exit code 2, one line)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedclip.checkpoint import load_checkpoint
from fedclip.cli import main
from fedclip.config import build_fit_config, fit_parser

from .conftest import tiny_yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = tiny_yaml({"seed": 3})


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real command in a fresh process (the console script's module)."""
    return subprocess.run(
        [sys.executable, "-m", "fedclip.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_here(capsys, *args: str) -> tuple[int, str, str]:
    """The same entry point in this process (no interpreter start-up per case)."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def tiny_yaml(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_fit_resume_evaluate(tmp_path, tiny_yaml, capsys):
    out = run(
        "fit",
        "--config",
        str(tiny_yaml),
        "--output_dir",
        str(tmp_path / "runs"),
        "--run_name",
        "e2e",
        "--progress",
        "false",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "runs" / "e2e"
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    assert [float(r["round"]) for r in rows] == [0.0, 1.0, 2.0]
    assert {"eval/acc_mean", "client/0/acc", "client/1/acc", "traffic/up_bytes"} <= set(rows[0])
    assert 0 <= float(rows[-1]["eval/acc_mean"]) <= 1
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["round"] == 2
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["seed"] == 3 and saved["learner"]["init_args"]["n_ctx"] == 4
    assert saved["run_name"] == "e2e"
    assert (run_dir / "summary.json").is_file() and (run_dir / "curves.png").stat().st_size > 0
    assert "client" in out.stdout and "mean" in out.stdout  # the per-client table

    # same run folder again without --resume: refused, nothing overwritten
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    code, _, err = run_here(
        capsys,
        "fit",
        "--config",
        str(tiny_yaml),
        "--output_dir",
        str(tmp_path / "runs"),
        "--run_name",
        "e2e",
    )
    assert code == 2 and "--resume" in err
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == before

    # resume the saved run for one more round
    code, _, err = run_here(
        capsys,
        "fit",
        "--config",
        str(run_dir / "config.yaml"),
        "--federation.rounds",
        "3",
        "--resume",
        "true",
        "--progress",
        "false",
    )
    assert code == 0, err
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["round"] == 3
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    assert [float(r["round"]) for r in rows] == [0.0, 1.0, 2.0, 3.0]

    code, out, err = run_here(capsys, "evaluate", "--run_dir", str(run_dir))
    assert code == 0, err
    assert (run_dir / "eval.json").is_file() and "evaluation after round 3" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--learner.init_args.n_ctxx", "3"], "n_ctxx"),
        (["--federation.roundz", "3"], "roundz"),
        (["--federation.rounds", "many"], "federation.rounds"),
        (["--federation.fraction", "0"], "fraction"),
        (["--strategy", "fedclip.strategies.FedAvgg"], "FedAvgg"),
        (["--backbone.model", "ViT-Q-99"], "ViT-Q-99"),
        (["--learner.init_args.n_ctx", "0"], "n_ctx"),
        (["--data.partitioner.init_args.alpha", "0"], "alpha"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, tiny_yaml, capsys, args, needle):
    code, _, stderr = run_here(
        capsys,
        "fit",
        "--config",
        str(tiny_yaml),
        "--output_dir",
        str(tmp_path / "runs"),
        "--run_name",
        "bad",
        *args,
    )
    assert code == 2, stderr
    err = [line for line in stderr.splitlines() if "error" in line]
    assert len(err) == 1 and needle in err[0], stderr
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists()


def test_bad_yaml_key_in_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("federation:\n  roundz: 3\n")
    code, _, err = run_here(capsys, "fit", "--config", str(path))
    assert code == 2 and "roundz" in err and len(err.strip().splitlines()) == 1


def test_missing_data_root_is_one_line(tmp_path, tiny_yaml, capsys):
    code, _, err = run_here(
        capsys,
        "fit",
        "--config",
        str(tiny_yaml),
        "--data.dataset",
        "fedclip.data.CIFAR100",
        "--data.dataset.init_args.root",
        str(tmp_path / "nodata"),
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "CIFAR-100" in err and "nodata" in err and "download" in err


def test_print_config(tiny_yaml, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(tiny_yaml), "--learner.n_ctx", "7", "--print_config"])
    assert done.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["learner"]["init_args"]["n_ctx"] == 7


def test_unknown_command(capsys):
    assert main(["train"]) == 2


# configs/sweeps/ holds W&B sweep definitions and configs/suites/ suite files (each has its
# own tests: test_sweeps.py, test_shipped_suites.py), not fit configs
FIT_CONFIGS = [
    p
    for p in sorted((ROOT / "configs").glob("**/*.yaml"))
    if p.parent.name not in {"sweeps", "suites"}
]


@pytest.mark.parametrize("path", FIT_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    parser = fit_parser()
    cfg, plain = build_fit_config(parser, parser.parse_args(["--config", str(path)]))
    assert cfg.federation.rounds >= 1 and plain["learner"]["class_path"]


def test_partition_command_prints_table_and_writes_png(tmp_path, tiny_yaml, capsys):
    code, out, err = run_here(
        capsys, "partition", "--config", str(tiny_yaml), "--out", str(tmp_path / "p" / "part")
    )
    assert code == 0, err
    assert "client" in out and "train" in out and "classes" in out
    summary = json.loads((tmp_path / "p" / "part.json").read_text())
    assert [r["client"] for r in summary["clients"]] == [0, 1]
    assert sum(r["train"] for r in summary["clients"]) == 4 * 8  # IID covers every sample
    assert len(summary["train_counts"][0]) == len(summary["classnames"]) == 4
    png = (tmp_path / "p" / "part.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_saves_the_partition_in_the_run_folder(tmp_path, tiny_yaml, capsys):
    code, _, err = run_here(
        capsys,
        "fit",
        "--config",
        str(tiny_yaml),
        "--federation.rounds=1",
        f"--output_dir={tmp_path}",
        "--run_name=r",
        "--progress=false",
    )
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "partition.json").read_text())["dataset"] == "shapes"
    assert (tmp_path / "r" / "partition.png").stat().st_size > 0


def test_evaluate_on_another_data_set(tmp_path, tiny_yaml, capsys):
    """Cross-dataset evaluation: a trained run scored on another data set's test split."""
    code, _, err = run_here(
        capsys, "fit", "--config", str(tiny_yaml), "--federation.rounds=1",
        f"--output_dir={tmp_path}", "--run_name=r", "--progress=false",
    )  # fmt: skip
    assert code == 0, err
    code, out, err = run_here(
        capsys, "evaluate", "--run_dir", str(tmp_path / "r"),
        "--dataset", "fedclip.data.Shapes", "--dataset.num_classes", "6",
        "--dataset.test_per_class", "3", "--dataset.image_size", "32", "--dataset.seed", "5",
    )  # fmt: skip
    assert code == 0, err
    assert "shapes: accuracy" in out
    result = json.loads((tmp_path / "r" / "eval.json").read_text())
    pooled = result["transfer/shapes/acc"]
    per_client = [result[f"transfer/shapes/client/{k}/acc"] for k in range(2)]
    assert 0.0 <= pooled <= 1.0 and min(per_client) <= pooled <= max(per_client)
