"""Share learned prompts as one `.safetensors` file, and load them back.

`fedclip export --run_dir runs/NAME` reads the run's `config.yaml` and its last checkpoint
(nothing else: no data, no backbone) and writes `runs/NAME/prompts.safetensors`:

- `global/<key>`: the strategy's global shared state (what every client downloads), absent
  when the strategy has none (LocalOnly);
- `client/<k>/<key>`: every tensor of client k's learner `state_dict()` (its personal
  prompts: the local context, pFedMoAP's gating network and held experts, FedMVP's
  PromptFormer, ...). A learner's extra state that is a dict of tensors is stored as
  `client/<k>/_extra_state/<name>`; anything that is not a tensor is left out.

The file's metadata (str -> str) says what the tensors belong to: `format`
("fedclip-prompts"), `version` ("1"), `learner` / `strategy` / `backbone` (JSON of the run's
config sections), `classnames` (JSON list of the classes the prompts were trained on),
`multilabel`, `seed`, `round` (rounds completed), `partial` (the checkpoint holds a round
stopped midway), `num_clients` and `clients` (JSON list of the exported client ids). safetensors holds raw tensors and a JSON header only: loading one never runs
code.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentParser
from torch import Tensor

from fedclip.checkpoint import atomic_path, file_mode, load_checkpoint
from fedclip.errors import CheckpointError, DataError, UsageError
from fedclip.parsing import command_parser, parse_args

log = logging.getLogger(__name__)

FORMAT = "fedclip-prompts"
VERSION = "1"
EXTRA = "_extra_state"  # the state_dict key of a module's get_extra_state()


# ---- export ------------------------------------------------------------------------------
def _parse_clients(clients: str | list[int] | tuple[int, ...], num_clients: int) -> list[int]:
    """'all', 'none', '0,2' or a list of ids -> sorted ids; unknown ids are a UsageError."""
    if isinstance(clients, str):
        text = clients.strip().lower()
        if text == "all":
            return list(range(num_clients))
        if text in {"none", ""}:
            return []
        try:
            ids = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise UsageError(
                f"--clients must be 'all', 'none' or comma-separated client ids, got {clients!r}"
            ) from None
    else:
        ids = [int(k) for k in clients]
    unknown = sorted({k for k in ids if not 0 <= k < num_clients})
    if unknown:
        raise UsageError(
            f"unknown client ids {unknown}: the run has {num_clients} clients "
            f"(0..{num_clients - 1})"
        )
    return sorted(set(ids))


def _plain(t: Tensor) -> Tensor:
    """A contiguous CPU copy with its own storage (safetensors refuses shared storage)."""
    return t.detach().to("cpu").contiguous().clone()


def _flatten_learner(prefix: str, state: dict[str, Any]) -> tuple[dict[str, Tensor], list[str]]:
    """The tensors of a learner state_dict under `prefix`; a dict of tensors (extra state)
    becomes `<key>/<name>`. Returns (tensors, names of the entries left out)."""
    out: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in state.items():
        if isinstance(value, Tensor):
            out[f"{prefix}{key}"] = _plain(value)
        elif (
            isinstance(value, dict)
            and value
            and all(isinstance(k, str) and "/" not in k for k in value)
            and all(isinstance(v, Tensor) for v in value.values())
        ):
            for name, t in value.items():
                out[f"{prefix}{key}/{name}"] = _plain(t)
        else:
            skipped.append(key)
    return out, skipped


def _read_run(run_dir: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(FitConfig, plain config, saved config.yaml) of a run folder; builds no data/model."""
    from fedclip.config import read_run_config  # lazy: it builds the whole parser

    cfg, plain = read_run_config(run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    return cfg, plain, saved


def _classnames(cfg: Any) -> list[str] | None:
    """The classes the clients trained on (the base half under base-to-novel), read from the
    data set's metadata without partitioning or decoding images; None if it is missing."""
    import math

    try:
        names = list(cfg.data.dataset.classnames)
    except DataError as e:
        log.warning("export: class names unavailable (%s); left out of the metadata", e)
        return None
    if cfg.data.base_to_novel:
        names = names[: math.ceil(len(names) / 2)]
    return names


def _section(saved: dict[str, Any], key: str) -> dict[str, Any]:
    value = saved.get(key) or {}
    return {"class_path": value.get("class_path"), "init_args": value.get("init_args") or {}}


def _save_atomic(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, file_mode())  # safetensors writes a file of its own, 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())


def export_prompts(
    run_dir: str | Path,
    out: str | Path | None = None,
    clients: str | list[int] = "all",
    checkpoint: str | Path | None = None,
) -> Path:
    """Write the prompts of a `fedclip fit` run folder to one `.safetensors` file.

    run_dir: the run folder (config.yaml + checkpoints/last.ckpt).
    out: the file to write (default: run_dir/prompts.safetensors); replaced atomically.
    clients: 'all', 'none', comma-separated ids ('0,3') or a list of ids: whose personal
        state (`client/<k>/...`) to include. The global state is always included when the
        strategy has one.
    checkpoint: the checkpoint to read (default: run_dir/checkpoints/last.ckpt); it must
        have been written by the run's config.

    Returns the path written. Raises UsageError (bad folder, client ids or --out, or nothing
    to export) or CheckpointError (missing, corrupt, foreign or mismatching checkpoint).
    """
    from fedclip.federation.settings import config_fingerprint

    run_dir = Path(run_dir)
    cfg, plain, saved = _read_run(run_dir)
    ckpt_path = Path(checkpoint) if checkpoint else run_dir / "checkpoints" / "last.ckpt"
    state = load_checkpoint(ckpt_path)
    if state.get("fingerprint") != config_fingerprint(plain):
        raise CheckpointError(
            f"{ckpt_path} was written by a different configuration than {run_dir / 'config.yaml'}"
        )
    from fedclip.federation.checks import check_saved_run

    check_saved_run(state, ckpt_path, cfg.data.num_clients)
    client_states = state["clients"]
    ids = _parse_clients(clients, len(client_states))

    tensors: dict[str, Tensor] = {}
    strategy_state = state.get("strategy") or {}
    global_state = strategy_state.get("global_state")
    # A strategy that collects no uploads (LocalOnly) never updates its global state: what it
    # holds is only the common initialisation, not something learned.
    if global_state and type(cfg.strategy).collects_uploads:
        for key, value in global_state.items():
            tensors[f"global/{key}"] = _plain(value)
    skipped: set[str] = set()
    for k in ids:
        flat, left_out = _flatten_learner(f"client/{k}/", client_states[k]["learner"])
        tensors.update(flat)
        skipped.update(left_out)
    if not tensors:
        raise UsageError(
            f"nothing to export from {run_dir}: the strategy has no global state and the "
            f"selected clients ({clients}) hold no learned tensors"
        )
    if skipped:
        log.warning("export: non-tensor learner entries left out: %s", ", ".join(sorted(skipped)))

    multilabel = bool(getattr(cfg.data.dataset, "multilabel", False))
    backbone = {k: v for k, v in (saved.get("backbone") or {}).items() if k != "cache_dir"}
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "learner": json.dumps(_section(saved, "learner")),
        "strategy": json.dumps(_section(saved, "strategy")),
        "backbone": json.dumps(backbone),
        "multilabel": json.dumps(multilabel),
        "multilabel_config": json.dumps(saved.get("multilabel") or {}),
        "seed": str(int(saved.get("seed", 0))),
        "round": str(int(state["round"])),
        "num_clients": str(len(client_states)),
        "clients": json.dumps(ids),
        # a checkpoint written when a run was stopped mid-round holds that round so far
        "partial": json.dumps(state.get("partial") is not None),
    }
    names = _classnames(cfg)
    if names is not None:
        metadata["classnames"] = json.dumps(names)
    path = Path(out) if out else run_dir / "prompts.safetensors"
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder; give a file name such as prompts.safetensors")
    try:
        _save_atomic(tensors, metadata, path)
    except OSError as e:  # e.g. --out under a file, or a folder the user cannot write
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from e
    return path


