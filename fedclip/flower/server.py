"""The ServerApp: fedclip's round loop over a Flower Grid, each client's turn on its node.

It does what `Federation.fit` does with the same helpers (`sample_clients`, `close_round`,
`eval_metrics`, `run_summary`, ...): the same seeded client sampling, the strategy's
per-client payloads, upload checks, aggregation, differential privacy, failure limits,
per-round metrics named as in `fedclip fit`, the CSV log, summary.json and the round lines.
It never sees a sample: it learns each client's initial state, schema, sample counts and
class names from the nodes' answers to a set-up query, and maps Flower node ids to fedclip
client ids by the `client-id` each node reports.

A node that answers with an error, or not within `node-timeout` seconds, counts as a failed
client of that round (left out of the aggregation, as in `fedclip fit`). A client missing
from an evaluation is left out of that evaluation's metrics, with a warning.

Run config keys (flower_app/pyproject.toml, `flwr run ... --run-config`): `config` (the
fedclip YAML; a relative path is looked up in the ServerApp's working directory, then in the
Flower App folder), `overrides` (`fedclip fit` flags, e.g. "--federation.rounds=2"),
`node-timeout` and `connect-timeout` (seconds).
"""

from __future__ import annotations

import math
import re
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.loggers import CSVLogger

from fedclip.checkpoint import save_atomic, write_text_atomic
from fedclip.config import (
    FitConfig,
    build_fit_config,
    check_config_files,
    check_run_name,
    default_run_name,
    fit_parser,
)
from fedclip.errors import FlowerSetupError
from fedclip.federation import (
    FederationError,
    check_config,
    check_failures,
    close_round,
    commit_outcome,
    config_fingerprint,
    eval_metrics,
    failure_reason,
    new_turn,
    run_summary,
    sample_clients,
)
from fedclip.flower._flwr import (
    Context,
    Grid,
    Message,
    MessageType,
    RecordDict,
    ServerApp,
    log,
)
from fedclip.flower.records import (
    header_record,
    put_payload,
    read_describe,
    read_eval,
    read_turn,
)
from fedclip.privacy import DifferentialPrivacy
from fedclip.progress import Progress
from fedclip.report import print_table, write_partition, write_results
from fedclip.strategies.base import UploadError

POLL_S = 0.2  # between pulls of replies (Grid.send_and_receive waits 3 s between pulls)


@dataclass
class RunOptions:
    """The ServerApp's run config.

    Args:
        config: the fedclip YAML.
        overrides: `fedclip fit` flags applied after it ("--seed=1 --federation.rounds=2").
        node_timeout: seconds a node may take to answer one message.
        connect_timeout: seconds to wait until one node per client is connected.
    """

    config: str
    overrides: str = ""
    node_timeout: float = 600.0
    connect_timeout: float = 120.0

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
            "--resume: the Flower backend cannot resume a run (its clients' personal state "
            "lived on the nodes); start a new run"
        )
    cfg, plain = build_fit_config(parser, ns)
    run_name = cfg.run_name or default_run_name(cfg)
    check_run_name(run_name)
    plain["run_name"] = run_name
    return cfg, plain, bool(ns.progress)


def check_node_count(nodes: int, num_clients: int) -> None:
    """One SuperNode per client, or FlowerSetupError."""
    if nodes != num_clients:
        raise FlowerSetupError(
            f"{nodes} node(s) connected, but the config has {num_clients} clients "
            "(data.num_clients): start one SuperNode per client"
        )


def map_clients(reported: Mapping[int, int], num_clients: int) -> dict[int, int]:
    """{client id: node id} from the client id each node reported ({node id: client id}).

    Every client 0..num_clients-1 needs exactly one node; anything else raises
    FlowerSetupError naming the nodes at fault."""
    check_node_count(len(reported), num_clients)
    nodes: dict[int, int] = {}
    for node, client in sorted(reported.items()):
        if not 0 <= client < num_clients:
            raise FlowerSetupError(
                f"node {node} reports client-id {client}, the config has clients 0 to "
                f"{num_clients - 1}"
            )
        if client in nodes:
            raise FlowerSetupError(
                f"nodes {nodes[client]} and {node} both report client-id {client}: give every "
                "SuperNode its own client-id"
            )
        nodes[client] = node
    return nodes


