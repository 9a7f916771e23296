"""Comparing nested checkpoint structures (dicts, lists, tensors, plain values) with a
reference, naming the key path of the first difference (`like`), and integer fields."""

from __future__ import annotations

from numbers import Real
from typing import Any

import torch
from torch import Tensor

SCALARS = (type(None), bool, int, float, str)
ANY = object()  # in a reference: any value (checked by its own rule)


def kind(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def describe_tensor(key: str, got: Tensor, shape: tuple, dtype: torch.dtype) -> str | None:
    """The problem of tensor `got` where one of (shape, dtype) is expected, or None."""
    if tuple(got.shape) != tuple(shape):
        return f"{key} has shape {tuple(got.shape)}, expected {tuple(shape)}"
    if got.dtype != dtype:
        return f"{key} has dtype {got.dtype}, expected {dtype}"
    return None


def like(ref: Any, got: Any, key: str, finite: bool = False) -> None:
    """`got` has the structure of `ref`: the same dict keys and list lengths, tensors of the
    same shape and dtype (finite ones with `finite`), scalars of the same kind (any number
    for a number; a None in `ref` takes any scalar, ANY anything). Raises ValueError naming
    the key path."""
    if ref is ANY:
        return
    if isinstance(ref, Tensor):
        if not isinstance(got, Tensor):
            raise ValueError(f"{key} is {kind(got)}, expected a tensor")
        problem = describe_tensor(key, got, tuple(ref.shape), ref.dtype)
        if problem:
            raise ValueError(problem)
        if finite and got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise ValueError(f"{key} holds NaN or inf")
    elif isinstance(ref, dict):
        if not isinstance(got, dict):
            raise ValueError(f"{key} is {kind(got)}, expected a dict")
        missing = [k for k in ref if k not in got]
        if missing:
            raise ValueError(f"{key} lacks {', '.join(map(repr, missing))}")
        extra = [k for k in got if k not in ref]
        if extra:
            raise ValueError(f"{key} has unexpected {', '.join(map(repr, extra))}")
        for k in ref:
            like(ref[k], got[k], f"{key}.{k}", finite)
    elif isinstance(ref, list | tuple):
        if not isinstance(got, list | tuple):
            raise ValueError(f"{key} is {kind(got)}, expected a list")
        if len(got) != len(ref):
            raise ValueError(f"{key} has {len(got)} entries, expected {len(ref)}")
        for i, (r, g) in enumerate(zip(ref, got, strict=True)):
            like(r, g, f"{key}[{i}]", finite)
    elif ref is None:
        if not isinstance(got, SCALARS):
            raise ValueError(f"{key} is {kind(got)}, expected a plain value")
    elif isinstance(ref, bool) or not isinstance(ref, Real):
        if type(got) is not type(ref):
            raise ValueError(f"{key} is {kind(got)}, expected a {type(ref).__name__}")
    elif isinstance(got, bool) or not isinstance(got, Real):
        raise ValueError(f"{key} is {kind(got)}, expected a number")


def integer(value: Any, key: str, low: int = 0, high: int | None = None) -> int:
    """`value` as an int in [low, high]; ValueError naming `key` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} is {kind(value)} {value!r}, expected an integer")
    if value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{key} is {value}, expected an integer {span}")
    return value


def check_optimizer_state(opt: torch.optim.Optimizer, saved: Any, key: str) -> None:
    """`saved` (a checkpoint's) can be `opt.load_state_dict`'s argument: param groups like
    `opt`'s own, and per-parameter state whose tensors are 0-d or of their parameter's shape
    and dtype, all finite. Raises ValueError naming the key path."""
    own = opt.state_dict()
    like({"state": ANY, "param_groups": ANY}, saved, key)
    groups = saved["param_groups"]
    if not isinstance(groups, list):
        raise ValueError(f"{key}.param_groups is {kind(groups)}, expected a list")
    like([{k: ANY for k in g} for g in own["param_groups"]], groups, f"{key}.param_groups")
    params: dict[Any, Tensor] = {}
    for g, (mine, theirs) in enumerate(zip(opt.param_groups, groups, strict=True)):
        ids = theirs["params"]
        if not isinstance(ids, list) or len(ids) != len(mine["params"]):
            raise ValueError(
                f"{key}.param_groups[{g}].params is not a list of {len(mine['params'])} ids"
            )
        params.update(zip(ids, mine["params"], strict=True))
        for name, value in theirs.items():
            if name != "params":
                like(own["param_groups"][g][name], value, f"{key}.param_groups[{g}].{name}")
    if not isinstance(saved["state"], dict):
        raise ValueError(f"{key}.state is {kind(saved['state'])}, expected a dict")
    for pid, entry in saved["state"].items():
        if pid not in params:
            raise ValueError(f"{key}.state has the parameter id {pid!r}, not in param_groups")
        if not isinstance(entry, dict):
            raise ValueError(f"{key}.state.{pid} is {kind(entry)}, expected a dict")
        p = params[pid]
        for name, t in entry.items():
            where = f"{key}.state.{pid}.{name}"
            if not isinstance(t, Tensor):
                if t is not None and not isinstance(t, int | float):
                    raise ValueError(f"{where} is {kind(t)}, expected a tensor")
                continue
            if t.dim() > 0:
                problem = describe_tensor(where, t, tuple(p.shape), p.dtype)
                if problem:
                    raise ValueError(problem)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where} holds NaN or inf")