# ---- loading -----------------------------------------------------------------------------
def load_prompts(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written by `export_prompts`, on the CPU.

    Anything else (missing file, not safetensors or corrupt, another format tag, another
    version) raises CheckpointError with a one-line message naming the file.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"prompts file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError, header/JSON errors, truncated data, ...
        detail = " ".join(str(e).split())[:160]
        raise CheckpointError(
            f"{path} is not a safetensors file or is corrupt ({type(e).__name__}: {detail})"
        ) from None
    if metadata.get("format") != FORMAT:
        found = metadata.get("format")
        raise CheckpointError(
            f"{path} is not a {FORMAT} file "
            + (f"(format {found!r})" if found else "(no fedclip metadata)")
        )
    if metadata.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has {FORMAT} version {metadata.get('version')!r}, expected {VERSION!r}"
        )
    for key in tensors:
        parts = key.split("/")
        if not (
            (parts[0] == "global" and len(parts) >= 2)
            or (parts[0] == "client" and len(parts) >= 3 and parts[1].isdigit())
        ):
            raise CheckpointError(f"{path}: unexpected tensor {key!r} (not global/ or client/K/)")
    return tensors, metadata


def client_ids(tensors: dict[str, Tensor]) -> list[int]:
    """The client ids that have personal state in `tensors`."""
    return sorted({int(k.split("/")[1]) for k in tensors if k.startswith("client/")})


