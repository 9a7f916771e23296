"""What travels in Flower messages: fedclip's payloads, turns and evaluations as records.

Tensors travel in ArrayRecords (numpy `.npy` bytes: exact, every dtype numpy has), numbers
in MetricRecords, everything else in ConfigRecords (short JSON where the shape is nested).
Each `*_record(s)` function has a `read_*` inverse, and a round trip gives back equal values
(floats bit for bit), so the server sees exactly what the in-process loop would.

Server to node, every message: "fedclip" (the resolved config, its fingerprint, the round);
train and evaluate messages add the client's Payload ("payload.*"). Node to server: the
describe reply ("initial", "info"), the train reply ("upload", "turn", "metrics",
"result_metrics", "turn.meta") and the evaluate reply ("eval", "eval.meta").
"""

from __future__ import annotations

import json
from typing import Any

import torch
import yaml
from torch import Tensor

from fedclip.flower._flwr import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from fedclip.strategies.base import Payload


# ---- tensors -----------------------------------------------------------------------------------
def tensors_record(tensors: dict[str, Tensor]) -> ArrayRecord:
    """An ArrayRecord holding each tensor (moved to the CPU), keys and order kept."""
    record = ArrayRecord()
    for name, tensor in tensors.items():
        if tensor.dtype == torch.bfloat16:
            raise TypeError(f"{name!r} is bfloat16, which cannot travel as a numpy array")
        record[name] = Array.from_numpy_ndarray(tensor.detach().cpu().contiguous().numpy())
    return record


def read_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    """The tensors of `tensors_record`, on the CPU."""
    return {name: torch.from_numpy(array.numpy()) for name, array in record.items()}


# ---- server to node ----------------------------------------------------------------------------
def header_record(plain: dict[str, Any], fingerprint: str, rnd: int) -> ConfigRecord:
    """The resolved run config (nodes need no file), its fingerprint and the round."""
    config = yaml.safe_dump(plain, sort_keys=False)
    return ConfigRecord({"config": config, "fingerprint": fingerprint, "round": int(rnd)})


def read_header(content: RecordDict) -> tuple[dict[str, Any], str, int]:
    """(plain config, fingerprint, round) of `header_record`."""
    header = content["fedclip"]
    return yaml.safe_load(header["config"]), str(header["fingerprint"]), int(header["round"])


def put_payload(content: RecordDict, payload: Payload | None) -> None:
    """Add a client's download to a message: the global state and the extras, tensors
    (or dicts of tensors, e.g. pFedMoAP's experts) as arrays, the rest as JSON."""
    if payload is None:
        return
    arrays: dict[str, Tensor] = {}
    plain: dict[str, Any] = {}
    tensor_extras: dict[str, list[str] | None] = {}
    for name, value in payload.extras.items():
        if isinstance(value, Tensor):
            arrays[name] = value
            tensor_extras[name] = None
        elif (
            isinstance(value, dict) and value and all(isinstance(v, Tensor) for v in value.values())
        ):
            arrays.update({f"{name}/{key}": v for key, v in value.items()})
            tensor_extras[name] = list(value)
        else:
            plain[name] = value
    content["payload.meta"] = ConfigRecord(
        {
            "has_state": payload.state is not None,
            "extras": json.dumps(plain),
            "tensor_extras": json.dumps(tensor_extras),
        }
    )
    if payload.state is not None:
        content["payload.state"] = tensors_record(payload.state)
    if arrays:
        content["payload.extras"] = tensors_record(arrays)


def read_payload(content: RecordDict) -> Payload | None:
    """The Payload of `put_payload` (None when the message carries none)."""
    if "payload.meta" not in content:
        return None
    meta = content["payload.meta"]
    state = read_tensors(content["payload.state"]) if meta["has_state"] else None
    extras: dict[str, Any] = json.loads(meta["extras"])
    arrays = read_tensors(content["payload.extras"]) if "payload.extras" in content else {}
    for name, keys in json.loads(meta["tensor_extras"]).items():
        extras[name] = arrays[name] if keys is None else {k: arrays[f"{name}/{k}"] for k in keys}
    return Payload(state=state, extras=extras)


