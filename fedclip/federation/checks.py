"""Checking a checkpoint before any of it is loaded: its structure, and every tensor's shape
and dtype, against the federation that is about to take it.

The reference is the freshly built loop's own `state_dict()` (`loop_state`): the same keys,
the same types, tensors of the same shape and dtype. The parts that legitimately vary are
checked by their own rules: the history, the failures and the round in progress (any
length, each entry well formed and consistent with the round), the global state and the
strategy's other state (`Strategy.check_state`: e.g. pFedMoAP's pool, FedMVP's global state
that gains the LoRA factors), a learner's extra state (`expected_extra_state`, e.g.
pFedMoAP's held experts) and the optimizers, which a client has only after its first turn
(checked in `ClientModule.load_client_state`, against the optimizers built for the loaded
learner). Every refusal is a `CheckpointError` naming the file and the key path, e.g.
`last.ckpt: strategy.global_state.ctx has shape (3, 8), expected (2, 8)`.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

import torch
from torch import Tensor

from fedclip.errors import CheckpointError, UploadError
from fedclip.federation.records import RoundRecord
from fedclip.statecheck import ANY, integer, kind, like


def _number(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{key} is {kind(value)}, expected a number")


def _numbers(value: Any, key: str) -> None:
    """A dict of str -> number (metrics)."""
    if not isinstance(value, dict):
        raise ValueError(f"{key} is {kind(value)}, expected a dict of numbers")
    for k, v in value.items():
        if not isinstance(k, str):
            raise ValueError(f"{key} has the key {k!r}, expected names")
        _number(v, f"{key}.{k}")


def _ids(value: Any, key: str, n: int) -> list[int]:
    """A list of distinct client ids in 0..n-1."""
    if not isinstance(value, list):
        raise ValueError(f"{key} is {kind(value)}, expected a list of client ids")
    ids = [integer(v, f"{key}[{i}]", 0, n - 1) for i, v in enumerate(value)]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{key} repeats a client: {ids}")
    return ids


def check_history(history: Any, rounds: int) -> None:
    """A list of metric dicts, one per completed round (1..rounds), after an optional
    round-0 evaluation."""
    if not isinstance(history, list):
        raise ValueError(f"history is {kind(history)}, expected a list of dicts")
    done = []
    for i, row in enumerate(history):
        _numbers(row, f"history[{i}]")
        if "round" not in row:
            raise ValueError(f"history[{i}] lacks 'round'")
        if row["round"] != 0:
            done.append(row["round"])
    if done != list(range(1, len(done) + 1)) or len(done) != rounds:
        shown = [int(r) if float(r).is_integer() else r for r in done]
        raise ValueError(
            f"history holds rounds {shown}, but the checkpoint says {rounds} rounds are done"
        )


def check_failures(failures: Any, key: str, n: int, last_round: int) -> None:
    """[{"round", "client", "reason"}] of failed clients."""
    if not isinstance(failures, list):
        raise ValueError(f"{key} is {kind(failures)}, expected a list of dicts")
    for i, f in enumerate(failures):
        like({"round": 0, "client": 0, "reason": ""}, f, f"{key}[{i}]")
        integer(f["round"], f"{key}[{i}].round", 1, last_round)
        integer(f["client"], f"{key}[{i}].client", 0, n - 1)


def check_partial(partial: Any, rounds: int, n: int, strategy: Any | None) -> None:
    """None, or the round in progress (`RoundRecord.to_plain`) of round `rounds`."""
    if partial is None:
        return
    ref = RoundRecord(0, [0]).to_plain()
    like({k: ANY if isinstance(v, dict | list) else v for k, v in ref.items()}, partial, "partial")
    integer(partial["round"], "partial.round", rounds, rounds)
    sampled = _ids(partial["sampled"], "partial.sampled", n)
    if not sampled:
        raise ValueError("partial.sampled is empty")
    for name in ("done", "released"):
        ids = _ids(partial[name], f"partial.{name}", n)
        if not set(ids) <= set(sampled):
            raise ValueError(f"partial.{name} {ids} are not all among the sampled {sampled}")
    done = set(partial["done"])
    for name in ("results", "losses"):
        if not isinstance(partial[name], dict):
            raise ValueError(f"partial.{name} is {kind(partial[name])}, expected a dict")
        if not set(partial[name]) <= done:
            raise ValueError(f"partial.{name} has clients {sorted(partial[name])} not done")
    for k, loss in partial["losses"].items():
        _number(loss, f"partial.losses.{k}")
    for k, r in partial["results"].items():
        key = f"partial.results.{k}"
        like({"state": ANY, "num_samples": 0, "metrics": ANY}, r, key)
        integer(r["num_samples"], f"{key}.num_samples")
        _numbers(r["metrics"], f"{key}.metrics")
        if strategy is not None:
            try:
                strategy.validate_upload(r["state"])
            except UploadError as e:
                raise ValueError(f"{key}.state: {e}") from None
        elif not isinstance(r["state"], dict):
            raise ValueError(f"{key}.state is {kind(r['state'])}, expected a dict of tensors")
    check_failures(partial["failures"], "partial.failures", n, rounds + 1)
    _numbers(partial["metrics"], "partial.metrics")
    integer(partial["down"], "partial.down")
    integer(partial["up"], "partial.up")


def check_privacy(state: Any, ref: dict[str, Any], n: int) -> None:
    """The privacy accountant's plain state (`DifferentialPrivacy.state_dict`)."""
    like({k: ANY if isinstance(v, dict | list) else v for k, v in ref.items()}, state, "privacy")
    integer(state["last_round"], "privacy.last_round", -1)
    steps = {"central": state["central"]}
    if not isinstance(state["local"], dict):
        raise ValueError(f"privacy.local is {kind(state['local'])}, expected a dict")
    for k, h in state["local"].items():
        if not (isinstance(k, str) and k.isdigit() and int(k) < n):
            raise ValueError(f"privacy.local has the key {k!r}, expected a client id")
        steps[f"local.{k}"] = h
    for name, h in steps.items():
        if not isinstance(h, list):
            raise ValueError(f"privacy.{name} is {kind(h)}, expected a list")
        for i, step in enumerate(h):
            like([0.0, 0.0, 0], step, f"privacy.{name}[{i}]")


