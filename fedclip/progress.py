"""Progress of a federation: a rich display of rounds and clients on a terminal, and one
line per round (outside a terminal, e.g. a SLURM log: one plain line, never wrapped)."""

from __future__ import annotations

import math
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress


def human_bytes(n: float) -> str:
    """Bytes as '512 B', '4.1 kB', '24 GB', '1.5 TB' (powers of 1000): one decimal below
    10 of a unit, none above."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB", "EB"):
        if abs(n) < 1000 or unit == "EB":
            return f"{n:.0f} {unit}" if abs(n) >= 10 or unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.0f} EB"


def round_line(metrics: dict[str, float], rounds: int, initial: str = "") -> str:
    """The line of one round: `round R/N | loss | acc (or mAP, base-to-novel) | global and
    dual | val (the mean validation acc or mAP, with `data.val_fraction`) | failures | eps |
    traffic | time`. Round 0 (the evaluation before training) says so, and what the initial
    model is (`initial`, e.g. the learner's `initial_state()`)."""
    rnd = int(metrics["round"])
    parts = [f"round {rnd}/{rounds}" + (" (before training)" if rnd == 0 else "")]
    loss = metrics.get("train/loss_mean", float("nan"))
    if not math.isnan(loss):
        parts.append(f"loss {loss:.4f}")
    name = "map" if "eval/map_mean" in metrics else "acc"
    if f"eval/{name}_mean" in metrics:
        label = {"map": "mAP", "acc": "local" if "eval/hm" in metrics else "acc"}[name]
        parts.append(
            f"{label} {100 * metrics[f'eval/{name}_mean']:.2f}% "
            f"± {100 * metrics[f'eval/{name}_std']:.2f} "
            f"(min {100 * metrics[f'eval/{name}_min']:.2f})"
        )
    if "eval/map_pooled" in metrics:
        parts.append(f"pooled mAP {100 * metrics['eval/map_pooled']:.2f}%")
    if "eval/global" in metrics and "eval/hm" not in metrics:  # (base-to-novel: base is it)
        parts.append(
            f"global {100 * metrics['eval/global']:.2f}% dual {100 * metrics['eval/dual']:.2f}%"
        )
    if "eval/hm" in metrics:  # base-to-novel
        parts.append(
            f"base {100 * metrics['eval/base']:.2f}% novel {100 * metrics['eval/novel']:.2f}% "
            f"HM {100 * metrics['eval/hm']:.2f}%"
        )
    if f"val/{name}_mean" in metrics:  # the validation split (`data.val_fraction`)
        parts.append(f"val {100 * metrics[f'val/{name}_mean']:.2f}%")
    failed = metrics.get("train/failed_clients", 0.0)
    if failed:
        parts.append(f"{int(failed)} client(s) failed")
    if "privacy/epsilon" in metrics:
        parts.append(f"eps {metrics['privacy/epsilon']:.2f}")
    if rnd == 0:
        if initial:
            parts.append(initial)
        return " | ".join(parts)
    parts.append(
        f"up {human_bytes(metrics.get('traffic/up_bytes', 0))} "
        f"down {human_bytes(metrics.get('traffic/down_bytes', 0))}"
    )
    parts.append(f"{metrics.get('time/round_s', 0):.1f} s")
    return " | ".join(parts)


class Progress:
    """Round and client bars (only on a terminal) plus a line after every round.

    On a terminal the line goes through rich (above the live bars); elsewhere it is one
    plain line on stderr, flushed, whatever its length, so a log file holds one greppable
    line per round. initial: what round 0 evaluates (see `round_line`)."""

    def __init__(
        self,
        rounds: int,
        enabled: bool = True,
        console: Console | None = None,
        initial: str = "",
    ) -> None:
        self.rounds = rounds
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.initial = initial
        self._bar: RichProgress | None = None

    def __enter__(self) -> Progress:
        if self.enabled and self.console.is_terminal:
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._bar.start()
            self._rounds = self._bar.add_task("rounds", total=self.rounds)
            self._clients = self._bar.add_task("clients", total=1)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance_rounds(self, n: int) -> None:
        if self._bar is not None and n:
            self._bar.advance(self._rounds, n)

    def start_clients(self, rnd: int, m: int) -> None:
        if self._bar is not None:
            self._bar.reset(self._clients, total=m, description=f"round {rnd + 1} clients")

    def client_done(self, k: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._clients)

    def round_done(self, metrics: dict[str, float]) -> None:
        """Advance the round bar (not for round 0) and show the round's line."""
        if self._bar is not None and int(metrics["round"]) > 0:
            self._bar.advance(self._rounds)
        if not self.enabled:
            return
        line = round_line(metrics, self.rounds, self.initial)
        if self.console.is_terminal:
            self.console.print(line, soft_wrap=True, highlight=False, markup=False)
        else:
            print(line, file=self.console.file or sys.stderr, flush=True)