@torch.no_grad()
def apply_prompts(learner: Any, tensors: dict[str, Tensor], client: int | None = None) -> None:
    """Load exported prompts into a set-up learner of the same class and arguments.

    client None: the global shared state (`global/*`) through `load_shared_state`; every key
    must be a tensor of the learner's state, with the same shape (parameters shared only in a
    later phase, such as FedMVP's LoRA factors, are copied in directly); shared keys the
    file lacks keep their values (as for a download). client k: client k's whole learner state
    (`client/<k>/*`) through `load_state_dict`: the file's tensors must be exactly the
    learner's tensors, with the same shapes (extra state the export left out keeps its
    value). A mismatch raises CheckpointError naming the key.
    """
    if getattr(learner, "_clip", None) is None:
        raise ValueError(f"{type(learner).__name__}.setup() must be called before apply_prompts")
    own = learner.state_dict()
    if client is None:
        state = {k[len("global/") :]: v for k, v in tensors.items() if k.startswith("global/")}
        if not state:
            raise CheckpointError("no global prompts in the file (the run's strategy has none)")
        for key, value in state.items():
            if not isinstance(own.get(key), Tensor):
                raise CheckpointError(
                    f"global/{key}: not a tensor of {type(learner).__name__} "
                    f"(it shares {sorted(learner.shared_keys())})"
                )
            _check_shape(f"global/{key}", value, own[key])
        shared = set(learner.shared_keys())
        learner.load_shared_state({k: v for k, v in state.items() if k in shared})
        for key, value in state.items():  # e.g. FedMVP's LoRA factors, shared only later
            if key not in shared:
                own[key].copy_(value)
        learner.invalidate_cache()
        return

    prefix = f"client/{int(client)}/"
    flat = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not flat:
        have = client_ids(tensors)
        raise CheckpointError(f"no client {client} in the file (clients: {have or 'none'})")
    state: dict[str, Any] = {}
    for key, value in flat.items():
        if "/" in key:
            head, name = key.split("/", 1)
            if not head.endswith(EXTRA) or head not in own:
                raise CheckpointError(
                    f"{prefix}{key}: {type(learner).__name__} has no extra state {head!r}"
                )
            state.setdefault(head, {})[name] = value
        else:
            state[key] = value
    for key, value in state.items():
        if key not in own:
            raise CheckpointError(f"{prefix}{key}: not in {type(learner).__name__}'s state")
        if isinstance(value, Tensor):
            if not isinstance(own[key], Tensor):
                raise CheckpointError(f"{prefix}{key}: the learner's entry is not a tensor")
            _check_shape(prefix + key, value, own[key])
    missing = sorted(k for k, v in own.items() if isinstance(v, Tensor) and k not in state)
    if missing:
        raise CheckpointError(f"{prefix}{missing[0]}: missing from the file")
    try:
        learner.load_state_dict(state, strict=False)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"{prefix}: cannot load into {type(learner).__name__}: {' '.join(str(e).split())}"
        ) from None
    learner.invalidate_cache()  # cached class features of the old prompts


def _check_shape(name: str, value: Tensor, own: Tensor) -> None:
    if tuple(value.shape) != tuple(own.shape):
        raise CheckpointError(
            f"{name}: shape {tuple(value.shape)} in the file, the learner has {tuple(own.shape)}"
        )


