"""Weights & Biases for a fedclip run (`logger.wandb: true`): what reaches the W&B run, and
under which run id.

A run's W&B run gets:

- as its config, the resolved config, nested exactly as the run folder's config.yaml;
- its name (the run folder's), and `logger.project`, `entity`, `tags`, `group`,
  `job_type` and `notes`;
- every logged round against the step metric `round`. The headline metric
  (`eval/acc_mean`; `eval/map_mean` for multi-label data; `eval/hm` under base-to-novel)
  keeps its last value as its summary, the final evaluation that summary.json reports and
  the sweeps optimise (no best-over-rounds value: the test splits would pick it). With a
  validation split (`data.val_fraction`) the `val/*` metrics are logged every evaluation
  too, and a sweep may optimise one (configs/sweeps/*_val.yaml); under `federation.select:
  val` the summary's `eval/*` and `val/*` are those of the selected round (the best
  validation round, `selection/round`), as summary.json's;
- the plots as images whenever fedclip writes them: `plots/partition` (partition.png, at
  the start of fit) and `plots/curves` (curves.png, with the results); and config.yaml,
  partition.json and summary.json as run files, under `<run folder name>/` (wandb keeps
  its own config.yaml at the top of a run's files);
- with `logger.log_artifacts: true`, at the end of a finished run, the exported prompts
  (RUN_DIR/prompts.safetensors, what `fedclip export` writes) as an artifact of type
  "model".

The run id: a new run gets a fresh random id, stored in RUN_DIR/wandb_id; only a run that
continues from its checkpoint (`--resume`, a requeued sweep run, Flower's `resume=true`)
reuses it and so continues its W&B run. A fresh run into a folder that lost its checkpoint,
or a folder of the same path elsewhere, gets a new id. Under a W&B sweep the id is the
agent's (WANDB_RUN_ID) and nothing is stored (see fedclip.sweeps).

The W&B run starts when the loop's fit starts (`start`), not when the logger is made, so
that a bad checkpoint or config refused before training creates no W&B run.
"""

from __future__ import annotations

import logging
import re
import secrets
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fedclip.checkpoint import write_text_atomic
from fedclip.errors import FedclipError
from fedclip.sweeps import sweep_run_id, wandb_init_kwargs

if TYPE_CHECKING:
    from fedclip.config import LoggerConfig

log = logging.getLogger(__name__)

ID_FILE = "wandb_id"  # the run folder's W&B run id, one line
# the run files that go to W&B as they are written (the .png files go as images)
RUN_FILES = ("config.yaml", "partition.json", "summary.json")


def headline_metric(multilabel: bool, base_to_novel: bool) -> str:
    """The metric a run is judged by: eval/hm under base-to-novel, eval/map_mean for
    multi-label data, eval/acc_mean otherwise."""
    if base_to_novel:
        return "eval/hm"
    return "eval/map_mean" if multilabel else "eval/acc_mean"


def stored_run_id(run_dir: Path) -> str | None:
    """The W&B run id kept in `run_dir` (None when there is none)."""
    try:
        value = (run_dir / ID_FILE).read_text().strip()
    except OSError:
        return None
    return value or None


def new_run_id() -> str:
    """A fresh random W&B run id: 8 lowercase letters and digits, as wandb's own."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def choose_run_id(run_dir: Path, continues: bool) -> str | None:
    """The W&B run id of a run in `run_dir`: under a sweep None (the agent's); the stored
    one when the run `continues` from its checkpoint and one is stored; otherwise a fresh
    random id, which is stored (replacing any old one)."""
    if sweep_run_id() is not None:
        return None
    stored = stored_run_id(run_dir)
    if continues and stored is not None:
        return stored
    run_id = new_run_id()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / ID_FILE, run_id + "\n")
    return run_id


def artifact_name(run_name: str) -> str:
    """A W&B artifact name for the prompts of run `run_name` (letters, digits, - _ .)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"prompts-{run_name}")[:128]


