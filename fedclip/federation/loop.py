"""RoundLoop: the server side of federated training, once for every backend.

Each round: sample clients with a seeded generator, ask the strategy for their payloads,
hand the turns to the executor (in process, Fabric ranks or a Flower Grid), commit the
outcomes in sampling order, aggregate (the strategy's returned state is the truth; central
DP is a wrapper strategy), account privacy, evaluate when due, log (CSV, W&B), checkpoint
and honour stop signals. A round interrupted by SIGINT/SIGTERM is checkpointed as far as it
got and finished on resume, to the same final state as an uninterrupted run.
"""

from __future__ import annotations

import logging
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from fedclip.checkpoint import load_checkpoint, save_atomic
from fedclip.errors import FederationError, one_line
from fedclip.federation.executors import Executor
from fedclip.federation.records import ClientOutcome, RoundRecord
from fedclip.federation.runtime import Stopped
from fedclip.federation.state import load_loop_state, loop_state
from fedclip.federation.summary import eval_metrics, round_metrics, run_summary, too_many
from fedclip.interrupt import GracefulStop
from fedclip.privacy import DifferentialPrivacy
from fedclip.progress import Progress
from fedclip.strategies.dp import with_privacy

log = logging.getLogger("fedclip.federation")
# On resume the CSV logger starts its file anew and the checkpointed history is replayed
# into it, so its warning about replacing the old file does not apply.
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")


def sample_clients(sampler: torch.Generator, num_clients: int, fraction: float) -> list[int]:
    """The round's clients: max(1, round(fraction * num_clients)) of them, drawn from
    `sampler` (advanced), sorted."""
    m = max(1, round(fraction * num_clients))
    return sorted(torch.randperm(num_clients, generator=sampler)[:m].tolist())


def make_loggers(run_dir: Path, cfg, config: dict[str, Any] | None = None) -> list:
    """The run's metric loggers: the CSV file, and W&B when configured (`config`: the
    resolved config as plain data, the W&B run's config; see fedclip.tracking)."""
    from lightning.fabric.loggers import CSVLogger

    loggers: list = [CSVLogger(root_dir=str(run_dir), name="", version="csv")]
    if cfg.logger.wandb:
        from fedclip.tracking import WandbTracker

        loggers.append(WandbTracker(run_dir, cfg.logger, config))
    return loggers


def stopped(rnd: int, partial: bool, exit_code: int, error: str | None = None) -> dict:
    """summary.json's `stopped` of a run that stopped before its last round: the round
    (1-based) it stopped in (partial: part-done, checkpointed as far as it got) or after,
    the exit code (128 + N: signal N; 1: too many failing clients) and the reason."""
    record: dict[str, Any] = {"round": rnd, "partial": partial, "exit_code": exit_code}
    if exit_code > 128:
        record.update(reason="signal", signal=signal.Signals(exit_code - 128).name)
    else:
        record.update(reason="client failures", error=one_line(error or ""))
    return record