def _metadata_json(metadata: dict[str, str], key: str) -> Any:
    """A JSON entry of a prompts file's metadata; CheckpointError when absent or not JSON
    (a file that `export_prompts` did not write)."""
    try:
        return json.loads(metadata[key])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise CheckpointError(f"the prompts file's metadata has no valid {key!r} entry") from None


def build_learner(
    metadata: dict[str, str],
    clip: Any = None,
    classnames: list[str] | None = None,
    client_id: int | None = None,
) -> Any:
    """A fresh, set-up learner of the class, arguments, task and classes in `metadata`
    (ready for `apply_prompts`). clip: the frozen backbone (default: the one the metadata
    names, loaded with `fedclip.backbone.load_backbone`); classnames: the classes to
    classify (default: the metadata's); client_id: the client it is built for (learners
    whose clients differ by design, e.g. in prompt length). Only PromptLearner subclasses
    are built."""
    from fedclip.backbone import BackboneConfig, load_backbone
    from fedclip.learners.base import MultiLabelConfig, PromptLearner, make_learner

    spec = _metadata_json(metadata, "learner")
    if not isinstance(spec, dict):
        raise CheckpointError(f"the file's learner metadata is not a JSON object: {spec!r}")
    module, _, name = str(spec.get("class_path") or "").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, PromptLearner)):
        raise CheckpointError(f"learner {spec.get('class_path')!r} is not a fedclip PromptLearner")
    if classnames is None:
        if "classnames" not in metadata:
            raise UsageError("the file records no class names: pass classnames")
        classnames = _metadata_json(metadata, "classnames")
    if clip is None:
        try:
            backbone = BackboneConfig(**_metadata_json(metadata, "backbone"))
        except TypeError as e:  # keys this version's BackboneConfig does not have
            raise CheckpointError(f"the prompts file's backbone metadata does not fit: {e}") from e
        clip = load_backbone(backbone)
    try:  # the run's multi-label loss settings (files written before they were recorded: defaults)
        ml_cfg = MultiLabelConfig(**json.loads(metadata.get("multilabel_config", "{}")))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the prompts file's multilabel metadata does not fit: {e}") from e
    learner = make_learner(
        cls(**spec.get("init_args", {})),
        clip,
        list(classnames),
        int(metadata.get("seed", "0")),
        multilabel=json.loads(metadata.get("multilabel", "false")),
        multilabel_cfg=ml_cfg,
        client_id=client_id,
    )
    return learner.eval()


def load_learner(
    path: str | Path,
    client: int | None = None,
    clip: Any = None,
    classnames: list[str] | None = None,
) -> Any:
    """`build_learner` + `apply_prompts` for the file at `path`: the global prompts
    (client None) or client `client`'s personal ones, in eval mode."""
    tensors, metadata = load_prompts(path)
    learner = build_learner(metadata, clip, classnames, client_id=client)
    apply_prompts(learner, tensors, client)
    return learner


# ---- the command -------------------------------------------------------------------------
def export_parser() -> ArgumentParser:
    parser = command_parser(
        "fedclip export", "Write the learned prompts of a run as one .safetensors file for sharing."
    )
    from fedclip.config import add_run_arguments  # lazy: config imports the whole package

    add_run_arguments(parser)
    parser.add_argument(
        "--out",
        type=str | None,
        default=None,
        help="file to write (default: RUN_DIR/prompts.safetensors)",
    )
    parser.add_argument(
        "--clients",
        type=str,
        default="all",
        help="personal state of which clients: 'all', 'none' or comma-separated ids (0,3)",
    )
    return parser


def cmd_export(argv: list[str]) -> int:
    parser = export_parser()
    ns = parse_args(parser, argv)
    path = export_prompts(ns.run_dir, ns.out, ns.clients, ns.checkpoint)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata() or {}
    n_global = sum(k.startswith("global/") for k in keys)
    ids = json.loads(meta.get("clients", "[]"))
    who = ", ".join(map(str, ids)) if ids else "none"
    print(
        f"wrote {path}: {len(keys)} tensors ({n_global} global; clients {who}), "
        f"{path.stat().st_size} bytes, round {meta.get('round')}"
    )
    return 0