def check_common(state: dict[str, Any], n: int, strategy: Any | None = None) -> None:
    """The parts every checkpoint checks by rule: round, history, failures, partial."""
    rounds = integer(state["round"], "round")
    check_history(state["history"], rounds)
    check_failures(state["failures"], "failures", n, rounds)
    check_partial(state["partial"], rounds, n, strategy)
    _number(state.get("wall_s", 0.0), "wall_s")


def check_client(ref: dict[str, Any], got: Any, key: str, learner: Any) -> None:
    """A client's personal state: the learner's state dict like the reference's (its extra
    state like `learner.expected_extra_state` of what was saved), and lists of optimizer
    and scheduler states (checked against the optimizers themselves when they load)."""
    like({"learner": ANY, "optimizers": ANY, "schedulers": ANY}, got, key)
    saved, ref_learner = got["learner"], dict(ref["learner"])
    if not isinstance(saved, dict):
        raise ValueError(f"{key}.learner is {kind(saved)}, expected a dict")
    if "_extra_state" in ref_learner and "_extra_state" in saved:
        ref_learner["_extra_state"] = learner.expected_extra_state(
            ref["learner"], saved["_extra_state"]
        )
    like(ref_learner, saved, f"{key}.learner", finite=True)
    for name in ("optimizers", "schedulers"):
        value = got[name]
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ValueError(f"{key}.{name} is {kind(value)}, expected a list of dicts")
    if len(got["optimizers"]) != len(got["schedulers"]):
        raise ValueError(
            f"{key} has {len(got['optimizers'])} optimizers but {len(got['schedulers'])} schedulers"
        )


