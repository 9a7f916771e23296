"""Graceful stops: SIGINT and SIGTERM ask a running federation to stop at its next safe point
(between two clients, or after a round's evaluation) and to write a checkpoint first.

A second SIGINT aborts at once (KeyboardInterrupt); the checkpoint of the last safe point
stays intact because checkpoints are written atomically. DataLoader workers ignore both
signals, so a terminal's Ctrl-C or a scheduler's SIGTERM sent to the whole process group
does not kill them under the main process while it finishes its safe point.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: workers leave SIGINT/SIGTERM to the main process."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class GracefulStop:
    """Context manager that turns SIGINT/SIGTERM into a stop request.

    `requested` holds the first signal's number (None until one arrives). Handlers are
    installed only in the main thread (elsewhere the context does nothing) and the previous
    handlers are restored on exit.
    """

    def __init__(self, what: str = "fedclip") -> None:
        self.what = what
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        if self.requested is None:
            self.requested = signum
            log.warning(
                "%s received: %s stops at the next safe point and writes a checkpoint "
                "(Ctrl-C again aborts; the last checkpoint stays intact)",
                signal.Signals(signum).name,
                self.what,
            )

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
