"""What every command's parser shares: exact keys only, and the closest key on a typo.

argparse (and jsonargparse on top of it) accepts any unambiguous prefix of a flag by
default, so `--federation.round 3` silently set `federation.rounds`. Every fedclip parser
is built by `command_parser` (allow_abbrev=False) and read by `parse_args`, which turns an
unknown key into one line naming it and the closest known one:
`unknown key --federation.round (did you mean --federation.rounds?)`.

Nothing here imports torch (jsonargparse only when a parser is built).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
from collections.abc import Iterable
from typing import Any

from fedclip.errors import UsageError


def command_parser(prog: str, description: str, **kwargs: Any):
    """A jsonargparse ArgumentParser for `prog` that takes exact keys only and raises
    argparse.ArgumentError instead of exiting."""
    from jsonargparse import ArgumentParser

    return ArgumentParser(
        prog=prog, description=description, exit_on_error=False, allow_abbrev=False, **kwargs
    )


def closest(key: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to `key` (difflib), or None when none is close."""
    found = difflib.get_close_matches(key, sorted(set(candidates)), n=1, cutoff=0.6)
    return found[0] if found else None


def _flags(parser: Any) -> list[str]:
    return [s for s in getattr(parser, "_option_string_actions", {}) if s.startswith("--")]


_NOT_ACCEPTED = re.compile(
    r"Parser key \"(?P<key>[\w.]+)\":\s+Problem with given class_path '(?P<cls>[\w.]+)':\s+"
    r"Option '(?P<opt>\w+)' is not accepted"
)


def _init_args(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls.__init__).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    return [p for p in params if p != "self" and params[p].kind is not params[p].VAR_KEYWORD]


def unknown_key_message(parser: Any, message: str) -> str | None:
    """The one line for a parser error that is an unknown key, or None when it is not."""
    text = " ".join(message.split())
    if text.startswith("unrecognized arguments:"):
        flags = [a for a in text.split(":", 1)[1].split() if a.startswith("--")]
        if not flags:
            return None
        key = flags[0].split("=", 1)[0]
        known = _flags(parser)
    else:  # a subclass's init_args: `--learner.init_args.n_ct` or `--learner.n_ct`
        match = _NOT_ACCEPTED.search(text)
        if match is None:
            return None
        prefix = f"--{match['key']}.init_args."
        key = prefix + match["opt"]
        known = [prefix + a for a in _init_args(match["cls"])]
    prog = getattr(parser, "prog", "fedclip")
    near = closest(key, known)
    hint = f"did you mean {near}?" if near else f"see {prog} -h"
    return f"unknown key {key} ({hint})"


def parse_args(parser: Any, argv: list[str]) -> Any:
    """parser.parse_args(argv); an unknown key raises UsageError naming the closest one."""
    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as e:
        line = unknown_key_message(parser, str(e))
        if line is None:
            raise
        raise UsageError(line) from e
