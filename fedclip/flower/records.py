"""What travels in Flower messages: fedclip's payloads, turns and evaluations as records.

Tensors travel in ArrayRecords (numpy `.npy` bytes: exact, every dtype numpy has), numbers
in MetricRecords, everything else in ConfigRecords (short JSON where the shape is nested).
Each `*_record(s)` function has a `read_*` inverse, and a round trip gives back equal values
(floats bit for bit), so the server sees exactly what the in-process loop would.

Server to node, every message: "fedclip" (the resolved config, its fingerprint, the round,
the digest of the client's personal state as the server holds it); train and evaluate
messages add the client's Payload ("payload.*"), and, when the node must be given its state
(after a resume, or a node that lost it), "state". Node to server: the describe reply
("initial", "info"), the train reply ("upload", "turn", "metrics", "result_metrics",
"turn.meta") and the evaluate reply ("eval", "eval.meta"); every reply adds "state", the
client's personal state after the message, which the server keeps for its checkpoints.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import torch
import yaml
from torch import Tensor

from fedclip.federation.records import ClientOutcome, Upload
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
def header_record(
    plain: dict[str, Any], fingerprint: str, rnd: int, state_digest: str = ""
) -> ConfigRecord:
    """The resolved run config (nodes need no file), its fingerprint, the round, and the
    digest of the personal state the server holds for the node's client ("" before the
    node first answered)."""
    config = yaml.safe_dump(plain, sort_keys=False)
    return ConfigRecord(
        {"config": config, "fingerprint": fingerprint, "round": int(rnd), "digest": state_digest}
    )


def read_header(content: RecordDict) -> tuple[dict[str, Any], str, int, str]:
    """(plain config, fingerprint, round, state digest) of `header_record`."""
    header = content["fedclip"]
    return (
        yaml.safe_load(header["config"]),
        str(header["fingerprint"]),
        int(header["round"]),
        str(header["digest"]),
    )


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
            "has_global": payload.global_state is not None,
            "models": json.dumps(sorted(payload.models)),
            "extras": json.dumps(plain),
            "tensor_extras": json.dumps(tensor_extras),
        }
    )
    if payload.state is not None:
        content["payload.state"] = tensors_record(payload.state)
    if payload.global_state is not None:
        content["payload.global"] = tensors_record(payload.global_state)
    if arrays:
        content["payload.extras"] = tensors_record(arrays)
    for name, state in payload.models.items():
        content[f"payload.model.{name}"] = tensors_record(state)


def read_payload(content: RecordDict) -> Payload | None:
    """The Payload of `put_payload` (None when the message carries none)."""
    if "payload.meta" not in content:
        return None
    meta = content["payload.meta"]
    state = read_tensors(content["payload.state"]) if meta["has_state"] else None
    has_global = "has_global" in meta and bool(meta["has_global"])
    global_state = read_tensors(content["payload.global"]) if has_global else None
    extras: dict[str, Any] = json.loads(meta["extras"])
    arrays = read_tensors(content["payload.extras"]) if "payload.extras" in content else {}
    for name, keys in json.loads(meta["tensor_extras"]).items():
        extras[name] = arrays[name] if keys is None else {k: arrays[f"{name}/{k}"] for k in keys}
    names = json.loads(meta["models"]) if "models" in meta else []
    models = {n: read_tensors(content[f"payload.model.{n}"]) for n in names}
    return Payload(state=state, extras=extras, global_state=global_state, models=models)


# ---- personal state ----------------------------------------------------------------------------
def state_bytes(state: dict[str, Any]) -> bytes:
    """A client's personal state (learner, optimizers, schedulers), serialised."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def read_state_bytes(data: bytes) -> dict[str, Any]:
    """The state of `state_bytes` (plain tensors and containers only: weights_only)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def digest(data: bytes) -> str:
    """What identifies a personal state: the SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def put_state(content: RecordDict, data: bytes) -> None:
    """Attach a client's personal state to a message (server to node after a resume, or a
    node's reply)."""
    content["state"] = ConfigRecord({"bytes": data, "digest": digest(data)})


