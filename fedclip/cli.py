"""The `fedclip` command: `fedclip fit --config X.yaml`, `fedclip evaluate --run_dir R`,
`fedclip partition --config X.yaml` and `fedclip export --run_dir R`.

Every YAML key is also a flag (`--learner.init_args.n_ctx=8`, or `--learner.n_ctx=8`), and
`--print_config` prints the resolved configuration. Bad input exits with code 2 and a single
line that names the problem; nothing already written is touched.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from fedclip.checkpoint import atomic_path, write_text_atomic
from fedclip.config import FitConfig
from fedclip.data.datasets import DatasetSource
from fedclip.errors import UsageError
from fedclip.export import cmd_export
from fedclip.sweeps import (
    configure_sweep_run,
    continue_sweep_run,
    requeue_if_preempted,
    strip_agent_arguments,
)

DEFAULTS = {
    "learner": {"class_path": "fedclip.learners.TextualPrompt"},
    "strategy": {"class_path": "fedclip.strategies.FedAvg"},
    "data.dataset": {"class_path": "fedclip.data.Shapes"},
    "data.partitioner": {"class_path": "fedclip.data.Dirichlet"},
}


def fit_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="fedclip fit",
        description="Run a federated prompt-learning experiment.",
        exit_on_error=False,
    )
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


def evaluate_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="fedclip evaluate",
        description="Evaluate every client of a saved run from its last checkpoint.",
        exit_on_error=False,
    )
    add_run_arguments(parser)
    parser.add_subclass_arguments(
        DatasetSource,
        "dataset",
        required=False,
        help="also evaluate on this data set's test split (cross-dataset transfer, e.g. "
        "fedclip.data.ImageNetV2 after training on ImageNet); class_path + init_args",
    )
    return parser


def one_line(message: str) -> str:
    return " ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())


def check_config_files(argv: list[str]) -> None:
    """Every --config file must exist and be valid YAML; say which file and where if not."""
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
            yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UsageError(f"{path}: not valid YAML: {problem}{where}") from e


def _differences(saved: Any, given: Any, prefix: str = "") -> list[str]:
    """Leaf keys where two plain configs differ, as 'a.b.c (saved X, given Y)'."""
    if isinstance(saved, dict) and isinstance(given, dict):
        out = []
        for key in sorted(set(saved) | set(given), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            out += _differences(saved.get(key), given.get(key), name)
        return out
    return [] if saved == given else [f"{prefix} (saved {saved!r}, given {given!r})"]


def check_run_name(name: str) -> None:
    if not name or name in {".", ".."} or "/" in name or "\\" in name or Path(name).is_absolute():
        raise UsageError(
            f"run_name {name!r} must be a plain folder name (no path separators or '..')"
        )


def build_fit_config(parser: ArgumentParser, ns: Namespace) -> tuple[FitConfig, dict[str, Any]]:
    """Instantiate the parsed namespace into a FitConfig plus its plain-data dump."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jsonargparse's notices about its own API
        plain = yaml.safe_load(parser.dump(ns, skip_none=False, skip_validation=True))
    for key in ("config", "resume", "progress", "print_config", "out"):
        plain.pop(key, None)
    init = (
        parser.instantiate(ns) if hasattr(parser, "instantiate") else parser.instantiate_classes(ns)
    )
    fields = {k: init[k] for k in FitConfig.__dataclass_fields__}
    return FitConfig(**fields), plain