def check_loop_state(loop, state: dict[str, Any], path: Any) -> None:
    """Refuse (CheckpointError naming `path` and the key) a checkpoint that does not fit the
    built loop `loop`, before anything of it is loaded."""
    ref = loop.state_dict()
    n = loop.info.num_clients
    try:
        # wall_s may be absent: written before it was kept
        missing = [k for k in ref if k not in state and k != "wall_s"]
        if missing:
            raise ValueError(f"lacks {', '.join(map(repr, missing))}")
        extra = [k for k in state if k not in ref]
        if extra:
            raise ValueError(f"has unexpected {', '.join(map(repr, extra))}")
        like(ref["fingerprint"], state["fingerprint"], "fingerprint")
        if not isinstance(state["clients"], list):
            raise ValueError(f"clients is {kind(state['clients'])}, expected a list")
        if len(state["clients"]) != n:
            raise ValueError(f"holds {len(state['clients'])} clients, the config has {n}")
        check_common(state, n, loop.strategy)
        like(ref["sampler"], state["sampler"], "sampler")
        like(ref["torch_rng"], state["torch_rng"], "torch_rng")
        check_privacy(state["privacy"], ref["privacy"], n)
        loop.strategy.check_state(state["strategy"])
        for k, (r, g) in enumerate(zip(ref["clients"], state["clients"], strict=True)):
            check_client(r, g, f"clients[{k}]", loop.cfg.learner)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _sized_like(ref: Any, got: Any) -> Any:
    """`ref` with `got`'s size when both are tensors with as many dimensions."""
    if isinstance(ref, Tensor) and isinstance(got, Tensor) and ref.dim() == got.dim():
        return torch.empty(got.shape, dtype=ref.dtype)
    return ref


def check_saved_run(state: dict[str, Any], path: Any, num_clients: int) -> None:
    """What can be checked without building the federation (`fedclip export`): the rules
    of `check_common`, the client count, and tensors that agree among themselves (every
    client's learner state with the same tensors; the global state like theirs; finite).
    Tensors the global state does not hold may differ in size between clients (as many
    dimensions, the same dtype): personal tensors sized per client, e.g. local prompts of
    per-client lengths."""
    try:
        for k in ("round", "history", "failures", "partial", "strategy"):
            if k not in state:
                raise ValueError(f"lacks {k!r}")
        clients = state.get("clients")
        if not isinstance(clients, list):
            raise ValueError(f"clients is {kind(clients)}, expected a list")
        if len(clients) != num_clients:
            raise ValueError(f"holds {len(clients)} clients, the config has {num_clients}")
        check_common(state, num_clients)
        strategy = state.get("strategy")
        glob = strategy.get("global_state") if isinstance(strategy, dict) else None
        shared = set(glob) if isinstance(glob, dict) else set()
        first = None
        for k, c in enumerate(clients):
            if not isinstance(c, dict) or not isinstance(c.get("learner"), dict):
                raise ValueError(f"clients[{k}] is not a dict with a 'learner' dict")
            learner = {n: v for n, v in c["learner"].items() if not n.endswith("_extra_state")}
            if first is None:
                first = learner
            ref = {
                n: v if n in shared else _sized_like(v, learner.get(n)) for n, v in first.items()
            }
            like(ref, learner, f"clients[{k}].learner", finite=True)
        strategy = state["strategy"]
        if not isinstance(strategy, dict) or "global_state" not in strategy:
            raise ValueError("strategy is not a dict with a 'global_state'")
        glob = strategy["global_state"]
        if glob is not None:
            if not isinstance(glob, dict):
                raise ValueError(f"strategy.global_state is {kind(glob)}, expected a dict")
            ref = {n: first[n] for n in glob if n in (first or {})}
            like(ref, {n: glob[n] for n in ref}, "strategy.global_state", finite=True)
            for n, v in glob.items():
                if not isinstance(v, Tensor):
                    raise ValueError(f"strategy.global_state.{n} is {kind(v)}, expected a tensor")
                if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    raise ValueError(f"strategy.global_state.{n} holds NaN or inf")
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
