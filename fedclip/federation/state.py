"""The round loop's checkpoint: what it holds, and restoring it (`weights_only` containers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedclip.checkpoint import FORMAT, VERSION
from fedclip.errors import CheckpointError
from fedclip.federation.checks import check_loop_state
from fedclip.federation.records import RoundRecord
from fedclip.federation.summary import last_evaluation


def loop_state(loop) -> dict[str, Any]:
    """A `RoundLoop`'s whole state as plain containers and tensors."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": loop.fingerprint,
        "round": loop.round,
        "strategy": loop.strategy.state_dict(),
        "clients": loop.executor.client_states(),
        "sampler": loop.sampler.get_state(),
        "history": loop.history,
        "torch_rng": torch.get_rng_state(),
        "failures": loop.failures,
        "partial": None if loop.partial is None else loop.partial.to_plain(),
        "privacy": loop.privacy.state_dict(),
        "wall_s": loop.elapsed_s(),
    }


def load_loop_state(loop, state: dict[str, Any], path: str | Path) -> None:
    """Restore `loop` from `loop_state`'s output read from `path`."""
    if state.get("fingerprint") != loop.fingerprint:
        raise CheckpointError(
            f"{path} was written by a different configuration (fingerprint "
            f"{state['fingerprint']} != {loop.fingerprint}); resume with the run's own "
            "config.yaml"
        )
    check_loop_state(loop, state, path)  # everything, before any of it is loaded
    try:
        loop.sampler.set_state(state["sampler"])
        rng = torch.get_rng_state()
        torch.set_rng_state(state["torch_rng"])
        torch.set_rng_state(rng)
    except RuntimeError as e:  # a byte tensor of the right size that no generator can take
        raise CheckpointError(f"{path}: sampler or torch_rng is not a generator state: {e}") from e
    loop.strategy.load_state_dict(state["strategy"])
    try:
        loop.executor.load_client_states(state["clients"])
    except ValueError as e:  # an optimizer or scheduler state that does not fit (one line)
        raise CheckpointError(f"{path}: {e}") from None
    torch.set_rng_state(state["torch_rng"])
    loop.history = list(state["history"])
    loop.last_eval = last_evaluation(loop.history, loop.metric)  # the summary's client rows
    loop.round = int(state["round"])
    loop.failures = list(state["failures"])
    partial = state["partial"]
    loop.partial = None if partial is None else RoundRecord.from_plain(partial)
    loop.privacy.load_state_dict(state["privacy"])
    loop.wall_s = float(state.get("wall_s", 0.0))  # absent: written before it was kept
