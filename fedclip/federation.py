"""Federation: the round loop, driven by Lightning Fabric.

One process simulates every client one after another on its device: sample clients,
download, local epochs, upload, aggregate, evaluate, log, checkpoint. Everything random is
drawn from generators seeded by the config's seed (client sampling state is checkpointed;
each client's turn runs under its own RNG seeded by (seed, round, client)), so a resumed
run reaches the same state as an uninterrupted one.

Several devices or nodes (`fabric.devices`, `fabric.num_nodes`): every rank builds the same
federation; each round's sampled clients are split among the ranks (balanced by training
samples), each rank trains its share on its device, and the outcomes (uploads, metrics,
failures, the trained clients' personal state) are exchanged with Fabric broadcasts, so
every rank aggregates the same uploads in the same order and holds every client's state.
Evaluation is split the same way. Only rank 0 logs and writes checkpoints. No module is
wrapped in DDP: clients differ. The result equals the one-process run bit for bit.

Reliability: a client whose local work raises or whose loss is not finite is rolled back
and left out of the round's aggregation (logged with its id and reason); its upload, like
every upload, is validated before aggregation. The run stops only when more clients fail
in one round than `federation.max_client_failures` allows. SIGINT/SIGTERM stop the run at
the next safe point, between two optimiser steps, after writing a checkpoint that holds the
round so far (with several ranks: at the end of the round, agreed by all ranks); `--resume`
continues it to the same final state.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger
from lightning.fabric.utilities.seed import seed_everything
from torch import Tensor

from fedclip.backbone import load_backbone
from fedclip.checkpoint import FORMAT, VERSION, CheckpointError, load_checkpoint, save_atomic
from fedclip.client import ClientModule
from fedclip.config import FitConfig
from fedclip.data.federated import FederatedData
from fedclip.errors import ClientFailure, FederationError
from fedclip.interrupt import GracefulStop
from fedclip.metrics import (
    base_to_novel_metrics,
    client_metric,
    multilabel_metrics,
    summarize,
)
from fedclip.privacy import DifferentialPrivacy, check_strategy, update_norm
from fedclip.progress import Progress
from fedclip.strategies.base import ClientResult, Payload, Strategy
from fedclip.sweeps import wandb_logger_kwargs

log = logging.getLogger(__name__)
# On resume the CSV logger starts its file anew and the checkpointed history is replayed
# into it, so its warning about replacing the old file does not apply.
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")


class _Stopped(Exception):
    """A stop request (SIGINT/SIGTERM) interrupted the round."""


def failure_reason(error: BaseException) -> str:
    """One line naming a client's failure: 'ExceptionType: message' (at most 300 chars)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:300] if text else type(error).__name__


def to_cpu(obj: Any) -> Any:
    """Nested dicts/lists with every tensor moved to the CPU (what ranks exchange)."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def assign_clients(clients: list[int], weights: dict[int, int], ranks: int) -> dict[int, int]:
    """Owner rank of every client: heaviest first to the least loaded rank (ties: lowest
    rank), so ranks finish a round at about the same time. Deterministic."""
    load = [0] * ranks
    owner = {}
    for k in sorted(clients, key=lambda c: (-weights[c], c)):
        r = min(range(ranks), key=lambda i: (load[i], i))
        owner[k] = r
        load[r] += max(weights[k], 1)
    return owner


def turn_seed(seed: int, rnd: int, client: int) -> int:
    """Seed of client `client`'s turn in round `rnd` (dropout, augmentation)."""
    return int(np.random.SeedSequence([seed, rnd, client, 7]).generate_state(1)[0])


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside nested dicts/lists/Payloads."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Payload):
        return tensor_bytes(obj.state) + tensor_bytes(obj.extras)
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# Keys that may change between a run and its resume: they do not change what is computed.
RESUMABLE_KEYS = {
    "federation": ("rounds", "eval_every", "max_client_failures"),
    "fabric": ("devices", "num_nodes"),  # any number of ranks computes the same result
}


def without_resumable(config: dict[str, Any]) -> dict[str, Any]:
    """A plain config without the RESUMABLE_KEYS (the sections are copied, not changed)."""
    core = dict(config)
    for section, keys in RESUMABLE_KEYS.items():
        core[section] = {k: v for k, v in (core.get(section) or {}).items() if k not in keys}
    return core


