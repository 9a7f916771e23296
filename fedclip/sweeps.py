"""What `fedclip fit` does differently when a W&B sweep agent runs it.

`wandb agent` starts `fedclip fit --config X.yaml --key=value ...` once per sweep run, with
WANDB_SWEEP_ID and WANDB_RUN_ID (the id it chose for the run) in the environment. Under a
sweep, fedclip:

- ignores the arguments the agent adds that are not settings: a preempted run that W&B
  requeues is started again with its whole W&B config as arguments, W&B's internal `_wandb`
  entry included (`--_wandb={...}`);
- logs to W&B even when `logger.wandb` is false, since a sweep run without W&B metrics is
  lost to the sweep;
- names the run folder after the agent's run id (`<run_name or learner-dataset>-<run id>`),
  so two agents sharing an output folder never meet, and a requeued run finds its own
  folder and continues from its checkpoint;
- leaves the W&B run id (and project and entity) to the agent: wandb ignores any other
  under a sweep, with a warning. Outside a sweep the id is fedclip's own, a fresh random
  one kept in the run folder (`wandb_id`) and reused only by `--resume`
  (fedclip.tracking); under a sweep nothing is stored: a requeued run gets the agent's id
  again.

Nothing here imports wandb at module level: outside a sweep none of it costs anything.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedclip.config import FitConfig, LoggerConfig

log = logging.getLogger(__name__)

SWEEP_ID_ENV = "WANDB_SWEEP_ID"
RUN_ID_ENV = "WANDB_RUN_ID"
# Opt-in: a sweep run stopped by SIGTERM asks W&B to requeue it (see requeue_if_preempted).
REQUEUE_ENV = "FEDCLIP_SWEEP_REQUEUE"

# Entries of a W&B run's config that are not fedclip settings, which the agent passes back
# as arguments when it starts a requeued run again (wandb/wandb issues #4237, #9143).
AGENT_KEYS = ("_wandb",)


def strip_agent_arguments(argv: list[str]) -> list[str]:
    """`argv` without the agent's non-setting arguments (AGENT_KEYS), everything else in order.

    Covers every style of the sweep command's argument macros (wandb's
    `create_sweep_command_args`): `--_wandb=V` (`${args}`, `${args_no_boolean_flags}`),
    `--_wandb V` as two items (`${args_no_equals}`), `_wandb=V` (`${args_no_hyphens}`) and
    `+_wandb=V`, `++_wandb=V` (the Hydra styles). V is a Python dict's repr, often with
    spaces, but always one item of argv: the agent starts the command without a shell.
    """
    out: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
            continue
        name = arg.lstrip("+-").split("=", 1)[0]
        if name in AGENT_KEYS and (arg.lstrip("+-") != arg or "=" in arg):
            skip_value = arg == f"--{name}"  # `--_wandb V`: V is the next item
            continue
        out.append(arg)
    return out


def sweep_id() -> str | None:
    """The W&B sweep this process runs for (WANDB_SWEEP_ID, set by `wandb agent`), or None."""
    return os.environ.get(SWEEP_ID_ENV) or None


def sweep_run_id() -> str | None:
    """The W&B run id the sweep agent chose for this process (WANDB_RUN_ID), or None when no
    sweep runs it. A WANDB_RUN_ID without WANDB_SWEEP_ID is not a sweep's and is ignored."""
    if sweep_id() is None:
        return None
    return os.environ.get(RUN_ID_ENV) or None


def sweep_run_name(base: str, run_id: str) -> str:
    """The run folder name of sweep run `run_id`: `base-run_id`. A base that already ends
    with `-run_id` (the saved config.yaml of that run, given again) is kept as it is."""
    suffix = f"-{run_id}"
    return base if base.endswith(suffix) else base + suffix


def configure_sweep_run(cfg: FitConfig, plain: dict[str, Any]) -> str | None:
    """Under a sweep: turn W&B logging on (in `cfg` and in its plain dump `plain`, which is
    saved as the run's config.yaml) and return the run folder name of this sweep run.
    Outside a sweep: change nothing and return None.

    The name has no timestamp (unlike the default run name): a requeued run must arrive at
    the same folder to continue from its checkpoint.
    """
    run_id = sweep_run_id()
    if run_id is None:
        return None
    if not cfg.logger.wandb:
        log.warning(
            "logger.wandb is false, but W&B sweep %s runs this (run %s): logging to W&B",
            sweep_id(),
            run_id,
        )
        cfg.logger.wandb = True
    plain.setdefault("logger", {})["wandb"] = True
    learner = type(cfg.learner).__name__.lower()
    dataset = getattr(cfg.data.dataset, "name", type(cfg.data.dataset).__name__.lower())
    return sweep_run_name(cfg.run_name or f"{learner}-{dataset}", run_id)


def continue_sweep_run(checkpoint: Path) -> bool:
    """True when a sweep runs this and `checkpoint` (of this sweep run's folder) exists: W&B
    started a requeued run again, which should continue from its checkpoint rather than be
    refused for lack of `--resume true`. The folder is named after the run id, so the
    checkpoint can only be this run's own."""
    return sweep_run_id() is not None and checkpoint.is_file()


def wandb_init_kwargs(
    run_dir: Path, logger_cfg: LoggerConfig, run_id: str | None
) -> dict[str, Any]:
    """Keyword arguments of `wandb.init` for run folder `run_dir` (config aside).

    Outside a sweep the W&B run id is `run_id`, fedclip's own: a fresh random one stored in
    the run folder, reused only when the run continues from its checkpoint (see
    fedclip.tracking). Under a sweep the run id is the agent's (wandb reads WANDB_RUN_ID
    itself): any other would be ignored with a warning, and the agent's is what ties the
    run to its sweep, so `run_id` is left out. Project and entity are passed as configured;
    under a sweep wandb uses the sweep's and says so.
    """
    return {
        "project": logger_cfg.project,
        "entity": logger_cfg.entity,
        "name": run_dir.name,
        "id": run_id if sweep_run_id() is None else None,
        "resume": "allow",
        "dir": str(run_dir),
        "tags": list(logger_cfg.tags),
        "group": logger_cfg.group,
        "job_type": logger_cfg.job_type,
        "notes": logger_cfg.notes,
    }


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def requeue_if_preempted(signum: int | None) -> bool:
    """Ask W&B to requeue this sweep run (`wandb.run.mark_preempting()`) when SIGTERM
    stopped it, a sweep runs it and FEDCLIP_SWEEP_REQUEUE=1; True when it asked.

    Call it after the stop's checkpoint is written and before the process exits with
    128 + signum: W&B requeues a preempting run that exits non-zero, and an agent starts it
    again with the same run id, so it continues from that checkpoint (continue_sweep_run).

    Opt-in, because SIGTERM is ambiguous under an agent: it is how clusters preempt (SLURM,
    Kubernetes, spot VMs), but also how the agent carries out the sweep's `stop` command
    (wandb_agent.py `_command_stop`), e.g. for a run that hyperband terminates early;
    requeueing that would undo the stop. A stop that wandb itself detects inside the run
    (its stop-status poll) arrives as SIGINT and is never requeued.
    """
    if (
        signum != signal.SIGTERM
        or sweep_run_id() is None
        or not _truthy(os.environ.get(REQUEUE_ENV))
    ):
        return False
    import wandb

    if wandb.run is None:
        return False
    wandb.run.mark_preempting()
    return True
