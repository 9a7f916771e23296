"""Every error type of fedclip, in one place.

`FedclipError` is the base of user errors: a bad config value, missing or corrupt data, an
unknown model or weights that cannot be had, a corrupt or foreign checkpoint, a device the
machine lacks. The command line prints those as one line and exits with code 2. Every other
exception is a bug: it keeps its traceback and exits with code 1.

The user-error classes also derive from ValueError or OSError where the standard library's
meaning fits (a bad value, a missing file), so code that catches those keeps working; the
command line, however, only treats `FedclipError` as bad input.
"""

from __future__ import annotations

import argparse


def one_line(message: str) -> str:
    """A message as the single line the command line prints."""
    return " ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())


class FedclipError(Exception):
    """A user error: printed as one line that names the problem; exit code 2."""


class ConfigError(FedclipError, ValueError):
    """A configuration value no run can use (checked before anything is written)."""


class UsageError(FedclipError):
    """A problem with what the command was asked to do (flags, run folders, paths)."""


class DataError(FedclipError, ValueError):
    """A data set is missing, incomplete or corrupt, or cannot be downloaded."""


class BackboneError(FedclipError, ValueError):
    """A backbone cannot be built: unknown model, unavailable weights or tokenizer, or a
    tower that a learner cannot use."""


class CheckpointError(FedclipError, ValueError):
    """A checkpoint is missing, corrupt, foreign or unsafe; the message is one line."""


class DeviceError(FedclipError):
    """A device, precision or launcher the machine cannot provide."""


class FlowerSetupError(FedclipError):
    """A Flower federation cannot start on the connected nodes (one line)."""


class NodeConfigError(FedclipError, ValueError):
    """A Flower node's settings do not fit the run (one line, shown by the server)."""


# ---- not user errors ------------------------------------------------------------------------
class UploadError(ValueError):
    """An upload that must not be aggregated (unknown key, wrong shape or dtype, NaN/inf).
    The client that sent it fails its round; the run goes on."""


class ClientFailure(Exception):
    """One client's local work failed (e.g. a non-finite loss): its round is dropped."""


class Stopped(Exception):
    """A stop request (SIGINT/SIGTERM) interrupted a client's turn; it is rolled back and
    runs again on resume."""


class ContractError(TypeError):
    """A learner breaks the PromptLearner contract (a bug in the learner, not bad input)."""


class FederationError(RuntimeError):
    """The federation cannot go on (more clients failed in a round than allowed). The run
    stops with exit code 1 after writing the round so far; the failing clients'
    tracebacks are in the run's log file."""


def _raised_by_jsonargparse(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("jsonargparse")


def user_error(error: BaseException) -> BaseException | None:
    """The bad input behind `error`, or None when `error` is a bug.

    Bad input is a FedclipError or an argparse.ArgumentError (how jsonargparse refuses a
    flag or value). jsonargparse re-raises what a class's __init__ or __post_init__ raised
    as a plain ValueError in some places (a dataclass under a Union, e.g. `X | None`), with
    the original as its __cause__; such a wrapper, and only one raised inside jsonargparse,
    is looked through. Any other exception, whatever it wraps, stays a bug.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, FedclipError | argparse.ArgumentError):
            return error
        if not _raised_by_jsonargparse(error):
            return None
        seen.add(id(error))
        error = error.__cause__
    return None