def config_fingerprint(config: dict[str, Any]) -> str:
    """Hash of what defines the computation (not where it is logged or how long it runs)."""
    volatile = {"output_dir", "run_name", "logger", "config", "resume", "__path__"}
    core = without_resumable({k: v for k, v in config.items() if k not in volatile})
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_config(cfg: FitConfig) -> None:
    """Raise ValueError for a config no federation can run (checked before anything loads)."""
    fed = cfg.federation
    if fed.rounds < 1:
        raise ValueError(f"federation.rounds must be >= 1, got {fed.rounds}")
    if not 0.0 < fed.fraction <= 1.0:
        raise ValueError(f"federation.fraction must be in (0, 1], got {fed.fraction}")
    if fed.local_epochs < 1:
        raise ValueError(f"federation.local_epochs must be >= 1, got {fed.local_epochs}")
    if fed.eval_every < 1:
        raise ValueError(f"federation.eval_every must be >= 1, got {fed.eval_every}")
    if fed.max_client_failures is not None and fed.max_client_failures < 0:
        raise ValueError(
            f"federation.max_client_failures must be >= 0 or null, got {fed.max_client_failures}"
        )
    if cfg.fabric.devices < 1 or cfg.fabric.num_nodes < 1:
        raise ValueError(
            f"fabric.devices and fabric.num_nodes must be >= 1, got {cfg.fabric.devices} "
            f"and {cfg.fabric.num_nodes}"
        )
    cfg.strategy.check_learner(cfg.learner)
    check_strategy(cfg.privacy, cfg.strategy)


# ---- one round's bookkeeping, shared with the Flower server (fedclip.flower.server) ------------
def sample_clients(sampler: torch.Generator, num_clients: int, fraction: float) -> list[int]:
    """The round's clients: max(1, round(fraction * num_clients)) of them, drawn from
    `sampler` (advanced), sorted."""
    m = max(1, round(fraction * num_clients))
    return sorted(torch.randperm(num_clients, generator=sampler)[:m].tolist())


def new_turn(rnd: int, sampled: list[int]) -> dict[str, Any]:
    """The empty record of round `rnd` that client outcomes are committed to."""
    return {
        "round": rnd, "sampled": sampled, "done": [], "results": {}, "losses": {},
        "failures": [], "metrics": {}, "released": [], "down": 0, "up": 0, "elapsed": 0.0,
    }  # fmt: skip


def commit_outcome(k: int, out: dict[str, Any], turn: dict[str, Any]) -> None:
    """Record client k's turn `out` (see `Federation.client_turn`) in the round record."""
    turn["down"] += out.get("down", 0)
    turn["up"] += out.get("up", 0)
    turn["metrics"].update(out["metrics"])
    if out.get("released"):
        turn["released"].append(k)
    if "result" in out:
        turn["results"][k] = out["result"]
    turn["losses"][k] = out.get("loss", float("nan"))
    turn["done"].append(k)


def check_failures(rnd: int, turn: dict[str, Any], limit: int | None) -> None:
    """Raise FederationError when the round's failures exceed `limit`
    (federation.max_client_failures; None: when every sampled client failed)."""
    failed = len(turn["failures"])
    if (limit is not None and failed > limit) or (
        limit is None and failed and failed == len(turn["sampled"])
    ):
        allowed = (
            "every sampled client failed"
            if limit is None
            else (f"{failed} clients failed, more than federation.max_client_failures={limit}")
        )
        last = turn["failures"][-1]
        raise FederationError(
            f"round {rnd + 1}: {allowed}; last: client {last['client']}, {last['reason']}"
        )


def finish_round(
    strategy: Strategy, privacy: DifferentialPrivacy, rnd: int, turn: dict[str, Any]
) -> dict[str, float]:
    """Aggregate the round's uploads (in client order), add central DP noise, account the
    privacy spent, and return the round's metrics before evaluation: `round`, `privacy/*`,
    `train/*`, `client/K/*`, `server/*` and `traffic/*`. Updates `strategy` and `privacy`."""
    results = {
        k: ClientResult(k, r["state"], r["num_samples"], r["metrics"])
        for k, r in sorted(turn["results"].items())
    }
    _, agg_metrics = strategy.aggregate(rnd, results)
    metrics: dict[str, float] = {"round": float(rnd + 1)}
    if privacy.enabled:
        if results and privacy.cfg.mode == "central":
            keys = sorted({n for r in results.values() for n in r.state})
            strategy.global_state = privacy.noise_aggregate(
                strategy.global_state, keys, len(results), rnd
            )
        # every client whose private upload left it counts, accepted or not
        metrics.update(privacy.account(rnd, sorted(turn["released"]), len(turn["sampled"])))
    losses = turn["losses"]
    finite = [v for v in losses.values() if not math.isnan(v)]
    metrics["train/loss_mean"] = sum(finite) / len(finite) if finite else float("nan")
    metrics.update({f"client/{k}/train_loss": v for k, v in losses.items()})
    metrics.update(turn["metrics"])
    metrics.update({f"server/{k}": v for k, v in agg_metrics.items()})
    metrics["train/failed_clients"] = float(len(turn["failures"]))
    metrics.update({f"client/{f['client']}/failed": 1.0 for f in turn["failures"]})
    metrics["traffic/down_bytes"] = float(turn["down"])
    metrics["traffic/up_bytes"] = float(turn["up"])
    metrics["traffic/sampled_clients"] = float(len(turn["sampled"]))
    return metrics