class RoundLoop:
    """The round loop over an `Executor`.

    run_dir: where the checkpoint and the failing clients' tracebacks (`run.log`) go
    (None: nothing is written); fingerprint: the config's (refuses foreign checkpoints);
    loggers: metric loggers (rank 0 logs).
    """

    def __init__(
        self,
        cfg,
        executor: Executor,
        run_dir: str | Path | None = None,
        fingerprint: str = "",
        loggers: list | None = None,
        show_progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.executor = executor
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.fingerprint = fingerprint
        self.rank = executor.rank
        self.loggers = list(loggers or []) if self.rank == 0 else []
        self.show_progress = show_progress and self.rank == 0
        self.info = executor.describe()
        self.strategy = with_privacy(cfg.strategy, cfg.privacy)
        self.strategy.initialize(
            self.info.initial, self.info.num_clients, cfg.seed, schema=self.info.schema
        )
        self.strategy.set_rounds(cfg.federation.rounds)
        self.privacy = DifferentialPrivacy(cfg.privacy, self.info.num_clients, cfg.seed)
        self.sampler = torch.Generator().manual_seed(cfg.seed)
        self.round = 0  # rounds completed
        self.history: list[dict[str, float]] = []
        self.last_eval: dict[int, float] = {}
        self.failures: list[dict[str, Any]] = []  # {"round", "client", "reason"} of each
        self.partial: RoundRecord | None = None  # the round in progress (checkpointed on stop)
        self.stopped_by: int | None = None  # the signal that stopped the last fit(), if any
        self.stop_record: dict[str, Any] | None = None  # why the last fit() stopped early
        self.loaded = False  # state loaded from a checkpoint
        self.wall_s = 0.0  # seconds spent in fit() calls that have returned (checkpointed)
        self._started: float | None = None  # when the fit() in progress started
        self._stop: GracefulStop | None = None
        self._last_traceback: str | None = None

    @property
    def metric(self) -> str:
        """The headline metric: 'acc', or 'map' for multi-label data."""
        return self.info.metric

    # ---- one round -----------------------------------------------------------------------
    def sample_clients(self) -> list[int]:
        return sample_clients(self.sampler, self.info.num_clients, self.cfg.federation.fraction)

    def stop_requested(self) -> bool:
        """A stop signal arrived and the executor may stop in the middle of a round."""
        return (
            self.executor.mid_round_stops
            and self._stop is not None
            and self._stop.requested is not None
        )

    def _commit(self, record: RoundRecord, outcome: ClientOutcome, progress: Progress) -> None:
        record.commit(outcome)
        if outcome.error is not None:
            k, rnd = outcome.client, record.round
            if self.rank == 0:
                log.warning(
                    "round %d: client %d failed and is left out: %s", rnd + 1, k, outcome.error
                )
                self._write_traceback(rnd, k, outcome)
            self._last_traceback = outcome.traceback
        progress.client_done(outcome.client)

    def _write_traceback(self, rnd: int, k: int, outcome: ClientOutcome) -> None:
        """Append a failing client's traceback to the run's log file."""
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "run.log", "a") as f:
            f.write(f"round {rnd + 1}: client {k} failed: {outcome.error}\n")
            f.write((outcome.traceback or "(no traceback)\n").rstrip("\n") + "\n\n")

    def check_failures(self, record: RoundRecord) -> None:
        """Raise FederationError when the round's failures exceed the limit."""
        too_many(record, self.cfg.federation.max_client_failures, self._last_traceback)

    def run_round(self, rnd: int, progress: Progress) -> dict[str, float]:
        """One round; resumes the checkpointed part of round rnd when there is one."""
        t0 = time.perf_counter()
        record = self.partial if self.partial is not None and self.partial.round == rnd else None
        if record is None:
            record = RoundRecord(rnd, self.sample_clients())
        self.partial = record
        payloads = self.strategy.configure_round(rnd, record.sampled)
        progress.start_clients(rnd, len(record.sampled))
        for k in record.done:
            progress.client_done(k)
        todo = [k for k in record.sampled if k not in record.done]
        try:
            self.executor.run_turns(
                rnd,
                todo,
                payloads,
                lambda outcome: self._commit(record, outcome, progress),
                lambda: self.check_failures(record),
            )
        finally:
            record.elapsed += time.perf_counter() - t0
        metrics = self.close_round(record)
        self.failures.extend(record.failures)
        self.partial = None
        return metrics

    def close_round(self, record: RoundRecord) -> dict[str, float]:
        """Aggregate the round's uploads (in client order), account the privacy spent,
        evaluate when due; returns the round's metrics (`round`, `privacy/*`, `train/*`,
        `client/K/*`, `server/*`, `traffic/*`, `eval/*`, `time/round_s`)."""
        t0 = time.perf_counter()
        rnd = record.round
        _, agg_metrics = self.strategy.aggregate(rnd, record.results())
        privacy = (  # every client whose private upload left it counts
            self.privacy.account(rnd, sorted(record.released), len(record.sampled))
            if self.privacy.enabled
            else {}
        )
        metrics = round_metrics(record, agg_metrics, privacy)
        fed = self.cfg.federation
        if (rnd + 1) % fed.eval_every == 0 or rnd + 1 == fed.rounds:
            metrics.update(self.evaluation_metrics(rnd))
        metrics["time/round_s"] = record.elapsed + time.perf_counter() - t0
        return metrics

    def evaluation_metrics(self, rnd: int) -> dict[str, float]:
        """Evaluate every client with the strategy's evaluation payloads and return the
        logged metrics (keeps each client's headline metric for the summary)."""
        ids = list(range(self.info.num_clients))
        payloads = self.strategy.evaluation_payloads(rnd, ids)
        result = self.executor.evaluate(rnd, ids, payloads)
        counts = {k: self.info.num_test[k] for k in result}
        info = self.info
        metrics = eval_metrics(result, info.multilabel, info.base_to_novel, counts, info.classnames)
        self.last_eval = {k: metrics[f"client/{k}/{self.metric}"] for k in result}
        return metrics

    # ---- the loop ------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_after: int | None = None) -> list[dict[str, float]]:
        """Run the remaining rounds (all of them, or up to `stop_after` completed rounds).

        SIGINT/SIGTERM stop it at the next safe point after a checkpoint is written
        (`stopped_by` then holds the signal); too many failed clients in a round raise
        FederationError after the same checkpoint.
        """
        fed = self.cfg.federation
        self.stopped_by = self.stop_record = None
        if resume and not self.loaded:
            self.load(self.checkpoint_path)
        self.start_loggers()
        if self.loaded:
            for row in self.history:  # the CSV logger starts a fresh file: replay the past
                self._log(row, int(row["round"]), replay=True)
        last = fed.rounds if stop_after is None else min(fed.rounds, stop_after)
        initial = self.cfg.learner.initial_state()
        self._started = started = time.perf_counter()
        with (
            GracefulStop("the federation") as stop,
            Progress(fed.rounds, enabled=self.show_progress, initial=initial) as progress,
        ):
            self._stop = stop
            try:
                if not self.loaded and fed.eval_at_start and not self.history:
                    row = {"round": 0.0, **self.evaluation_metrics(-1)}
                    self.history.append(row)
                    self._log(row, 0)
                    progress.round_done(row)
                progress.advance_rounds(self.round)
                for rnd in range(self.round, last):
                    try:
                        metrics = self.run_round(rnd, progress)
                    except (Stopped, FederationError) as e:
                        self.save_if_run_dir()  # the round so far: resume goes on from here
                        self.stopped_by = stop.requested
                        if stop.requested is None:
                            if isinstance(e, FederationError):
                                self.stop_record = stopped(rnd + 1, True, 1, error=str(e))
                            raise
                        self.stop_record = stopped(rnd + 1, True, 128 + stop.requested)
                        break
                    self.round = rnd + 1
                    self.history.append(metrics)
                    self._log(metrics, self.round)
                    self.flush_loggers()
                    progress.round_done(metrics)
                    self.save_if_run_dir()
                    self.stopped_by = self.executor.agreed_stop(stop.requested)
                    if self.stopped_by is not None:
                        self.stop_record = stopped(self.round, False, 128 + self.stopped_by)
                        break
            finally:
                self._stop = None
                self.wall_s += time.perf_counter() - started
                self._started = None
        self.flush_loggers()
        return self.history

    def _log(self, metrics: dict[str, float], step: int, replay: bool = False) -> None:
        for lg in self.loggers:
            if not (replay and getattr(lg, "replays", True) is False):
                lg.log_metrics(metrics, step=step)

    def start_loggers(self) -> None:
        """Start the loggers' runs that start with the fit (W&B: knowing whether this run
        continues from a checkpoint, and its headline metric)."""
        from fedclip.tracking import headline_metric

        headline = headline_metric(self.info.multilabel, self.info.base_to_novel)
        for lg in self.loggers:
            if hasattr(lg, "start"):
                lg.start(self.loaded, headline, self.history, self.round)

    def publish_files(self, paths: list[Path]) -> None:
        """Hand files just written to the run folder (plots, summary.json) to the loggers
        that take them (W&B)."""
        for lg in self.loggers:
            if hasattr(lg, "publish"):
                lg.publish(paths, self.round)

    def save_if_run_dir(self) -> None:
        if self.run_dir is not None and self.rank == 0:
            self.save(self.checkpoint_path)

    def flush_loggers(self) -> None:
        for lg in self.loggers:
            lg.save()

    def close(self, exit_code: int = 0) -> None:
        """Finish the loggers' runs with the command's exit code: a W&B run is flushed and
        closed here (marked failed for a non-zero code), not by an exit hook that a busy
        machine may cut short."""
        self.flush_loggers()
        self.summarize_selection()
        finished = exit_code == 0 and self.round >= self.cfg.federation.rounds
        for lg in self.loggers:
            if hasattr(lg, "finish"):  # W&B: a finished run may log its prompts first
                lg.finish(exit_code=exit_code, finished=finished)

    def summarize_selection(self) -> None:
        """Under `select: val`, give the loggers that keep a run summary (W&B) the selected
        round's `eval/*` and `val/*` values and `selection/round`, in place of the last
        round's: what summary.json reports, and what a sweep on a `val/` metric compares."""
        fed = self.cfg.federation
        if fed.select != "val":
            return
        from fedclip.federation.selection import select_key, select_round

        by = select_key(fed.select, fed.select_by, self.info.multilabel, self.info.base_to_novel)
        chosen, selection = select_round(self.history, fed.select, by)
        if chosen is None:
            return
        values = {k: v for k, v in chosen.items() if k.startswith(("eval/", "val/"))}
        values["selection/round"] = selection["round"]
        for lg in self.loggers:
            if hasattr(lg, "set_summary"):
                lg.set_summary(values)

    def elapsed_s(self) -> float:
        """Wall seconds spent in fit() so far, over every resume of the run."""
        running = 0.0 if self._started is None else time.perf_counter() - self._started
        return self.wall_s + running

    # ---- checkpoints ---------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        if self.run_dir is None:
            raise ValueError("this federation has no run folder")
        return self.run_dir / "checkpoints" / "last.ckpt"

    def state_dict(self) -> dict[str, Any]:
        return loop_state(self)

    def save(self, path: str | Path) -> None:
        save_atomic(self.state_dict(), path)

    def load(self, path: str | Path) -> None:
        """Restore the loop from a checkpoint (refused, in one line, when it was written by
        another config or holds another number of clients)."""
        load_loop_state(self, load_checkpoint(path), path)
        self.loaded = True

    # ---- results -------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """summary.json: the results (`run_summary`), and under `run` where they came from
        (versions, git commit, wall time, device), the part that differs between runs."""
        from fedclip.provenance import run_info

        partial = self.partial.failures if self.partial is not None else []
        summary = run_summary(
            self.cfg,
            self.info.data_summary,
            self.history,
            self.last_eval,
            self.executor.reports(),
            self.round,
            self.failures + partial,  # a stopped run's too: those of the round it stopped in
            self.privacy,
            self.metric,
            self.cfg.learner.initial_state(),
        )
        summary["stopped"] = self.stop_record
        summary["run"] = run_info(self.cfg, self.executor.device(), self.elapsed_s())
        return summary