def flower_reason(reply: Message) -> str:
    """One line from a Flower error reply ("<class 'x.Error'>:<'text'>" -> "Error: text")."""
    reason = " ".join(str(reply.error.reason).split())
    match = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>", reason)
    return f"{match.group(1)}: {match.group(2)}" if match else reason


class FlowerFederation:
    """fedclip's round loop driving the nodes connected to a Flower Grid.

    run_dir: where the CSV log, config.yaml, partition, summary.json and the server's
    checkpoint go (None: nothing is written).
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
        self.grid = grid
        self.cfg = cfg
        self.plain = plain
        self.fingerprint = config_fingerprint(plain)
        self.run_dir = run_dir
        self.node_timeout = node_timeout
        self.connect_timeout = connect_timeout
        self.show_progress = show_progress
        self.num_clients = cfg.data.num_clients
        self.strategy = cfg.strategy
        self.privacy = DifferentialPrivacy(cfg.privacy, self.num_clients, cfg.seed)
        self.sampler = torch.Generator().manual_seed(cfg.seed)
        self.round = 0
        self.history: list[dict[str, float]] = []
        self.last_eval: dict[int, float] = {}
        self.failures: list[dict[str, Any]] = []
        self.experts: dict[int, list[int]] = {}  # pFedMoAP: what each client last reported
        self.nodes: dict[int, int] = {}  # client id -> node id
        self.info: dict[int, dict[str, Any]] = {}  # client id -> its node's set-up answer
        self.logger = CSVLogger(str(run_dir), name="", version="csv") if run_dir else None

    @property
    def metric(self) -> str:
        """The headline metric: 'acc', or 'map' for multi-label data."""
        return "map" if self.info[0]["multilabel"] else "acc"

    # ---- set-up --------------------------------------------------------------------------------
    def connect(self) -> None:
        """Wait for one node per client, ask each for its client, and initialise the
        strategy with the initial shared state and schema the nodes report."""
        end = time.monotonic() + self.connect_timeout
        while True:
            node_ids = sorted(self.grid.get_node_ids())
            if len(node_ids) >= self.num_clients or time.monotonic() > end:
                break
            time.sleep(1.0)
        check_node_count(len(node_ids), self.num_clients)
        log(INFO, "fedclip: %d nodes connected, asking for their clients", len(node_ids))
        header = header_record(self.plain, self.fingerprint, -1)
        replies = self._exchange(
            MessageType.QUERY,
            {n: RecordDict({"fedclip": header}) for n in node_ids},
            -1,
            by_node=True,
        )
        infos = {}
        for node in node_ids:
            reply = replies[node]
            if reply is None:
                raise FlowerSetupError(
                    f"node {node} did not answer the set-up query within {self.node_timeout:g} s"
                )
            if reply.has_error():
                raise FlowerSetupError(f"node {node}: {flower_reason(reply)}")
            infos[node] = read_describe(reply.content)
        self.nodes = map_clients({n: int(i["client"]) for n, i in infos.items()}, self.num_clients)
        self.info = {k: infos[node] for k, node in self.nodes.items()}
        first = self.info[0]
        for k, info in self.info.items():
            for key in ("classnames", "schema", "multilabel", "base_to_novel"):
                if info[key] != first[key]:
                    raise FlowerSetupError(
                        f"client {k} (node {self.nodes[k]}) differs from client 0 in {key}: "
                        "every site needs the same classes and the same fedclip version"
                    )
        # what `Strategy.initialize` needs of the schema is each tensor's shape and dtype
        schema = {
            name: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
            for name, (shape, dtype) in first["schema"].items()
        }
        self.strategy.initialize(first["initial"], self.num_clients, self.cfg.seed, schema=schema)
        log(INFO, "fedclip: clients on nodes %s", {k: self.nodes[k] for k in sorted(self.nodes)})

    def data_summary(self) -> dict[str, Any]:
        """`FederatedData.summary()` assembled from the nodes' answers."""
        first, ks = self.info[0], sorted(self.info)
        return {
            "dataset": first["dataset"],
            "partitioner": first["partitioner"],
            "seed": self.cfg.seed,
            "classnames": first["classnames"],
            "clients": [self.info[k]["row"] for k in ks],
            "train_counts": [self.info[k]["train_counts"] for k in ks],
            "test_counts": [self.info[k]["test_counts"] for k in ks],
        }

    # ---- messages ------------------------------------------------------------------------------
    def _exchange(
        self, kind: str, contents: dict[int, RecordDict], rnd: int, by_node: bool = False
    ) -> dict[int, Message | None]:
        """Send every message at once; the replies by client id (by node id with `by_node`),
        None for those that did not come within `node_timeout`."""
        node_of = (lambda n: n) if by_node else self.nodes.__getitem__
        key_of = {node_of(k): k for k in contents}
        messages = [
            Message(content, node_of(k), kind, ttl=self.node_timeout, group_id=str(rnd + 1))
            for k, content in contents.items()
        ]
        waiting = {mid for mid in self.grid.push_messages(messages) if mid}
        replies: dict[int, Message] = {}
        end = time.monotonic() + self.node_timeout
        while waiting and time.monotonic() < end:
            for reply in self.grid.pull_messages(list(waiting)):
                waiting.discard(reply.metadata.reply_to_message_id)
                if reply.metadata.src_node_id in key_of:
                    replies[key_of[reply.metadata.src_node_id]] = reply
            if waiting:
                time.sleep(POLL_S)
        return {k: replies.get(k) for k in contents}

    def _message(self, rnd: int, payload: Any) -> RecordDict:
        content = RecordDict({"fedclip": header_record(self.plain, self.fingerprint, rnd)})
        put_payload(content, payload)
        return content

    # ---- one round -----------------------------------------------------------------------------
    def _turn(self, k: int, reply: Message | None) -> tuple[dict[str, Any], str | None]:
        """Client k's turn record from its node's reply, and None or why it failed."""
        failed: dict[str, Any] = {"metrics": {}, "loss": math.nan}
        if reply is None:
            return failed, f"no reply from node {self.nodes[k]} within {self.node_timeout:g} s"
        if reply.has_error():
            return failed, f"node {self.nodes[k]}: {flower_reason(reply)}"
        out, error, experts = read_turn(reply.content)
        if experts is not None:
            self.experts[k] = experts
        if error is None and "result" in out:
            try:  # a node is not trusted to have checked its own upload
                self.strategy.validate_upload(out["result"]["state"])
            except UploadError as e:
                out.pop("result")
                out.pop("up", None)
                out["loss"] = math.nan
                error = failure_reason(e)
        return out, error

    def run_round(self, rnd: int, progress: Progress) -> dict[str, float]:
        """Round `rnd` (0-based): train the sampled clients on their nodes, aggregate,
        evaluate when due; returns the round's metrics."""
        t0 = time.perf_counter()
        sampled = sample_clients(self.sampler, self.num_clients, self.cfg.federation.fraction)
        turn = new_turn(rnd, sampled)
        payloads = self.strategy.configure_round(rnd, sampled)
        progress.start_clients(rnd, len(sampled))
        contents = {k: self._message(rnd, payloads.get(k)) for k in sampled}
        replies = self._exchange(MessageType.TRAIN, contents, rnd)
        for k in sampled:  # in sampling order, as the in-process loop commits them
            out, error = self._turn(k, replies[k])
            commit_outcome(k, out, turn)
            if error is not None:
                log(WARNING, "round %d: client %d failed and is left out: %s", rnd + 1, k, error)
                turn["failures"].append({"round": rnd + 1, "client": k, "reason": error})
            progress.client_done(k)
        check_failures(rnd, turn, self.cfg.federation.max_client_failures)
        turn["elapsed"] = time.perf_counter() - t0
        metrics = close_round(
            self.strategy, self.privacy, self.cfg, rnd, turn, self.evaluation_metrics
        )
        self.failures.extend(turn["failures"])
        return metrics

    def evaluation_metrics(self, rnd: int) -> dict[str, float]:
        """Evaluate every client on its node with the strategy's evaluation payloads."""
        ids = list(range(self.num_clients))
        payloads = self.strategy.configure_evaluate(rnd, ids)
        contents = {k: self._message(rnd, payloads.get(k)) for k in ids}
        replies = self._exchange(MessageType.EVALUATE, contents, rnd)
        result = {}
        for k in ids:
            reply = replies[k]
            if reply is None or reply.has_error():
                why = "no reply" if reply is None else flower_reason(reply)
                log(WARNING, "evaluation %d: client %d left out: %s", rnd + 1, k, why)
                continue
            result[k], experts = read_eval(reply.content)
            if experts is not None:
                self.experts[k] = experts
        first = self.info[0]
        counts = {k: int(self.info[k]["num_test"]) for k in ids}
        metrics = eval_metrics(
            result, first["multilabel"], first["base_to_novel"], counts, first["classnames"]
        )
        self.last_eval = {k: metrics[f"client/{k}/{self.metric}"] for k in result}
        return metrics

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self) -> list[dict[str, float]]:
        """Every round, logged and checkpointed (server state only) after each."""
        fed = self.cfg.federation
        if fed.eval_at_start:
            row = {"round": 0.0, **self.evaluation_metrics(-1)}
            self.history.append(row)
            self._log(row, 0)
        with Progress(fed.rounds, enabled=self.show_progress) as progress:
            for rnd in range(fed.rounds):
                try:
                    metrics = self.run_round(rnd, progress)
                except FederationError:
                    self.save()  # the rounds so far
                    raise
                self.round = rnd + 1
                self.history.append(metrics)
                self._log(metrics, self.round)
                progress.round_done(metrics)
                self.save()
        return self.history

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=step)
            self.logger.save()

    # ---- results -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The server's state: the strategy (global state, pFedMoAP's pool), sampler,
        privacy accounting, history. The clients' personal state stays on the nodes."""
        return {
            "format": "fedclip-flower-server",
            "fingerprint": self.fingerprint,
            "round": self.round,
            "strategy": self.strategy.state_dict(),
            "sampler": self.sampler.get_state(),
            "history": self.history,
            "failures": self.failures,
            "privacy": self.privacy.state_dict(),
        }

    def save(self) -> None:
        if self.run_dir is not None:
            save_atomic(self.state_dict(), self.run_dir / "checkpoints" / "server.ckpt")

    def summary(self) -> dict[str, Any]:
        return run_summary(
            self.cfg,
            self.data_summary(),
            self.history,
            self.last_eval,
            self.experts,
            self.round,
            self.failures,
            self.privacy,
            self.metric,
        )


def run_folder(cfg: FitConfig, plain: dict[str, Any]) -> Path:
    """output_dir/run_name; refuses one that already holds a run."""
    run_dir = Path(cfg.output_dir) / plain["run_name"]
    if (run_dir / "csv").exists() or (run_dir / "summary.json").exists():
        raise FlowerSetupError(f"run folder {run_dir} already holds a run; choose another run_name")
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
    options = RunOptions.from_run_config(context.run_config)
    cfg, plain, show_progress = read_config(options, _app_dir(grid))
    run_dir = run_folder(cfg, plain)
    fed = FlowerFederation(
        grid, cfg, plain, run_dir, options.node_timeout, options.connect_timeout, show_progress
    )
    fed.connect()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(plain, sort_keys=False))
    write_partition(fed.data_summary(), run_dir)
    fed.fit()
    write_results(fed, run_dir)
    if show_progress:
        print_table(fed, f"{plain['run_name']}: round {fed.round}")
    log(INFO, "fedclip: run folder %s", run_dir)