def close_round(
    strategy: Strategy,
    privacy: DifferentialPrivacy,
    cfg: FitConfig,
    rnd: int,
    turn: dict[str, Any],
    evaluate: Callable[[int], dict[str, float]],
) -> dict[str, float]:
    """The round's metrics once its clients are done: `finish_round`, then `evaluate(rnd)`
    when an evaluation is due (every `eval_every` rounds and after the last), then
    `time/round_s` (the clients' time in turn["elapsed"] plus this)."""
    t0 = time.perf_counter()
    metrics = finish_round(strategy, privacy, rnd, turn)
    fed = cfg.federation
    if (rnd + 1) % fed.eval_every == 0 or rnd + 1 == fed.rounds:
        metrics.update(evaluate(rnd))
    metrics["time/round_s"] = turn["elapsed"] + time.perf_counter() - t0
    return metrics


def eval_metrics(
    result: dict[int, Any],
    multilabel: bool,
    base_to_novel: bool,
    test_counts: dict[int, int],
    classnames: list[str],
) -> dict[str, float]:
    """The logged evaluation metrics of {client: `Federation.evaluate_one` result}.

    test_counts: each client's test-sample count (weights of `eval/acc_weighted`);
    classnames: every class's name (multi-label per-class AP)."""
    if multilabel:
        return multilabel_metrics(result, classnames)
    if base_to_novel:
        return base_to_novel_metrics(result)
    s = summarize(result, {k: test_counts[k] for k in result})
    metrics = {f"eval/acc_{name}": v for name, v in s.items()}
    metrics.update({f"client/{k}/acc": v for k, v in result.items()})
    return metrics


def run_summary(
    cfg: FitConfig,
    data_summary: dict[str, Any],
    history: list[dict[str, float]],
    last_eval: dict[int, float],
    experts: dict[int, list[int]],
    rounds_completed: int,
    failures: list[dict[str, Any]],
    privacy: DifferentialPrivacy,
    metric: str,
) -> dict[str, Any]:
    """A run's summary.json: per-client partition counts with their last evaluation (and,
    for pFedMoAP, the `experts` each client holds), final metrics, traffic and config.

    data_summary: `FederatedData.summary()`; last_eval: each client's headline metric."""
    part = copy.deepcopy(data_summary)
    for row in part["clients"]:
        row[metric] = last_eval.get(row["client"], float("nan"))
        if row["client"] in experts:
            row["experts"] = list(experts[row["client"]])
    final = history[-1] if history else {}
    total_up = sum(r.get("traffic/up_bytes", 0.0) for r in history)
    total_down = sum(r.get("traffic/down_bytes", 0.0) for r in history)
    source = cfg.data.dataset
    return {
        "rounds_completed": rounds_completed,
        "clients": part["clients"],
        "eval": {k: v for k, v in final.items() if k.startswith("eval/")},
        "per_class_ap": {
            k[len("class/") : -len("/ap")]: v
            for k, v in final.items()
            if k.startswith("class/") and k.endswith("/ap")
        },
        "traffic": {"up_bytes": total_up, "down_bytes": total_down},
        "partition": {"train_counts": part["train_counts"], "test_counts": part["test_counts"]},
        "config": {
            "learner": type(cfg.learner).__name__,
            "strategy": type(cfg.strategy).__name__,
            "dataset": getattr(source, "name", type(source).__name__),
            "backbone": cfg.backbone.model,
        },
        "optim": asdict(cfg.optim),
        "metric": metric,
        "failures": failures,
        "privacy": {
            **asdict(privacy.cfg),
            "epsilon": final.get("privacy/epsilon") if privacy.enabled else None,
        },
    }