def read_run_config(run_dir: Path) -> tuple[FitConfig, dict[str, Any]]:
    """The FitConfig (and its plain dump) saved in a run folder's config.yaml."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise UsageError(f"{run_dir} is not a fedclip run folder (no config.yaml)")
    parser = fit_parser()
    return build_fit_config(parser, parser.parse_args(["--config", str(cfg_path)]))


def add_run_arguments(parser: ArgumentParser) -> None:
    """--run_dir and --checkpoint: the commands that read a finished run."""
    parser.add_argument("--run_dir", type=str, required=True, help="run folder of `fedclip fit`")
    parser.add_argument(
        "--checkpoint", type=str | None, default=None, help="checkpoint (default: last)"
    )


def default_run_name(cfg: FitConfig) -> str:
    learner = type(cfg.learner).__name__.lower()
    dataset = getattr(cfg.data.dataset, "name", type(cfg.data.dataset).__name__.lower())
    return f"{learner}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def print_table(fed, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    summary = fed.summary()
    name = fed.metric
    nan = float("nan")
    table = Table(title=title)
    for col in ("client", "train", "test", "classes", "mAP %" if name == "map" else "acc %"):
        table.add_column(col, justify="right")
    for row in summary["clients"]:
        value = row[name]
        table.add_row(
            str(row["client"]),
            str(row["train"]),
            str(row["test"]),
            str(row["classes"]),
            "-" if value != value else f"{100 * value:.2f}",
        )
    ev = summary["eval"]
    if ev:
        table.add_section()
        mean, std = ev.get(f"eval/{name}_mean", nan), ev.get(f"eval/{name}_std", nan)
        table.add_row("mean", "", "", "", f"{100 * mean:.2f} ± {100 * std:.2f}")
        table.add_row("min", "", "", "", f"{100 * ev.get(f'eval/{name}_min', nan):.2f}")
        if "eval/map_pooled" in ev:
            table.add_row("pooled", "", "", "", f"{100 * ev['eval/map_pooled']:.2f}")
        if "eval/hm" in ev:  # base-to-novel: the pooled base and novel accuracies, and HM
            for key in ("base", "novel", "hm"):
                table.add_row(key, "", "", "", f"{100 * ev[f'eval/{key}']:.2f}")
    Console().print(table)


def write_results(fed, run_dir: Path) -> None:
    from fedclip.report import plot_curves

    summary = fed.summary()
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2, default=float))
    with atomic_path(run_dir / "curves.png") as tmp:
        plot_curves(fed.history, tmp)


def check_resume(run_dir: Path, plain: dict[str, Any]) -> None:
    """A resumed run's config must equal the saved one but for the resumable keys; the
    message names every key that differs with its saved and given values."""
    from fedclip.federation import without_resumable

    saved = without_resumable(yaml.safe_load((run_dir / "config.yaml").read_text()))
    given = without_resumable(plain)
    changed = [
        d
        for k in sorted(set(given) | set(saved))
        if k not in {"federation", "logger"}
        for d in _differences(saved.get(k), given.get(k), k)
    ]
    if changed:
        shown = "; ".join(changed[:3]) + (
            f"; and {len(changed) - 3} more" if len(changed) > 3 else ""
        )
        raise UsageError(f"--resume: config differs from {run_dir / 'config.yaml'}: {shown}")


def cmd_fit(argv: list[str]) -> int:
    from fedclip.federation import Federation, FederationError

    check_config_files(argv)
    parser = fit_parser()
    ns = parser.parse_args(argv)
    cfg, plain = build_fit_config(parser, ns)
    # under a W&B sweep: W&B logging on, and a run folder named after the agent's run id
    run_name = configure_sweep_run(cfg, plain) or cfg.run_name or default_run_name(cfg)
    check_run_name(run_name)
    run_dir = Path(cfg.output_dir) / run_name
    for folder in (Path(cfg.output_dir), run_dir, run_dir / "checkpoints"):
        if folder.exists() and not folder.is_dir():
            raise UsageError(
                f"{folder} exists and is not a folder; choose another output_dir/run_name"
            )
    plain["run_name"] = run_name
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if continue_sweep_run(ckpt):
        ns.resume = True  # a requeued sweep run goes on from its own checkpoint
    if ns.resume and not ckpt.is_file():
        raise UsageError(f"--resume: no checkpoint at {ckpt}")
    if not ns.resume and ckpt.is_file():
        raise UsageError(
            f"run folder {run_dir} already holds a checkpoint; pass --resume to continue it "
            "or choose another run_name"
        )
    if ns.resume:
        check_resume(run_dir, plain)
    fed = Federation(cfg, run_dir, plain, show_progress=ns.progress)
    if ns.resume:
        fed.load(ckpt)  # a corrupt or foreign checkpoint stops here, before anything is written
    main_rank = fed.rank == 0  # with several ranks, rank 0 alone writes and reports
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(plain, sort_keys=False))
        from fedclip.report import write_partition

        write_partition(fed.data.summary(), run_dir)
    resume_hint = f"fedclip fit --config {run_dir / 'config.yaml'} --resume true"
    try:
        fed.fit(resume=ns.resume)
    except KeyboardInterrupt:
        fed.close(130)
        if main_rank:
            print(
                f"aborted; the last checkpoint is {ckpt} (continue: {resume_hint})",
                file=sys.stderr,
            )
        return 130
    except FederationError as e:
        fed.close(1)
        client_tb = getattr(e, "client_traceback", None)
        if main_rank and client_tb:  # the last failing client's traceback (all: run.log)
            print(client_tb.rstrip("\n"), file=sys.stderr)
        if main_rank:
            print(
                f"fedclip fit: stopped: {one_line(str(e))}; the round so far is in {ckpt} "
                f"(continue: {resume_hint}, e.g. with a higher federation.max_client_failures)",
                file=sys.stderr,
            )
        return 1
    except BaseException:
        fed.close(1)  # a bug: loggers closed as failed, the last checkpoint intact
        raise
    code = 128 + fed.stopped_by if fed.stopped_by is not None else 0
    if not main_rank:
        fed.close(code)
        return code
    write_results(fed, run_dir)
    if fed.stopped_by is not None:
        name = signal.Signals(fed.stopped_by).name
        print(
            f"stopped by {name} after a checkpoint: {ckpt} (continue: {resume_hint})",
            file=sys.stderr,
        )
        if requeue_if_preempted(fed.stopped_by):  # while the W&B run is still open
            print("W&B sweep: run marked preempting; the sweep requeues it", file=sys.stderr)
        fed.close(code)
        return code
    fed.close(0)
    print_table(fed, f"{run_name}: round {fed.round}")
    print(f"run folder: {run_dir}")
    return 0


def cmd_evaluate(argv: list[str]) -> int:
    from fedclip.federation import Federation

    eval_parser = evaluate_parser()
    ns = eval_parser.parse_args(argv)
    run_dir = Path(ns.run_dir)
    cfg, plain = read_run_config(run_dir)
    cfg.fabric.devices = cfg.fabric.num_nodes = 1  # evaluation runs in this one process
    fed = Federation(cfg, None, plain, show_progress=False)
    fed.load(ns.checkpoint or run_dir / "checkpoints" / "last.ckpt")
    metrics = fed.evaluation_metrics(fed.round)
    if ns.get("dataset") is not None:
        init = getattr(eval_parser, "instantiate", None) or eval_parser.instantiate_classes
        source = init(ns).dataset
        name = getattr(source, "name", type(source).__name__)
        fed.data.add_transfer(name, source)
        transfer = fed.evaluate_transfer(name)
        metrics.update(transfer)
        print(
            f"{name}: accuracy {100 * transfer[f'transfer/{name}/acc']:.2f}% (pooled over clients)"
        )
    fed.history.append({"round": float(fed.round), **metrics})
    write_text_atomic(run_dir / "eval.json", json.dumps({"round": fed.round, **metrics}, indent=2))
    print_table(fed, f"{run_dir.name}: evaluation after round {fed.round}")
    return 0


def partition_parser() -> ArgumentParser:
    parser = fit_parser()
    parser.prog = "fedclip partition"
    parser.description = (
        "Show how the configured data and partitioner split the samples among clients: a "
        "per-client table, and a JSON summary plus a heatmap PNG of the client-by-class counts."
    )
    parser.add_argument(
        "--out",
        type=str | None,
        default=None,
        help="path stem of the .json and .png (default: output_dir/partition-<dataset>)",
    )
    return parser


def cmd_partition(argv: list[str]) -> int:
    from rich.console import Console

    from fedclip.data.federated import FederatedData
    from fedclip.report import partition_table, write_partition

    check_config_files(argv)
    parser = partition_parser()
    ns = parser.parse_args(argv)
    cfg, _ = build_fit_config(parser, ns)
    data = FederatedData(cfg.data, cfg.seed)
    summary = data.summary()
    out = Path(ns.out) if ns.out else Path(cfg.output_dir) / f"partition-{summary['dataset']}"
    title = f"{summary['dataset']}: {summary['partitioner']}, seed {cfg.seed}"
    Console().print(partition_table(summary, title))
    for path in write_partition(summary, out.parent, out.name):
        print(f"wrote {path}")
    return 0


COMMANDS = {
    "fit": cmd_fit,
    "evaluate": cmd_evaluate,
    "partition": cmd_partition,
    "export": cmd_export,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = strip_agent_arguments(argv)  # e.g. the `--_wandb=...` of a requeued sweep run
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*JsonargparseDeprecationWarning.*")
    usage = (
        f"usage: fedclip {{{','.join(COMMANDS)}}} [--config X.yaml] [options]  "
        "(fedclip fit -h for all keys)"
    )
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage)
        return 0
    if argv[0] not in COMMANDS:
        print(
            f"fedclip: error: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})",
            file=sys.stderr,
        )
        return 2
    from fedclip.backbone import BackboneError
    from fedclip.checkpoint import CheckpointError
    from fedclip.data.datasets import DataError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except (
        argparse.ArgumentError,
        UsageError,
        BackboneError,
        DataError,
        CheckpointError,
        ValueError,
        OSError,
    ) as e:
        if os.environ.get("FEDCLIP_DEBUG"):
            raise
        print(f"fedclip {argv[0]}: error: {one_line(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