# ---- node to server ----------------------------------------------------------------------------
def describe_record(info: dict[str, Any]) -> RecordDict:
    """A node's answer to the set-up query (`NodeFederation.describe`)."""
    rest = {k: v for k, v in info.items() if k != "initial"}
    return RecordDict(
        {
            "initial": tensors_record(info["initial"]),
            "info": ConfigRecord({"json": json.dumps(rest)}),
        }
    )


def read_describe(content: RecordDict) -> dict[str, Any]:
    info = json.loads(content["info"]["json"])
    info["initial"] = read_tensors(content["initial"])
    return info


def turn_record(out: dict[str, Any], error: str | None, experts: list[int] | None) -> RecordDict:
    """A client's turn (`Federation.client_turn`'s record, its failure reason, and the
    experts it now holds) as a reply."""
    counts = {key: out[key] for key in ("down", "up", "loss") if key in out}
    meta: dict[str, Any] = {"released": bool(out.get("released", False))}
    if error is not None:
        meta["error"] = error
    if experts is not None:
        meta["experts"] = json.dumps(experts)
    content = RecordDict(
        {"turn": MetricRecord(counts), "metrics": MetricRecord(dict(out["metrics"]))}
    )
    result = out.get("result")
    if result is not None:
        content["upload"] = tensors_record(result["state"])
        content["result_metrics"] = MetricRecord(
            {**result["metrics"], "num_samples": int(result["num_samples"])}
        )
    content["turn.meta"] = ConfigRecord(meta)
    return content


def read_turn(content: RecordDict) -> tuple[dict[str, Any], str | None, list[int] | None]:
    """(turn record, failure reason or None, experts or None) of `turn_record`."""
    out: dict[str, Any] = {"metrics": dict(content["metrics"])}
    out.update(content["turn"])
    meta = content["turn.meta"]
    if meta["released"]:
        out["released"] = True
    if "upload" in content:
        metrics = dict(content["result_metrics"])
        num_samples = int(metrics.pop("num_samples"))
        out["result"] = {
            "state": read_tensors(content["upload"]),
            "num_samples": num_samples,
            "metrics": metrics,
        }
    experts = json.loads(meta["experts"]) if "experts" in meta else None
    return out, meta.get("error"), experts


def eval_record(result: Any, experts: list[int] | None) -> RecordDict:
    """A client's evaluation (`Federation.evaluate_one`) as a reply: an accuracy, the
    base-to-novel (correct, total) pairs, or multi-label (scores, targets)."""
    meta: dict[str, Any] = {}
    if experts is not None:
        meta["experts"] = json.dumps(experts)
    if isinstance(result, tuple):
        scores, targets = result
        meta["kind"] = "multilabel"
        record: Any = tensors_record({"scores": scores, "targets": targets})
    elif isinstance(result, dict):
        meta["kind"] = "base_to_novel"
        record = MetricRecord({k: [int(c), int(t)] for k, (c, t) in result.items()})
    else:
        meta["kind"] = "acc"
        record = MetricRecord({"acc": float(result)})
    return RecordDict({"eval": record, "eval.meta": ConfigRecord(meta)})


def read_eval(content: RecordDict) -> tuple[Any, list[int] | None]:
    """(evaluation result, experts or None) of `eval_record`."""
    meta = content["eval.meta"]
    experts = json.loads(meta["experts"]) if "experts" in meta else None
    record = content["eval"]
    if meta["kind"] == "multilabel":
        tensors = read_tensors(record)
        return (tensors["scores"], tensors["targets"]), experts
    if meta["kind"] == "base_to_novel":
        return {k: (int(v[0]), int(v[1])) for k, v in record.items()}, experts
    return float(record["acc"]), experts