def read_state(content: RecordDict) -> tuple[bytes, str] | None:
    """(bytes, digest) of `put_state`, or None when the message carries no state."""
    if "state" not in content:
        return None
    record = content["state"]
    return bytes(record["bytes"]), str(record["digest"])


# ---- node to server ----------------------------------------------------------------------------
def describe_record(info: dict[str, Any]) -> RecordDict:
    """A node's answer to the set-up query (`NodeClient.describe`)."""
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


def stale_record() -> RecordDict:
    """A node's reply when it does not hold the personal state the server expects (it
    restarted, or the server resumed from a checkpoint) and the message carries none."""
    return RecordDict({"stale": ConfigRecord({"stale": True})})


def is_stale(content: RecordDict) -> bool:
    return "stale" in content


def turn_record(outcome: ClientOutcome) -> RecordDict:
    """A client's turn (`ClientRuntime.turn`) as a reply."""
    counts = {"down": outcome.down, "up": outcome.up, "loss": outcome.loss}
    meta: dict[str, Any] = {"released": outcome.released, "report": json.dumps(outcome.report)}
    if outcome.error is not None:
        meta["error"] = outcome.error
        meta["traceback"] = outcome.traceback or ""
    content = RecordDict(
        {"turn": MetricRecord(counts), "metrics": MetricRecord(dict(outcome.metrics))}
    )
    if outcome.upload is not None:
        content["upload"] = tensors_record(outcome.upload.state)
        content["result_metrics"] = MetricRecord(
            {**outcome.upload.metrics, "num_samples": int(outcome.upload.num_samples)}
        )
    content["turn.meta"] = ConfigRecord(meta)
    return content


def read_turn(content: RecordDict, client: int) -> ClientOutcome:
    """The ClientOutcome of `turn_record`."""
    counts = content["turn"]
    meta = content["turn.meta"]
    outcome = ClientOutcome(
        client,
        down=int(counts["down"]),
        up=int(counts["up"]),
        loss=float(counts["loss"]),
        metrics=dict(content["metrics"]),
        released=bool(meta["released"]),
        error=meta.get("error"),
        traceback=meta.get("traceback") or None,
        report=json.loads(meta["report"]),
    )
    if "upload" in content:
        metrics = dict(content["result_metrics"])
        num_samples = int(metrics.pop("num_samples"))
        outcome.upload = Upload(read_tensors(content["upload"]), num_samples, metrics)
    return outcome


def eval_record(result: dict[str, Any], report: dict[str, Any]) -> RecordDict:
    """A client's evaluation (`ClientRuntime.evaluate_one`) as a reply: {part: (correct,
    total)}, or for multi-label data {part: (scores, targets)}."""
    meta: dict[str, Any] = {"report": json.dumps(report), "parts": json.dumps(list(result))}
    if any(isinstance(v[0], Tensor) for v in result.values()):
        meta["kind"] = "multilabel"
        record: Any = tensors_record(
            {f"{part}/{name}": t for part, pair in result.items()
             for name, t in zip(("scores", "targets"), pair, strict=True)}
        )  # fmt: skip
    else:
        meta["kind"] = "counts"
        record = MetricRecord({k: [int(c), int(t)] for k, (c, t) in result.items()})
    return RecordDict({"eval": record, "eval.meta": ConfigRecord(meta)})


def read_eval(content: RecordDict) -> tuple[dict[str, Any], dict[str, Any]]:
    """(evaluation result, the learner's report) of `eval_record`."""
    meta = content["eval.meta"]
    report = json.loads(meta["report"])
    record = content["eval"]
    if meta["kind"] == "multilabel":
        tensors = read_tensors(record)
        parts = json.loads(meta["parts"])
        return {p: (tensors[f"{p}/scores"], tensors[f"{p}/targets"]) for p in parts}, report
    return {k: (int(v[0]), int(v[1])) for k, v in record.items()}, report
