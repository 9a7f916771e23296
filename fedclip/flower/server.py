"""The ServerApp: fedclip's round loop (`RoundLoop`, the same as `fedclip fit`'s) with its
client turns on the nodes of a Flower Grid (`FlowerExecutor`).

What a run gets is what `fedclip fit` gets: the same seeded client sampling, per-client
payloads, upload checks, aggregation, differential privacy, failure limits, per-round
metrics, CSV and W&B logs, graceful stops (at round ends), summary.json and a checkpoint in
`fedclip fit`'s format (so `fedclip export` and `fedclip evaluate` read a deployment's run
folder). `resume=true` in the run config continues a run from its checkpoint; the clients'
personal states, which every node sends back with its replies, go back to the nodes with
their next message. Set-up failures (a wrong number of SuperNodes, bad node configs, a bad
YAML) end the run with one line and exit status 2.

Run config keys (flower_app/pyproject.toml, `flwr run ... --run-config`): `config` (the
fedclip YAML; a relative path is looked up in the ServerApp's working directory, then in the
Flower App folder), `overrides` (`fedclip fit` flags, e.g. "--federation.rounds=2"),
`resume`, `node-timeout` and `connect-timeout` (seconds).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from fedclip.config import (
    FitConfig,
    build_fit_config,
    check_config_files,
    check_resume,
    check_run_name,
    default_run_name,
    fit_parser,
)
from fedclip.errors import FedclipError, FederationError, FlowerSetupError, one_line
from fedclip.federation import RoundLoop, check_config, config_fingerprint, make_loggers
from fedclip.flower._flwr import Context, Grid, ServerApp, log
from fedclip.flower.executor import (  # noqa: F401 (the server's public names)
    FlowerExecutor,
    check_node_count,
    flower_reason,
    map_clients,
)
from fedclip.report import print_table, start_run_folder, write_results


@dataclass
class RunOptions:
    """The ServerApp's run config.

    Args:
        config: the fedclip YAML.
        overrides: `fedclip fit` flags applied after it ("--seed=1 --federation.rounds=2").
        node_timeout: seconds a node may take to answer one message.
        connect_timeout: seconds to wait until one node per client is connected.
        resume: continue the run in output_dir/run_name from its last checkpoint (the
            clients' personal states go back to their nodes from it).
    """

    config: str
    overrides: str = ""
    node_timeout: float = 600.0
    connect_timeout: float = 120.0
    resume: bool = False

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunOptions:
        if not str(run_config.get("config", "")).strip():
            raise FlowerSetupError(
                "no fedclip config: flwr run APP --run-config \"config='configs/x.yaml'\""
            )
        return cls(
            config=str(run_config["config"]),
            overrides=str(run_config.get("overrides", "")),
            node_timeout=float(run_config.get("node-timeout", cls.node_timeout)),
            connect_timeout=float(run_config.get("connect-timeout", cls.connect_timeout)),
            resume=str(run_config.get("resume", "false")).strip().lower() in {"1", "true", "yes"},
        )


def resolve_config(path: str, app_dir: Path | None) -> Path:
    """The YAML `path` names: absolute, or relative to this process's working directory or,
    failing that, to the Flower App folder (YAML files there travel with the app)."""
    given = Path(path).expanduser()
    candidates = [given] if given.is_absolute() else [Path.cwd() / given]
    if not given.is_absolute() and app_dir is not None:
        candidates.append(app_dir / given)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FlowerSetupError(
        f"config file not found: {path} (looked in {', '.join(str(c.parent) for c in candidates)})"
    )


def read_config(
    options: RunOptions, app_dir: Path | None
) -> tuple[FitConfig, dict[str, Any], bool]:
    """The FitConfig, its plain dump (with the run name) and the `--progress` flag, parsed
    exactly as `fedclip fit --config CONFIG OVERRIDES` parses them."""
    argv = [
        "--config",
        str(resolve_config(options.config, app_dir)),
        *shlex.split(options.overrides),
    ]
    check_config_files(argv)
    parser = fit_parser()
    ns = parser.parse_args(argv)
    if ns.resume:
        raise FlowerSetupError(
            'resume a Flower run with --run-config "resume=true" (not --resume in overrides)'
        )
    cfg, plain = build_fit_config(parser, ns)
    run_name = cfg.run_name or default_run_name(cfg)
    check_run_name(run_name)
    plain["run_name"] = run_name
    return cfg, plain, bool(ns.progress)


class FlowerFederation(RoundLoop):
    """fedclip's round loop with its client turns on the nodes of a Flower Grid.

    run_dir: where the CSV log (and W&B, when configured), config.yaml, partition,
    summary.json and the checkpoint go (None: nothing is written). The checkpoint has
    `fedclip fit`'s format: `fedclip export`, `fedclip evaluate` and `--resume` read it.
    `connect()` waits for the nodes and starts the loop.
    """

    def __init__(
        self,
        grid: Grid,
        cfg: FitConfig,
        plain: dict[str, Any],
        run_dir: Path | None,
        node_timeout: float = 600.0,
        connect_timeout: float = 120.0,
        show_progress: bool = True,
    ) -> None:
        check_config(cfg)
        self.cfg = cfg
        self.plain = plain
        self._run_dir = run_dir
        self._show_progress = show_progress
        fingerprint = config_fingerprint(plain)
        self.executor = FlowerExecutor(
            grid, plain, fingerprint, cfg.data.num_clients, node_timeout, connect_timeout
        )
        self._fingerprint = fingerprint

    def connect(self) -> None:
        """Wait for one node per client, ask each for its client, and start the loop with
        the initial shared state and schema the nodes report."""
        self.executor.connect()
        loggers = (
            make_loggers(self._run_dir, self.cfg, self.plain) if self._run_dir is not None else []
        )
        RoundLoop.__init__(
            self,
            self.cfg,
            self.executor,
            self._run_dir,
            self._fingerprint,
            loggers,
            self._show_progress,
        )

    def data_summary(self) -> dict[str, Any]:
        """`FederatedData.summary()` assembled from the nodes' answers."""
        return self.info.data_summary


def run_folder(cfg: FitConfig, plain: dict[str, Any], resume: bool) -> Path:
    """output_dir/run_name; refuses one that already holds a run unless resuming it, and a
    resume without a checkpoint or with a changed config."""
    run_dir = Path(cfg.output_dir) / plain["run_name"]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if resume:
        if not ckpt.is_file():
            raise FlowerSetupError(f"resume: no checkpoint at {ckpt}")
        check_resume(run_dir, plain)
    elif ckpt.exists() or (run_dir / "csv").exists() or (run_dir / "summary.json").exists():
        raise FlowerSetupError(
            f"run folder {run_dir} already holds a run; choose another run_name, or resume it "
            'with --run-config "resume=true"'
        )
    return run_dir


def _app_dir(grid: Grid) -> Path | None:
    """The folder the Flower App (FAB) was installed to, when Flower says."""
    try:
        from flwr.common.config import get_project_dir

        run = grid.run
        return get_project_dir(run.fab_id, run.fab_version, run.fab_hash)
    except Exception:  # noqa: BLE001 (an older or newer Flower: relative paths use the cwd)
        return None


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the fedclip config named by the run config on the connected nodes."""
    try:
        options = RunOptions.from_run_config(context.run_config)
        cfg, plain, show_progress = read_config(options, _app_dir(grid))
        run_dir = run_folder(cfg, plain, options.resume)
        fed = FlowerFederation(
            grid, cfg, plain, run_dir, options.node_timeout, options.connect_timeout, show_progress
        )
        fed.connect()
        if options.resume:
            fed.load(run_dir / "checkpoints" / "last.ckpt")
    except FedclipError as e:  # set-up: one line and a non-zero status
        log(ERROR, "fedclip: %s", one_line(str(e)))
        raise SystemExit(2) from None
    run_dir.mkdir(parents=True, exist_ok=True)
    start_run_folder(run_dir, plain, fed.data_summary())  # stale temp files of a kill go first
    done_before = options.resume and fed.partial is None and fed.round >= cfg.federation.rounds
    try:
        fed.fit(resume=options.resume)
    except FederationError as e:
        write_results(fed, run_dir)  # summary.json's `stopped` says why, with the failures
        fed.close(1)
        log(ERROR, "fedclip: stopped: %s; the round so far is in %s", one_line(str(e)), run_dir)
        raise SystemExit(1) from None
    except BaseException:
        fed.close(1)  # a bug: the loggers are closed, the traceback kept
        raise
    write_results(fed, run_dir)
    if fed.stopped_by is not None:
        fed.close(128 + fed.stopped_by)
        log(
            WARNING,
            "fedclip: stopped by signal %d after a checkpoint in %s",
            fed.stopped_by,
            run_dir,
        )
        return
    fed.close(0)
    if done_before:
        log(INFO, "fedclip: %s had finished: nothing trained, results rewritten", run_dir)
    if show_progress:
        print_table(fed, f"{plain['run_name']}: round {fed.round}")
    log(INFO, "fedclip: run folder %s", run_dir)