class WandbTracker:
    """The W&B side of one run folder; a metric logger of the round loop (rank 0).

    run_dir: the run folder (W&B's files go to run_dir/wandb); logger_cfg: `cfg.logger`;
    config: the resolved config as plain data (the run's config.yaml).
    """

    def __init__(
        self, run_dir: Path, logger_cfg: LoggerConfig, config: dict[str, Any] | None = None
    ) -> None:
        self.run_dir = Path(run_dir)
        self.logger_cfg = logger_cfg
        # exactly what config.yaml holds (a YAML round trip: tuples become lists, ...)
        self.config = yaml.safe_load(yaml.safe_dump(config or {}, sort_keys=False)) or {}
        self.run: Any = None
        self.headline = "eval/acc_mean"
        # a run that continues its W&B run already has the history the loop replays
        self.replays = True

    # ---- the run's start and end ---------------------------------------------------------
    def start(self, continues: bool, headline: str, history: list[dict], step: int) -> None:
        """Start the W&B run (once): its id (see the module), config, metric definitions,
        and the run files and partition plot already in the run folder.

        continues: the loop continues from a checkpoint; history: its rows so far."""
        if self.run is not None:
            return
        import wandb

        self.run_dir.mkdir(parents=True, exist_ok=True)
        # continuing a W&B run (its stored id, or the agent's again): it has the history
        same_run = continues and (
            sweep_run_id() is not None or stored_run_id(self.run_dir) is not None
        )
        run_id = choose_run_id(self.run_dir, continues)
        self.replays = not same_run
        kwargs = wandb_init_kwargs(self.run_dir, self.logger_cfg, run_id)
        self.run = run = wandb.init(config=self.config, **kwargs)
        self.headline = headline
        run.define_metric("round")
        run.define_metric("*", step_metric="round")
        # no summary option: the summary keeps the last value, what the sweeps optimise
        run.define_metric(headline, step_metric="round")
        self.publish(
            [self.run_dir / name for name in ("config.yaml", "partition.json", "partition.png")],
            step,
        )

    def finish(self, exit_code: int = 0, finished: bool = False) -> None:
        """End the W&B run with the command's exit code; a `finished` run (all rounds done,
        exit code 0) first logs its exported prompts when `logger.log_artifacts` is on."""
        if self.run is None:
            return
        try:
            if finished and exit_code == 0 and self.logger_cfg.log_artifacts:
                self.log_prompts()
        finally:
            self.run.finish(exit_code=exit_code)
            self.run = None

    def log_prompts(self) -> Path | None:
        """Export the prompts to RUN_DIR/prompts.safetensors (as `fedclip export`) and log
        them as an artifact of type "model"; None (with a warning) if the export fails."""
        import wandb

        from fedclip.export import export_prompts

        try:
            path = export_prompts(self.run_dir)
        except (FedclipError, OSError) as e:
            log.warning("W&B: the prompts were not exported, no artifact logged: %s", e)
            return None
        metadata = {
            key: self.config.get(key)
            for key in ("learner", "strategy", "backbone", "seed")
            if key in self.config
        }
        artifact = wandb.Artifact(artifact_name(self.run_dir.name), type="model", metadata=metadata)
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)
        return path

    # ---- what the loop logs --------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run is None:
            return
        row = dict(metrics)
        if step is not None:
            row["round"] = step
        self.run.log(row)

    def publish(self, paths: list[Path], step: int | None = None) -> None:
        """Send files just written in the run folder: .png files as images (`plots/STEM`),
        the RUN_FILES as run files; missing files are skipped."""
        if self.run is None:
            return
        import wandb

        images: dict[str, Any] = {}
        for path in map(Path, paths):
            if not path.is_file():
                continue
            if path.suffix == ".png":
                images[f"plots/{path.stem}"] = wandb.Image(str(path))
            elif path.name in RUN_FILES:
                self.run.save(str(path), base_path=str(self.run_dir.parent), policy="now")
        if images:
            if step is not None:
                images["round"] = step
            self.run.log(images)

    def set_summary(self, values: dict[str, Any]) -> None:
        """Set these keys of the W&B run's summary (the selected round's metrics)."""
        if self.run is not None:
            self.run.summary.update(values)

    def save(self) -> None:
        """Nothing to flush: wandb writes on its own (the loop flushes every logger)."""