class Federation:
    """Builds the backbone, data, clients and strategy of a `FitConfig`, then runs rounds.

    run_dir: where metrics, checkpoints and the summary go (None: nothing is written).
    config_dict: the resolved config as plain data (saved fingerprint for resume checks).
    """

    def __init__(
        self,
        cfg: FitConfig,
        run_dir: str | Path | None = None,
        config_dict: dict[str, Any] | None = None,
        show_progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.fingerprint = config_fingerprint(config_dict or {})
        self.show_progress = show_progress
        check_config(cfg)

        loggers = []
        if self.run_dir is not None:
            loggers.append(CSVLogger(root_dir=str(self.run_dir), name="", version="csv"))
            if cfg.logger.wandb:
                loggers.append(self._wandb_logger())
        # data and backbone first, in the launching process: bad input fails here with one
        # line, and downloads and caches are made once before the other ranks start
        seed_everything(cfg.seed, verbose=False)
        self.data = FederatedData(cfg.data, cfg.seed)  # data errors before the model loads
        self.clip = load_backbone(cfg.backbone)
        ranks = cfg.fabric.devices * cfg.fabric.num_nodes
        self.fabric = Fabric(
            accelerator=cfg.fabric.accelerator,
            devices=cfg.fabric.devices,
            num_nodes=cfg.fabric.num_nodes,
            # several ranks: one process per device and collectives between them; the
            # modules are never wrapped (clients differ), so plain DDP setup suffices
            strategy="ddp" if ranks > 1 else "auto",
            precision=cfg.fabric.precision,
            loggers=loggers,
        )
        if ranks > 1:
            # starts the other local ranks (they run the same command) unless a launcher
            # such as torchrun or SLURM already did
            self.fabric.launch()
        self.world_size = self.fabric.world_size
        self.rank = self.fabric.global_rank
        self.show_progress = show_progress and self.rank == 0
        self.clip.to(self.fabric.device)
        self.classnames = self.data.classnames
        learner_cls = type(cfg.learner)
        self.data.bind(self.clip, learner_cls.inputs)

        self.clients = [self._make_client(k) for k in range(self.data.num_clients)]
        self.strategy = cfg.strategy
        self.strategy.initialize(
            self.clients[0].upload(),
            self.data.num_clients,
            cfg.seed,
            schema=dict(self.clients[0].learner.named_parameters()),
        )
        self.privacy = DifferentialPrivacy(cfg.privacy, self.data.num_clients, cfg.seed)
        self.sampler = torch.Generator().manual_seed(cfg.seed)
        self.round = 0  # rounds completed
        self.history: list[dict[str, float]] = []
        self.last_eval: dict[int, float] = {}
        self.failures: list[dict[str, Any]] = []  # {"round", "client", "reason"} of every failure
        self.partial: dict[str, Any] | None = None  # the round in progress (checkpointed on stop)
        self.stopped_by: int | None = None  # the signal that stopped the last fit(), if any
        self._stop: GracefulStop | None = None
        self.loaded = False  # state loaded from a checkpoint

    @property
    def metric(self) -> str:
        """The headline metric: 'acc', or 'map' for multi-label data."""
        return "map" if self.data.multilabel else "acc"

    # ---- construction ------------------------------------------------------------------
    def _make_client(self, k: int) -> ClientModule:
        learner = copy.deepcopy(self.cfg.learner)  # the config's instance is never set up
        learner.set_task(self.data.multilabel, self.cfg.multilabel)
        learner.setup(self.clip, self.classnames, self.cfg.seed)
        steps = self.cfg.federation.local_epochs * self.data.steps_per_epoch(k)
        client = ClientModule(
            k,
            learner,
            self.clip,
            self.cfg.optim,
            self.data.num_train(k),
            steps,
            self.cfg.federation.rounds,
        )
        return client.to(self.fabric.device)

    def _wandb_logger(self):
        from lightning.pytorch.loggers import WandbLogger

        # the run id derives from the run folder, or, under a W&B sweep, is the agent's
        return WandbLogger(**wandb_logger_kwargs(self.run_dir, self.cfg.logger))

    # ---- one round -----------------------------------------------------------------------
    def sample_clients(self) -> list[int]:
        return sample_clients(self.sampler, self.data.num_clients, self.cfg.federation.fraction)

    def fit_client(self, k: int, rnd: int) -> float:
        """Local epochs of client k in round rnd; returns the mean training loss."""
        client = self.clients[k]
        if not client.learner.has_trainable() or self.data.num_train(k) == 0:
            return float("nan")
        client.train()
        pairs = client.configure_optimizers()
        optimizers = [self.fabric.setup_optimizers(opt) for opt, _ in pairs]
        total, count = 0.0, 0
        for epoch in range(self.cfg.federation.local_epochs):
            shuffle_seed = int(
                np.random.SeedSequence([self.cfg.seed, rnd, k, epoch]).generate_state(1)[0]
            )
            for i, batch in enumerate(self.data.batches(k, "train", epoch_seed=shuffle_seed)):
                if self._stop_requested():
                    raise _Stopped
                batch = batch.to(self.fabric.device)
                with self.fabric.autocast():
                    loss = client.training_step(batch, i)
                if not torch.isfinite(loss):
                    raise ClientFailure(
                        f"non-finite loss {loss.item()} at epoch {epoch + 1}, step {i + 1}"
                    )
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                self.fabric.backward(loss)
                for opt, (_, sched) in zip(optimizers, pairs, strict=True):
                    opt.step()
                    sched.step()
                total += float(loss.detach()) * len(batch)
                count += len(batch)
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate_client(self, k: int) -> float:
        client = self.clients[k]
        client.eval()
        client.accuracy.reset()
        seen = 0
        for i, batch in enumerate(self.data.batches(k, "test")):
            batch = batch.to(self.fabric.device)
            with self.fabric.autocast():
                client.validation_step(batch, i)
            seen += len(batch)
        return float(client.accuracy.compute()) if seen else float("nan")

    @torch.no_grad()
    def predict_client(self, k: int, split: str = "test") -> tuple[Tensor, Tensor]:
        """Client k's logits (N, C) and labels or targets on `split`, on the CPU."""
        client = self.clients[k]
        client.eval()
        scores, labels = [], []
        for batch in self.data.batches(k, split):
            batch = batch.to(self.fabric.device)
            with self.fabric.autocast():
                scores.append(client(batch).float().cpu())
            labels.append(batch.labels.cpu())
        if not scores:
            n = len(self.data.all_classnames)
            return torch.zeros(0, n), torch.zeros(0, n)
        return torch.cat(scores), torch.cat(labels)

    @torch.no_grad()
    def evaluate_client_on(self, k: int, split: str, classes: list[int]) -> tuple[int, int]:
        """(correct, total) of client k on `split`, classifying among `classes` (ids)."""
        client, learner = self.clients[k], self.clients[k].learner
        client.eval()
        trained_on = learner.classnames
        names = self.data.split_classnames(split)
        learner.set_classes([names[c] for c in classes])
        remap = torch.full((len(names),), -1, dtype=torch.long)
        remap[torch.as_tensor(classes)] = torch.arange(len(classes))
        remap = remap.to(self.fabric.device)
        metric = client_metric(len(classes)).to(self.fabric.device)
        total = 0
        try:
            for batch in self.data.batches(k, split):
                batch = batch.to(self.fabric.device)
                with self.fabric.autocast():
                    logits = client(batch)
                metric.update(logits.float(), remap[batch.labels])
                total += len(batch)
        finally:
            learner.set_classes(trained_on)
        correct = round(float(metric.compute()) * total) if total else 0
        return correct, total

    def evaluate(self, rnd: int) -> dict[int, float] | dict[int, dict[str, tuple[int, int]]]:
        """Each client's test accuracy; under base-to-novel, each client's (correct, total)
        on its local classes, on its share of the base and of the novel test images."""
        ids = list(range(self.data.num_clients))
        payloads = self.strategy.configure_evaluate(rnd, ids)
        for k in ids:  # on every rank, so that every rank keeps every client's state
            self.clients[k].receive(self.clients[k].wanted(payloads.get(k)))
        mine = ids
        if self.world_size > 1:
            weights = {k: len(self.data.test_parts[k]) for k in ids}
            owner = assign_clients(ids, weights, self.world_size)
            mine = [k for k in ids if owner[k] == self.rank]
        out = {k: self.evaluate_one(k) for k in mine}
        if self.world_size > 1:
            out = self._gather(out)
        return {k: out[k] for k in ids}

    def evaluate_one(self, k: int) -> Any:
        """Client k's evaluation with the state it holds: its accuracy; (logits, targets)
        for multi-label data; under base-to-novel, (correct, total) on its local classes
        and on its share of the base and of the novel test images."""
        if self.data.multilabel:
            return self.predict_client(k)
        if self.data.cfg.base_to_novel:
            base = list(range(self.data.num_base))
            novel = list(range(self.data.num_base, len(self.data.all_classnames)))
            return {
                "local": self.evaluate_client_on(k, "test", self.data.local_classes(k)),
                "base": self.evaluate_client_on(k, "base", base),
                "novel": self.evaluate_client_on(k, "novel", novel),
            }
        return self.evaluate_client(k)

    def _gather(self, mine: dict[int, Any]) -> dict[int, Any]:
        """Every rank's {client: value} merged, on every rank (one broadcast per rank)."""
        merged: dict[int, Any] = {}
        for src in range(self.world_size):
            merged.update(self.fabric.broadcast(to_cpu(mine) if src == self.rank else None, src))
        return merged

    def evaluate_transfer(self, name: str) -> dict[str, float]:
        """Accuracy of every client, with its evaluation payload, on its share of the
        transfer split `name`, among that data set's classes; pooled over clients as
        `transfer/NAME/acc` (the whole test set's accuracy for a shared model)."""
        ids = list(range(self.data.num_clients))
        payloads = self.strategy.configure_evaluate(self.round, ids)
        classes = list(range(len(self.data.split_classnames(name))))
        correct = total = 0
        metrics: dict[str, float] = {}
        for k in ids:
            self.clients[k].receive(self.clients[k].wanted(payloads.get(k)))
            c, t = self.evaluate_client_on(k, name, classes)
            correct, total = correct + c, total + t
            metrics[f"transfer/{name}/client/{k}/acc"] = c / t if t else float("nan")
        metrics[f"transfer/{name}/acc"] = correct / total if total else float("nan")
        return metrics

    def evaluation_metrics(self, rnd: int) -> dict[str, float]:
        """Evaluate every client and return the logged metrics (keeps each client's
        accuracy for the summary table)."""
        metrics = self._eval_metrics(self.evaluate(rnd))
        self.last_eval = {
            k: metrics[f"client/{k}/{self.metric}"] for k in range(self.data.num_clients)
        }
        return metrics

    def _eval_metrics(self, result: dict) -> dict[str, float]:
        counts = {k: len(self.data.test_parts[k]) for k in result}
        return eval_metrics(
            result,
            self.data.multilabel,
            self.data.cfg.base_to_novel,
            counts,
            self.data.all_classnames,
        )

    def _stop_requested(self) -> bool:
        # with several ranks a stop waits for the end of the round (all ranks agree then)
        return self.world_size == 1 and self._stop is not None and self._stop.requested is not None

    def _load_client(self, k: int, state: dict[str, Any]) -> None:
        """Replace client k's personal state (learner, optimizers, schedulers)."""
        client = self.clients[k]
        client.optimizer_pairs = None  # built anew for the state's trainable set
        client.load_client_state(state)

    @contextlib.contextmanager
    def _client_rng(self, rnd: int, k: int):
        """Client k's own RNG for its turn of round rnd: what it draws (dropout,
        augmentation) depends neither on the clients before it nor on the rank it runs on."""
        device = self.fabric.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(turn_seed(self.cfg.seed, rnd, k))
            yield

    def client_turn(
        self, k: int, rnd: int, payload: Payload | None
    ) -> tuple[dict[str, Any], BaseException | None]:
        """Run client k's turn of round rnd: download, local training, checked upload.

        Returns what it did (`down`/`up` bytes, `loss`, `metrics`, `released`, and `result`:
        the upload with its sample count) and None, or, when its work failed, what it did
        without the upload and the error: the client is then rolled back to its state before
        the turn. A stop request rolls it back too and raises `_Stopped`.
        """
        snapshot = copy.deepcopy(self.clients[k].client_state())
        out: dict[str, Any] = {"metrics": {}}
        try:
            with self._client_rng(rnd, k):
                self._client_turn(k, rnd, payload, out)
        except _Stopped:
            self._load_client(k, snapshot)  # it runs again on resume
            raise
        except Exception as e:  # noqa: BLE001 (any client error drops the client)
            self._load_client(k, snapshot)
            if self._stop_requested():  # e.g. a data worker hit by the signal
                raise _Stopped from e
            out.pop("result", None)
            out.pop("up", None)
            out["loss"] = float("nan")
            return out, e
        return out, None

    def _client_turn(self, k: int, rnd: int, payload: Payload | None, out: dict) -> None:
        """Client k's part of round rnd: download, local training, checked upload. What it
        did is recorded in `out` (down/up bytes, loss, result, metrics, released)."""
        client = self.clients[k]
        payload = client.wanted(payload)
        client.receive(payload)
        out["down"] = tensor_bytes(payload) if payload is not None else 0
        # the update is measured against what the client starts from (the download, for
        # the keys it downloaded)
        reference = {n: v.detach().cpu().clone() for n, v in client.learner.shared_state().items()}
        loss = self.fit_client(k, rnd)
        out["loss"] = loss
        if self.strategy.collects_uploads:
            state = self.strategy.validate_upload(client.upload(), client.learner.shared_keys())
            if self.privacy.enabled:
                state, dp_metrics = self.privacy.privatize_upload(state, reference, rnd, k)
                out["metrics"].update({f"client/{k}/{n}": v for n, v in dp_metrics.items()})
                out["released"] = True  # sent, even if the server then rejects it
                self.strategy.validate_upload(state)  # what actually left the client
            else:
                update = {n: state[n] - reference[n] for n in state if n in reference}
                out["metrics"][f"client/{k}/update_norm"] = update_norm(update)
            out["up"] = tensor_bytes(state)
            out["result"] = {
                "state": state,
                "num_samples": self.data.num_train(k),
                "metrics": {"loss": loss},
            }
        if client.learner.end_of_round(loss):
            client.optimizer_pairs = None  # a new trainable set: fresh optimizers

    _commit = staticmethod(commit_outcome)

    def _fail(self, k: int, rnd: int, reason: str, turn: dict) -> None:
        if self.rank == 0:
            log.warning("round %d: client %d failed and is left out: %s", rnd + 1, k, reason)
        turn["failures"].append({"round": rnd + 1, "client": k, "reason": reason})

    def _check_failures(self, rnd: int, turn: dict) -> None:
        """Raise FederationError when the round's failures exceed what the config allows."""
        check_failures(rnd, turn, self.cfg.federation.max_client_failures)

    def _run_here(self, rnd: int, turn: dict, payloads: dict, progress: Progress) -> None:
        """The round's clients, one after another in this process."""
        for k in turn["sampled"]:
            if k not in turn["done"]:
                if self._stop_requested():
                    raise _Stopped
                out, error = self.client_turn(k, rnd, payloads.get(k))
                self._commit(k, out, turn)
                if error is not None:
                    self._fail(k, rnd, failure_reason(error), turn)
                    self._check_failures(rnd, turn)
            progress.client_done(k)

    def _run_distributed(self, rnd: int, turn: dict, payloads: dict, progress: Progress) -> None:
        """The round's clients split among the ranks; every rank ends with every outcome
        and every trained client's personal state."""
        todo = [k for k in turn["sampled"] if k not in turn["done"]]
        weights = {k: self.data.num_train(k) for k in todo}
        owner = assign_clients(todo, weights, self.world_size)
        mine: dict[int, dict[str, Any]] = {}
        for k in todo:
            if owner[k] == self.rank:
                out, error = self.client_turn(k, rnd, payloads.get(k))
                if error is not None:
                    out["error"] = failure_reason(error)
                else:  # what it downloaded and learnt, for the other ranks' copies
                    out["client_state"] = self.clients[k].client_state()
                mine[k] = out
        outcomes = self._gather(mine)
        for k in todo:  # in sampling order on every rank: identical round records
            out = outcomes[k]
            state = out.pop("client_state", None)
            if state is not None and owner[k] != self.rank:
                self._load_client(k, state)
            error = out.pop("error", None)
            self._commit(k, out, turn)
            if error is not None:
                self._fail(k, rnd, error, turn)
            progress.client_done(k)
        self._check_failures(rnd, turn)

    def run_round(self, rnd: int, progress: Progress) -> dict[str, float]:
        """One round; resumes the checkpointed part of round rnd when there is one."""
        t0 = time.perf_counter()
        turn = self.partial if self.partial is not None and self.partial["round"] == rnd else None
        if turn is None:
            turn = new_turn(rnd, self.sample_clients())
        self.partial = turn
        sampled = turn["sampled"]
        payloads = self.strategy.configure_round(rnd, sampled)
        progress.start_clients(rnd, len(sampled))
        try:
            if self.world_size == 1:
                self._run_here(rnd, turn, payloads, progress)
            else:
                self._run_distributed(rnd, turn, payloads, progress)
        finally:
            turn["elapsed"] += time.perf_counter() - t0
        metrics = close_round(
            self.strategy, self.privacy, self.cfg, rnd, turn, self.evaluation_metrics
        )
        self.failures.extend(turn["failures"])
        self.partial = None
        return metrics

    # ---- the loop ----------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_after: int | None = None) -> list[dict[str, float]]:
        """Run the remaining rounds (all of them, or up to `stop_after` completed rounds).

        SIGINT/SIGTERM stop it at the next safe point after a checkpoint is written
        (`stopped_by` then holds the signal); too many failed clients in a round raise
        FederationError after the same checkpoint.
        """
        fed = self.cfg.federation
        self.stopped_by = None
        if resume and not self.loaded:
            self.load(self.checkpoint_path)
        if self.loaded:
            for row in self.history:  # the CSV logger starts a fresh file: replay the past
                self.fabric.log_dict(row, step=int(row["round"]))
        elif fed.eval_at_start and not self.history:
            row = {"round": 0.0, **self.evaluation_metrics(-1)}
            self.history.append(row)
            self.fabric.log_dict(row, step=0)
        last = fed.rounds if stop_after is None else min(fed.rounds, stop_after)
        with (
            GracefulStop("the federation") as stop,
            Progress(fed.rounds, enabled=self.show_progress) as progress,
        ):
            self._stop = stop
            try:
                progress.advance_rounds(self.round)
                for rnd in range(self.round, last):
                    try:
                        metrics = self.run_round(rnd, progress)
                    except (_Stopped, FederationError):
                        self._save_if_run_dir()  # the round so far: resume goes on from here
                        self.stopped_by = stop.requested
                        if stop.requested is None:
                            raise
                        break
                    self.round = rnd + 1
                    self.history.append(metrics)
                    self.fabric.log_dict(metrics, step=self.round)
                    self._flush_loggers()
                    progress.round_done(metrics)
                    self._save_if_run_dir()
                    self.stopped_by = self._agreed_stop(stop)
                    if self.stopped_by is not None:
                        break
            finally:
                self._stop = None
        self._flush_loggers()
        return self.history

    def _agreed_stop(self, stop: GracefulStop) -> int | None:
        """The stop signal, if any rank received one (all ranks then stop together)."""
        if self.world_size == 1:
            return stop.requested
        flag = torch.tensor(stop.requested or 0, device=self.fabric.device)
        return int(self.fabric.all_reduce(flag, reduce_op="max")) or None

    def _save_if_run_dir(self) -> None:
        if self.run_dir is not None and self.rank == 0:
            self.save(self.checkpoint_path)

    def _flush_loggers(self) -> None:
        for lg in self.fabric.loggers:
            lg.save()

    def close(self, exit_code: int = 0) -> None:
        """Finish the loggers' runs with the command's exit code: a W&B run is flushed and
        closed here, not by an exit hook that a busy machine may cut short."""
        self._flush_loggers()
        for lg in self.fabric.loggers:
            run = getattr(lg, "_experiment", None)  # only a W&B run that was started
            if run is not None and hasattr(run, "finish"):
                run.finish(exit_code=exit_code)

    # ---- checkpoints ---------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        if self.run_dir is None:
            raise ValueError("this federation has no run folder")
        return self.run_dir / "checkpoints" / "last.ckpt"

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "round": self.round,
            "strategy": self.strategy.state_dict(),
            "clients": [c.client_state() for c in self.clients],
            "sampler": self.sampler.get_state(),
            "history": self.history,
            "torch_rng": torch.get_rng_state(),
            "failures": self.failures,
            "partial": self.partial,
            "privacy": self.privacy.state_dict(),
        }

    def save(self, path: str | Path) -> None:
        save_atomic(self.state_dict(), path)

    def load(self, path: str | Path) -> None:
        state = load_checkpoint(path)
        if state["fingerprint"] != self.fingerprint:
            raise CheckpointError(
                f"{path} was written by a different configuration (fingerprint "
                f"{state['fingerprint']} != {self.fingerprint}); resume with the run's own config.yaml"
            )
        if len(state["clients"]) != len(self.clients):
            raise CheckpointError(
                f"{path} holds {len(state['clients'])} clients, config has {len(self.clients)}"
            )
        self.strategy.load_state_dict(state["strategy"])
        for client, cs in zip(self.clients, state["clients"], strict=True):
            client.load_client_state(cs)
        self.sampler.set_state(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        self.history = list(state["history"])
        self.round = int(state["round"])
        self.failures = list(state["failures"])
        self.partial = state["partial"]
        self.privacy.load_state_dict(state["privacy"])
        self.loaded = True

    # ---- results -------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        experts = {}
        for k, client in enumerate(self.clients):
            ids = getattr(client.learner, "expert_ids", None)
            if ids is not None:  # pFedMoAP: the experts the client holds now
                experts[k] = list(ids)
        return run_summary(
            self.cfg,
            self.data.summary(),
            self.history,
            self.last_eval,
            experts,
            self.round,
            self.failures,
            self.privacy,
            self.metric,
        )
