"""Running a suite's cells: one `python -m fedclip.cli fit ...` process per cell, `jobs` at
once, each writing its output to its log file, with one line per cell start and end.

Every child gets OMP_NUM_THREADS = MKL_NUM_THREADS = max(1, usable cores // jobs), so that
N jobs share the cores instead of each taking all of them (torch reads it at import). A
child runs in its own session: Ctrl-C (or SIGTERM) reaches the suite alone, which then
sends each running child SIGTERM (a fit stops after a checkpoint), waits for them and
raises KeyboardInterrupt. A failing child does not stop the others.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedclip.suites.spec import Cell

STOP_WAIT_S = 60.0  # how long stopped children get to write their checkpoint


@dataclass
class Job:
    """A cell to run with `argv` (its fit argv, plus --resume=true when it continues)."""

    cell: Cell
    argv: tuple[str, ...]
    log: Path
    resume: bool = False


@dataclass
class Outcome:
    job: Job
    code: int
    seconds: float


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def child_env(jobs: int) -> dict[str, str]:
    """The children's environment: threads divided among the jobs, and this fedclip first
    on the path (a child runs the same code as the suite)."""
    env = dict(os.environ)
    threads = str(max(1, usable_cores() // jobs))
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = threads
    root = str(Path(__file__).resolve().parents[2])
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not {"site-packages", "dist-packages"} & set(Path(root).parts) and root not in parts:
        env["PYTHONPATH"] = os.pathsep.join([root, *parts])
    return env


def command_line(argv: tuple[str, ...] | list[str]) -> str:
    """The cell's command as one shell line: `fedclip fit ...`."""
    return shlex.join(["fedclip", *argv])


class _Lines:
    """One plain line per event on stderr; on a terminal, above a rich bar of the cells."""

    def __init__(self, total: int) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.bar = None
        if self.console.is_terminal and total:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(
                TextColumn("cells"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("cells", total=total)

    def say(self, line: str, advance: bool = False) -> None:
        if self.bar is not None:
            self.console.print(line, soft_wrap=True, highlight=False, markup=False)
            if advance:
                self.bar.advance(self.task)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop(running: dict) -> None:
    """SIGTERM to every running child, then wait (SIGKILL after STOP_WAIT_S or a second
    Ctrl-C)."""
    for proc in running:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + STOP_WAIT_S
    try:
        for proc in running:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        for proc in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for _, _, log in running.values():
        log.close()


def run_jobs(jobs: list[Job], n_jobs: int, detail: Callable[[Job], str]) -> list[Outcome]:
    """Run `jobs` in order, `n_jobs` at once; `detail(job)`: what a finished job's line
    shows (e.g. its metric). KeyboardInterrupt after the running children are stopped."""
    env = child_env(n_jobs)
    pending, running = deque(jobs), {}
    outcomes: list[Outcome] = []
    lines = _Lines(len(jobs))
    total, started = len(jobs), 0
    try:  # SIGTERM (a cluster's stop) as Ctrl-C; only the main thread may set it
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:
        previous = None
    try:
        while pending or running:
            while pending and len(running) < n_jobs:
                job = pending.popleft()
                started += 1
                job.log.parent.mkdir(parents=True, exist_ok=True)
                log = job.log.open("a")
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                log.write(f"# fedclip suite, {stamp}: {command_line(job.argv)}\n")
                log.flush()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "fedclip.cli", *job.argv],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
                running[proc] = (job, time.monotonic(), log)
                how = " (resumed from its checkpoint)" if job.resume else ""
                lines.say(f"[{started}/{total}] start {job.cell.id}{how}")
            for proc in [p for p in running if p.poll() is not None]:
                job, start, log = running.pop(proc)
                log.close()
                outcome = Outcome(job, proc.returncode, time.monotonic() - start)
                outcomes.append(outcome)
                if outcome.code == 0:
                    what = f"done {job.cell.id} ({detail(job)}, {outcome.seconds:.0f} s)"
                else:
                    what = f"FAILED {job.cell.id} (exit {outcome.code}, log {job.log})"
                lines.say(f"[{len(outcomes)}/{total}] {what}", advance=True)
            time.sleep(0.05)
    except KeyboardInterrupt:
        lines.close()
        _stop(running)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        lines.close()
    return outcomes
