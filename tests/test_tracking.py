"""W&B runs of `fedclip fit` (offline), read back from what wandb wrote: the config, the run's
settings, plots and files, the headline metric, the prompts artifact and the run id rule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import wandb
import yaml
from wandb.proto import wandb_internal_pb2

from fedclip import tracking
from fedclip.cli import main

from .conftest import tiny_yaml
from .test_sweeps import wandb_records

LOGGER = {
    "wandb": True,
    "project": "fedclip-test",
    "tags": ["tiny", "ci"],
    "group": "g-tiny",
    "job_type": "smoke",
    "notes": "a tiny offline run",
}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_SWEEP_ID", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    yield
    wandb.finish()
    wandb.teardown()


def write_config(tmp_path: Path, **logger: Any) -> Path:
    path = tmp_path / "tiny.yaml"
    over = {
        "backbone.pretrained": None,
        "federation.rounds": 1,
        "data.partitioner": {"class_path": "fedclip.data.Dirichlet", "init_args": {"alpha": 5.0}},
        "optim.lr": 0.03,
        "logger": {**LOGGER, **logger},
    }
    path.write_text(tiny_yaml(over))
    return path


def fit(config: Path, tmp_path: Path, *extra: str) -> Path:
    argv = ["fit", "--config", str(config), f"--output_dir={tmp_path / 'runs'}"]
    assert main([*argv, "--run_name=r", "--progress=false", *extra]) == 0
    return tmp_path / "runs" / "r"


def offline_runs(run_dir: Path) -> list[Path]:
    """The offline W&B run folders of a fedclip run folder, oldest first."""
    return sorted(run_dir.glob("wandb/offline-run-*"))


def records(offline_run: Path) -> dict[str, list[Any]]:
    """The records of an offline run's .wandb log, by type."""
    (log,) = offline_run.glob("run-*.wandb")
    out: dict[str, list[Any]] = {}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        out.setdefault(kind, []).append(getattr(record, kind))
    return out


def run_config(run: wandb_internal_pb2.RunRecord) -> dict[str, Any]:
    return {item.key: json.loads(item.value_json) for item in run.config.update}


