"""How `fedclip fit` runs its federation and ends: the exit code, the results written and
the lines printed, however the fit stops.

0: every round done (a resumed run that had already finished trains nothing: its results
are rewritten from the checkpoint and its table printed). 1: too many failing clients
(FederationError): summary.json is written, its `stopped` saying why, with the failures.
128 + N: stopped by signal N after a checkpoint, summary.json likewise marked stopped.
130: aborted by a second Ctrl-C (or a first one while the results are written): one line,
the checkpoint intact, and no half-written file (every file is replaced whole).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from fedclip.errors import one_line


def _say(main_rank: bool, text: str) -> None:
    if main_rank:
        print(text, file=sys.stderr)


def _results_written(fed, run_dir: Path, ckpt: Path, hint: str) -> bool:
    """write_results, or False (the loggers closed, one line printed) when Ctrl-C aborts it."""
    from fedclip.report import write_results

    try:
        write_results(fed, run_dir)
    except KeyboardInterrupt:
        fed.close(130)
        print(
            f"aborted while writing the results to {run_dir} (each file is whole or absent); "
            f"the last checkpoint is {ckpt} (write them again: {hint})",
            file=sys.stderr,
        )
        return False
    return True


def run_fit(fed, run_dir: Path, run_name: str, resume: bool) -> int:
    """Run `fed` (a Federation with its run folder set up) and end it; the exit code."""
    from fedclip.federation import FederationError
    from fedclip.report import print_table
    from fedclip.sweeps import requeue_if_preempted

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    hint = f"fedclip fit --config {run_dir / 'config.yaml'} --resume true"
    main_rank = fed.rank == 0  # with several ranks, rank 0 alone writes and reports
    done_before = resume and fed.partial is None and fed.round >= fed.cfg.federation.rounds
    try:
        fed.fit(resume=resume)
    except KeyboardInterrupt:
        fed.close(130)
        _say(main_rank, f"aborted; the last checkpoint is {ckpt} (continue: {hint})")
        return 130
    except FederationError as e:
        if main_rank and not _results_written(fed, run_dir, ckpt, hint):
            return 130
        fed.close(1)
        client_tb = getattr(e, "client_traceback", None)
        if client_tb:  # the last failing client's traceback (every one: run.log)
            _say(main_rank, client_tb.rstrip("\n"))
        _say(
            main_rank,
            f"fedclip fit: stopped: {one_line(str(e))}; the round so far is in {ckpt} "
            f"(continue: {hint}, e.g. with a higher federation.max_client_failures)",
        )
        return 1
    except Exception:
        fed.close(1)  # the loggers' runs end marked failed; the traceback goes on to main
        raise
    code = 128 + fed.stopped_by if fed.stopped_by is not None else 0
    if not main_rank:
        fed.close(code)
        return code
    if not _results_written(fed, run_dir, ckpt, hint):
        return 130
    if fed.stopped_by is not None:
        name = signal.Signals(fed.stopped_by).name
        _say(main_rank, f"stopped by {name} after a checkpoint: {ckpt} (continue: {hint})")
        if requeue_if_preempted(fed.stopped_by):  # while the W&B run is still open
            _say(main_rank, "W&B sweep: run marked preempting; the sweep requeues it")
        fed.close(code)
        return code
    fed.close(0)
    if done_before:
        _say(main_rank, f"{run_name} had finished: nothing trained, results rewritten from {ckpt}")
    print_table(fed, f"{run_name}: round {fed.round}")
    print(f"run folder: {run_dir}")
    return 0
