"""The `fedclip fit` configuration: one dataclass per YAML section, the parser that reads it
from YAML and flags, and the helpers that build, check and re-read a run's config.

Pluggable parts (learner, strategy, data set, partitioner) are given with `class_path` and
`init_args`, so a new method is a new class, never a new script. The commands (fedclip.cli)
and the Flower apps share these helpers, so that every entry point reads a config alike.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from fedclip.backbone import BackboneConfig
from fedclip.config_checks import check_layout, check_numbers
from fedclip.data.federated import DataConfig
from fedclip.data.multi import resolve_num_clients
from fedclip.errors import ConfigError, DataError, UsageError
from fedclip.learners.base import MultiLabelConfig, OptimConfig, PromptLearner
from fedclip.learners.textual import TextualPrompt
from fedclip.parsing import command_parser, parse_args
from fedclip.privacy import PrivacyConfig
from fedclip.strategies.base import Strategy
from fedclip.strategies.fedavg import FedAvg


@dataclass
class FederationConfig:
    """The round loop.

    Args:
        rounds: communication rounds.
        fraction: fraction of clients sampled per round (at least one client).
        local_epochs: local epochs per sampled client per round (one step per batch).
        local_steps: if set, every sampled client takes exactly this many optimiser steps
            per round instead of `local_epochs` epochs, passing over its shuffled batches
            as often as needed (a fresh shuffle per pass); 1 gives lock-step protocols
            where the global part is averaged after every step.
        eval_every: evaluate every client every this many rounds (and after the last).
        eval_at_start: evaluate the initial prompts before round 1 (logged as round 0).
        max_client_failures: a client whose local training raises or whose loss is not
            finite, or whose upload is invalid, is left out of its round (logged with its id
            and reason); the run stops when more than this many fail in one round. null: stop
            only when every sampled client of a round fails. Can be changed on --resume.
        select: which evaluated round the run reports (summary.json's `eval`, the per-client
            rows, the end-of-fit table): 'last', the last one; 'val', the one with the best
            `select_by` validation metric (ties: the earliest; rounds where it is NaN are
            skipped; round 0 only when no trained round was evaluated), whose test metrics
            are reported. Needs `data.val_fraction` > 0. Never the best test round. Can be
            changed on --resume.
        select_by: the validation metric `select: val` maximises, a `val/` key such as
            val/acc_mean, val/acc_min, val/global, val/dual (val/map_mean, val/map_pooled
            for multi-label data); null: the headline's (val/acc_mean, val/map_mean for
            multi-label data; val/acc_mean under base-to-novel, whose eval/hm has no
            validation counterpart).
    """

    rounds: int = 10
    fraction: float = 1.0
    local_epochs: int = 1
    local_steps: int | None = None
    eval_every: int = 1
    eval_at_start: bool = True
    max_client_failures: int | None = None
    select: Literal["last", "val"] = "last"
    select_by: str | None = None


@dataclass
class FabricConfig:
    """Devices and precision, handled by Lightning Fabric.

    Args:
        accelerator: 'auto', 'cpu', 'cuda', 'mps'.
        devices: devices per node, one process each; every round's sampled clients are
            split among all ranks (devices x num_nodes) and the outcome is the same as on
            one device. On 'cpu', N processes (gloo). 1: clients run one after another.
        num_nodes: machines (launched by torchrun, SLURM or another cluster launcher).
        precision: '32-true', 'bf16-mixed' or '16-mixed'.
    """

    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "32"] = "32-true"


@dataclass
class LoggerConfig:
    """Where metrics go (the CSV file is always written).

    Args:
        wandb: also log to Weights & Biases (WANDB_MODE=offline works without network).
        project: W&B project.
        entity: W&B entity (team or user); null uses the default.
        tags: W&B tags.
        group: W&B group (e.g. the runs of one experiment); null: none.
        job_type: W&B job type (e.g. "train", "ablation"); null: none.
        notes: W&B notes, a free-text description of the run.
        log_artifacts: at the end of a finished run, export the prompts (as `fedclip
            export` does, to RUN_DIR/prompts.safetensors) and log them to W&B as an
            artifact of type "model".
    """

    wandb: bool = False
    project: str = "fedclip"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    group: str | None = None
    job_type: str | None = None
    notes: str | None = None
    log_artifacts: bool = False


@dataclass
class FitConfig:
    """A federated prompt-learning run.

    Args:
        seed: seeds partitions, client sampling, prompt initialisation and shuffling.
        output_dir: parent folder of run folders.
        run_name: run folder name under output_dir (default: learner_dataset_time).
        backbone: the frozen CLIP.
        learner: the prompt learner (class_path + init_args).
        strategy: the federation strategy (class_path + init_args).
        data: data set, partition and loaders.
        federation: rounds, participation and evaluation.
        optim: local optimiser.
        fabric: devices and precision.
        logger: metric loggers.
        multilabel: loss of multi-label data sets (ignored for single-label ones).
        privacy: differential privacy of the uploads (client-level clipping and noise).
    """

    seed: int = 0
    output_dir: str = "runs"
    run_name: str | None = None
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    learner: PromptLearner = field(default_factory=TextualPrompt)
    strategy: Strategy = field(default_factory=FedAvg)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fabric: FabricConfig = field(default_factory=FabricConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    multilabel: MultiLabelConfig = field(default_factory=MultiLabelConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


# ---- the parser ------------------------------------------------------------------------------
DEFAULTS = {
    "learner": {"class_path": "fedclip.learners.TextualPrompt"},
    "strategy": {"class_path": "fedclip.strategies.FedAvg"},
    "data.dataset": {"class_path": "fedclip.data.Shapes"},
    "data.partitioner": {"class_path": "fedclip.data.Dirichlet"},
}


def fit_parser() -> ArgumentParser:
    """The parser of `fedclip fit`: every FitConfig key is a flag, plus --config, --resume and
    --progress. Exact keys only; bad flags or values raise argparse.ArgumentError (read it
    with `fedclip.parsing.parse_args` to name the closest key on a typo)."""
    parser = command_parser("fedclip fit", "Run a federated prompt-learning experiment.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file(s)")
    parser.add_argument(
        "--resume",
        type=bool,
        default=False,
        help="continue the run in output_dir/run_name from its last checkpoint",
    )
    parser.add_argument(
        "--progress", type=bool, default=True, help="show progress and a line per round"
    )
    parser.add_class_arguments(FitConfig, nested_key=None, fail_untyped=True, sub_configs=True)
    parser.set_defaults(DEFAULTS)
    return parser


def add_run_arguments(parser: ArgumentParser) -> None:
    """--run_dir and --checkpoint: the commands that read a finished run."""
    parser.add_argument("--run_dir", type=str, required=True, help="run folder of `fedclip fit`")
    parser.add_argument(
        "--checkpoint", type=str | None, default=None, help="checkpoint (default: last)"
    )


def check_config_files(argv: list[str]) -> None:
    """Every --config file must exist, be UTF-8 YAML and hold a mapping of settings whose
    sections are mappings; a UsageError says which file and where if not (before
    jsonargparse, whose own messages name neither the file nor the line)."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        if not Path(path).is_file():
            raise UsageError(f"config file not found: {path}")
        try:
            text = Path(path).read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(
                f"{path}: not a YAML text file (byte {e.object[e.start]:#04x} at offset "
                f"{e.start} is not UTF-8)"
            ) from None
        except OSError as e:
            raise UsageError(f"cannot read config file {path}: {e.strerror or e}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UsageError(f"{path}: not valid YAML: {problem}{where}") from e
        check_layout(path, loaded, FitConfig)


def plain_config(parser: ArgumentParser, ns: Namespace) -> dict[str, Any]:
    """The parsed namespace as plain data (without the command's own flags), after
    `check_numbers`: a NaN, an inf or an integer numpy or torch cannot take is a
    ConfigError naming its dotted key, before any class is built."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jsonargparse's notices about its own API
        plain = yaml.safe_load(parser.dump(ns, skip_none=False, skip_validation=True))
    for key in ("config", "resume", "progress", "print_config", "out"):
        plain.pop(key, None)
    check_numbers(plain)
    return plain


def build_fit_config(parser: ArgumentParser, ns: Namespace) -> tuple[FitConfig, dict[str, Any]]:
    """Instantiate the parsed namespace into a FitConfig plus its plain-data dump (what
    config.yaml holds). A class whose arguments no run can use raises its ConfigError here,
    possibly wrapped by jsonargparse (see fedclip.cli.main)."""
    plain = plain_config(parser, ns)
    init = (
        parser.instantiate(ns) if hasattr(parser, "instantiate") else parser.instantiate_classes(ns)
    )
    fields = {k: init[k] for k in FitConfig.__dataclass_fields__}
    cfg = FitConfig(**fields)
    try:
        resolve_num_clients(cfg.data)  # data.num_clients: null -> what the partitioner makes
    except DataError:  # the data is not there (yet): FederatedData counts, or names what is missing
        pass
    return cfg, plain


def read_run_config(run_dir: Path) -> tuple[FitConfig, dict[str, Any]]:
    """The FitConfig (and its plain dump) saved in a run folder's config.yaml; a UsageError
    when the folder holds none or it is not valid YAML."""
    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.is_file():
        raise UsageError(f"{run_dir} is not a fedclip run folder (no config.yaml)")
    check_config_files(["--config", str(cfg_path)])
    parser = fit_parser()
    ns = parse_args(parser, ["--config", str(cfg_path)])
    try:
        return build_fit_config(parser, ns)
    except ConfigError as e:
        raise ConfigError(f"{cfg_path}: {e}") from e


# ---- run folders -----------------------------------------------------------------------------
def check_run_name(name: str) -> None:
    """A run name is one folder under output_dir, never a path out of it (UsageError)."""
    if not name or name in {".", ".."} or "/" in name or "\\" in name or Path(name).is_absolute():
        raise UsageError(
            f"run_name {name!r} must be a plain folder name (no path separators or '..')"
        )


def default_run_name(cfg: FitConfig) -> str:
    """learner-dataset-time, e.g. textualprompt-shapes-20250101-120000."""
    learner = type(cfg.learner).__name__.lower()
    dataset = getattr(cfg.data.dataset, "name", type(cfg.data.dataset).__name__.lower())
    return f"{learner}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def config_differences(saved: Any, given: Any, prefix: str = "") -> list[str]:
    """Leaf keys where two plain configs differ, as 'a.b.c (saved X, given Y)'."""
    if isinstance(saved, dict) and isinstance(given, dict):
        out = []
        for key in sorted(set(saved) | set(given), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            out += config_differences(saved.get(key), given.get(key), name)
        return out
    return [] if saved == given else [f"{prefix} (saved {saved!r}, given {given!r})"]


def check_resume(run_dir: Path, plain: dict[str, Any]) -> None:
    """A resumed run's config must equal the one saved in `run_dir` but for the resumable
    keys; UsageError names every key that differs with its saved and given values."""
    from fedclip.federation.settings import without_resumable

    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise UsageError(f"--resume: {run_dir} holds a checkpoint but no config.yaml")
    check_config_files(["--config", str(saved_path)])
    saved = without_resumable(yaml.safe_load(saved_path.read_text()) or {})
    given = without_resumable(plain)
    changed = [
        d
        for k in sorted(set(given) | set(saved))
        if k != "logger"  # every logger key may change (RESUMABLE_KEYS: where, not what)
        for d in config_differences(saved.get(k), given.get(k), k)
    ]
    if changed:
        shown = "; ".join(changed[:3]) + (
            f"; and {len(changed) - 3} more" if len(changed) > 3 else ""
        )
        raise UsageError(f"--resume: config differs from {run_dir / 'config.yaml'}: {shown}")
    warn_stretched_schedule(yaml.safe_load(saved_path.read_text()) or {}, plain)


def warn_stretched_schedule(saved: dict[str, Any], given: dict[str, Any]) -> None:
    """One warning when a resume changes federation.rounds under `cosine_span: run`: the
    schedule is stretched from the step reached (see `RunCosine`), not restarted."""
    rounds = [(c.get("federation") or {}).get("rounds") for c in (saved, given)]
    optim = given.get("optim") or {}
    if (
        rounds[0] != rounds[1]
        and optim.get("scheduler", "cosine") == "cosine"
        and optim.get("cosine_span") == "run"
    ):
        logging.getLogger("fedclip").warning(
            "--resume: federation.rounds %s -> %s with optim.cosine_span 'run': the cosine "
            "LR schedule is stretched from the step reached, from its current LR down to 0 "
            "at the new last round",
            rounds[0],
            rounds[1],
        )