def summary(recs: dict[str, list[Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for record in recs.get("summary", []):
        for item in record.update:
            out["/".join(item.nested_key) if item.nested_key else item.key] = json.loads(
                item.value_json
            )
    return out


def history_keys(recs: dict[str, list[Any]]) -> list[set[str]]:
    return [
        {item.key or "/".join(item.nested_key) for item in h.item} for h in recs.get("history", [])
    ]


def test_wandb_run_carries_config_settings_plots_files_and_artifact(tmp_path, offline):
    run_dir = fit(write_config(tmp_path, log_artifacts=True), tmp_path)
    (offline_run,) = offline_runs(run_dir)
    recs = records(offline_run)
    (run,) = recs["run"]

    # the config: nested, exactly as the run's config.yaml
    config = run_config(run)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert {k: v for k, v in config.items() if k != "_wandb"} == saved
    assert config["learner"]["class_path"] == "fedclip.learners.TextualPrompt"
    assert config["data"]["partitioner"]["init_args"]["alpha"] == 5.0
    assert config["optim"]["lr"] == 0.03
    assert config["logger"]["group"] == "g-tiny"

    # the run's settings
    assert (run.project, run.display_name) == ("fedclip-test", "r")
    assert (run.run_group, run.job_type, run.notes) == ("g-tiny", "smoke", "a tiny offline run")
    assert list(run.tags) == ["tiny", "ci"]
    assert run.run_id == (run_dir / "wandb_id").read_text().strip()

    # the plots as images, and the run files
    images = sorted(p.name for p in offline_run.glob("files/media/images/plots/*.png"))
    assert [n.split("_")[0] for n in images] == ["curves", "partition"], images
    logged = [keys for keys in history_keys(recs) if any(k.startswith("plots/") for k in keys)]
    assert any("plots/partition/_type" in k for k in logged)
    assert any("plots/curves/_type" in k for k in logged)
    saved_files = {f.path for record in recs["files"] for f in record.files}
    assert {"r/config.yaml", "r/partition.json", "r/summary.json"} <= saved_files
    for name in ("config.yaml", "partition.json", "summary.json"):
        assert (offline_run / "files" / "r" / name).read_text() == (run_dir / name).read_text()

    # the step metric and the headline metric: the summary keeps its last value (the sweeps'
    # metric); no best-over-rounds value, which the test splits would pick
    metrics = {(m.name or m.glob_name): m for m in recs["metric"]}
    assert metrics["eval/acc_mean"].step_metric == "round"
    assert metrics["*"].step_metric == "round"
    final = json.loads((run_dir / "summary.json").read_text())["eval"]["eval/acc_mean"]
    got = summary(recs)
    assert got["eval/acc_mean"] == pytest.approx(final)
    assert not any(k.startswith("best/") for k in got)

    # the exported prompts, as an artifact of type "model"
    (artifact,) = recs["artifact"]
    assert (artifact.type, artifact.name) == ("model", "prompts-r")
    assert [c.path for c in artifact.manifest.contents] == ["prompts.safetensors"]
    assert (run_dir / "prompts.safetensors").is_file()
    meta = json.loads(artifact.metadata)
    assert meta["learner"]["class_path"] == "fedclip.learners.TextualPrompt"


def test_no_artifact_by_default(tmp_path, offline):
    run_dir = fit(write_config(tmp_path), tmp_path)
    (offline_run,) = offline_runs(run_dir)
    assert "artifact" not in records(offline_run)
    assert not (run_dir / "prompts.safetensors").exists()


def test_run_id_is_reused_on_resume_only(tmp_path, offline):
    config = write_config(tmp_path)
    run_dir = fit(config, tmp_path)
    first = (run_dir / "wandb_id").read_text().strip()
    (original,) = offline_runs(run_dir)

    # --resume continues the W&B run: same id, and the past rounds are not logged again
    fit(config, tmp_path, "--resume=true", "--federation.rounds=2")
    assert (run_dir / "wandb_id").read_text().strip() == first
    (resumed,) = [r for r in offline_runs(run_dir) if r != original]
    assert records(resumed)["run"][0].run_id == first
    rows = [
        {(item.key or "/".join(item.nested_key)): item.value_json for item in h.item}
        for h in records(resumed)["history"]
    ]
    rounds = [json.loads(row["round"]) for row in rows if "eval/acc_mean" in row]
    assert rounds == [2], rounds  # round 2 only: rounds 0 and 1 are not logged again
    # the partition plot, written again at the start, is logged at the round it resumes from
    assert [json.loads(r["round"]) for r in rows if "plots/partition/_type" in r] == [1]

    # a fresh run into a folder that lost its checkpoint: a new W&B run
    shutil.rmtree(run_dir / "checkpoints")
    fit(config, tmp_path)
    fresh = (run_dir / "wandb_id").read_text().strip()
    assert fresh != first
    (newest,) = run_dir.glob(f"wandb/offline-run-*-{fresh}")
    assert records(newest)["run"][0].run_id == fresh
    assert len(offline_runs(run_dir)) == 3


def test_choose_run_id(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    new = tracking.choose_run_id(tmp_path, continues=False)
    assert len(new) == 8 and new.isalnum() and tracking.stored_run_id(tmp_path) == new
    assert tracking.choose_run_id(tmp_path, continues=True) == new
    again = tracking.choose_run_id(tmp_path, continues=False)
    assert again != new and tracking.stored_run_id(tmp_path) == again
    # under a sweep: the agent's id (None here), nothing stored
    monkeypatch.setenv("WANDB_SWEEP_ID", "swp")
    monkeypatch.setenv("WANDB_RUN_ID", "agentid")
    (tmp_path / "swept").mkdir()
    assert tracking.choose_run_id(tmp_path / "swept", continues=False) is None
    assert tracking.stored_run_id(tmp_path / "swept") is None


@pytest.mark.parametrize(
    ("multilabel", "b2n", "name"),
    [(False, False, "eval/acc_mean"), (True, False, "eval/map_mean"), (False, True, "eval/hm")],
)
def test_headline_metric(multilabel, b2n, name):
    assert tracking.headline_metric(multilabel, b2n) == name


def test_artifact_name():
    assert tracking.artifact_name("coop cifar:2026/12") == "prompts-coop-cifar-2026-12"
