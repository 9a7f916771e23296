"""The `fedclip` command: `fedclip fit --config X.yaml`, `fedclip evaluate --run_dir R`,
`fedclip partition --config X.yaml`, `fedclip export --run_dir R`,
`fedclip predict --run_dir R IMAGE...`, `fedclip suite --config S.yaml` and
`fedclip compare RUN_DIR...`; `fedclip --help` lists them, `fedclip --version`.

Every YAML key is also a flag (`--learner.init_args.n_ctx=8`, or `--learner.n_ctx=8`), and
`--print_config` prints the resolved configuration. Keys are exact: a prefix such as
`--federation.round` is refused with the closest key (`fedclip.parsing`). This module
imports no torch at its top: each command imports what it needs when it runs.

Exit codes: 0 done; 2 bad input (a `FedclipError`, or a flag or value the parser refuses),
printed as one line `fedclip CMD: error: ...` that names the problem, with nothing already
written touched; 1 a bug (any other exception, traceback kept) or a federation that cannot
go on; 128 + N stopped by signal N after a checkpoint; 130 Ctrl-C (one line, no traceback;
how a fit ends: `fedclip.fit_command`). FEDCLIP_DEBUG=1 re-raises bad input with its
traceback too. Nothing in the package imports this module.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from pathlib import Path

from fedclip.errors import UsageError, one_line, user_error
from fedclip.parsing import closest, command_parser, parse_args
from fedclip.sweeps import strip_agent_arguments


class Command:
    """A command imported only when it runs (`fedclip --help`, `--version` and an unknown
    command import no torch); `help` is its line in `fedclip --help`."""

    def __init__(self, target: str, help: str) -> None:
        self.target, self.help = target, help

    def __call__(self, argv: list[str]) -> int:
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function)(argv)


COMMANDS = {
    "fit": Command("fedclip.cli:cmd_fit", "run a federated prompt-learning experiment"),
    "evaluate": Command("fedclip.cli:cmd_evaluate", "evaluate every client of a saved run"),
    "partition": Command(
        "fedclip.partition_command:cmd_partition",
        "show how the data is split among clients (table, JSON, heatmap; no model)",
    ),
    "export": Command("fedclip.export:cmd_export", "write a run's prompts as one .safetensors"),
    "predict": Command(
        "fedclip.predict:cmd_predict", "classify image files with a run's trained prompts"
    ),
    "suite": Command(
        "fedclip.suites.run:cmd_suite",
        "run a suite of fits (methods x settings x seeds) and write its table",
    ),
    "compare": Command(
        "fedclip.suites.compare:cmd_compare",
        "tabulate existing run folders (mean ± std over seeds), grouped by config keys",
    ),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("fedclip")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def top_help() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: fedclip COMMAND [options]   (fedclip COMMAND -h: that command's keys)",
        "",
        "Federated prompt learning on frozen CLIP-like models.",
        "",
        "commands:",
        *(f"  {n:<{width}}  {getattr(c, 'help', '')}" for n, c in COMMANDS.items()),
        "",
        "options:",
        "  -h, --help     show this message",
        "  --version      show the fedclip version",
        "",
        "Every YAML key is also a flag (--federation.rounds=3); keys are exact (no prefixes).",
    ]
    return "\n".join(lines)


def evaluate_parser():
    from fedclip.config import add_run_arguments
    from fedclip.data.datasets import DatasetSource

    parser = command_parser(
        "fedclip evaluate", "Evaluate every client of a saved run from its last checkpoint."
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


def cmd_fit(argv: list[str]) -> int:
    from fedclip.config import (
        build_fit_config,
        check_config_files,
        check_resume,
        check_run_name,
        default_run_name,
        fit_parser,
    )
    from fedclip.federation import Federation
    from fedclip.fit_command import run_fit
    from fedclip.report import start_run_folder
    from fedclip.sweeps import configure_sweep_run, continue_sweep_run

    check_config_files(argv)
    parser = fit_parser()
    ns = parse_args(parser, argv)
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
    if fed.rank == 0:  # with several ranks, rank 0 alone writes and reports
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create the run folder {run_dir}: {e.strerror}") from e
        start_run_folder(run_dir, plain, fed.data.summary())  # stale temp files go first
    return run_fit(fed, run_dir, run_name, ns.resume)


def cmd_evaluate(argv: list[str]) -> int:
    import json

    from fedclip.checkpoint import write_text_atomic
    from fedclip.config import read_run_config
    from fedclip.federation import Federation
    from fedclip.federation.devices import fall_back_to_cpu
    from fedclip.report import print_table

    eval_parser = evaluate_parser()
    ns = parse_args(eval_parser, argv)
    run_dir = Path(ns.run_dir)
    cfg, plain = read_run_config(run_dir)
    cfg.fabric.devices = cfg.fabric.num_nodes = 1  # evaluation runs in this one process
    fall_back_to_cpu(cfg, "evaluate")  # a run trained on a GPU this machine lacks
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
    fed.cfg.federation.select = "last"  # the table is this evaluation, not a selected round
    write_text_atomic(run_dir / "eval.json", json.dumps({"round": fed.round, **metrics}, indent=2))
    print_table(fed, f"{run_dir.name}: evaluation after round {fed.round}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = strip_agent_arguments(argv)  # e.g. the `--_wandb=...` of a requeued sweep run
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*JsonargparseDeprecationWarning.*")
    if not argv or argv[0] in {"-h", "--help"}:
        print(top_help())
        return 0
    if argv[0] == "--version":
        print(f"fedclip {version()}")
        return 0
    if argv[0] not in COMMANDS:
        near = closest(argv[0], COMMANDS)
        hint = f"did you mean {near}?" if near else f"choose from {', '.join(COMMANDS)}"
        print(f"fedclip: error: unknown command {argv[0]!r} ({hint})", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except KeyboardInterrupt:  # Ctrl-C outside a fit's rounds (start-up, loading, writing)
        print(
            f"fedclip {argv[0]}: interrupted (files are replaced whole: none is half-written)",
            file=sys.stderr,
        )
        return 130
    except Exception as e:
        user = user_error(e)
        if user is None or os.environ.get("FEDCLIP_DEBUG"):
            raise
        print(f"fedclip {argv[0]}: error: {one_line(str(user))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
