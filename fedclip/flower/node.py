"""What a Flower node runs: one fedclip client, with the in-process loop's own code.

A node is told its client id (and, at a real site, where its data lives) by its node config;
the run's config comes from the server. `NodeFederation` builds that one client exactly as
`Federation` builds client k (same seeds, same partition of the data the node loads) and
runs its turns with `Federation.client_turn` and its evaluations with
`Federation.evaluate_one`, so a node computes bit for bit what `fedclip fit` computes for
that client. Nothing here imports Flower.
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.utilities.seed import seed_everything

from fedclip.backbone import load_backbone
from fedclip.cli import build_fit_config, fit_parser
from fedclip.config import FitConfig
from fedclip.data.federated import FederatedData
from fedclip.errors import NodeConfigError
from fedclip.federation import Federation, check_config, failure_reason
from fedclip.privacy import DifferentialPrivacy
from fedclip.strategies.base import Payload

CLIENT_ID = "client-id"
DATA_ROOT = "data-root"
SIMULATION_ID = "partition-id"  # what Flower's simulation gives each node instead


def node_identity(node_config: Mapping[str, Any]) -> tuple[int, str | None]:
    """The client id and data root of a node, from its node config.

    `client-id` (an integer >= 0) is required; in Flower's simulation, which gives nodes
    only `partition-id`, that is used instead. `data-root` (optional, a folder) replaces the
    data set's root folder on this node.
    """
    key = CLIENT_ID if CLIENT_ID in node_config else SIMULATION_ID
    if key not in node_config:
        raise NodeConfigError(
            f"this SuperNode has no {CLIENT_ID}: start it with --node-config "
            f"'{CLIENT_ID}=K' (K: its fedclip client, 0 to data.num_clients - 1)"
        )
    client = node_config[key]
    if isinstance(client, bool) or not isinstance(client, int) or client < 0:
        raise NodeConfigError(f"{key} must be an integer >= 0, got {client!r}")
    root = node_config.get(DATA_ROOT)
    if root is not None and (not isinstance(root, str) or not root.strip()):
        raise NodeConfigError(
            f"{DATA_ROOT} must be a folder path in quotes (--node-config "
            f"'{DATA_ROOT}=\"/srv/data\"'), got {root!r}"
        )
    return client, root


def site_config(plain: dict[str, Any], data_root: str | None) -> FitConfig:
    """The run's config on this node: the server's resolved config, parsed as `fedclip fit`
    parses a config file, with the data set's root folder replaced by `data_root`."""
    plain = copy.deepcopy(plain)
    if data_root is not None:
        dataset = (plain.get("data") or {}).get("dataset") or {}
        init_args = dataset.get("init_args")
        if not isinstance(init_args, dict) or "root" not in init_args:
            raise NodeConfigError(
                f"{DATA_ROOT} is set, but the data set {dataset.get('class_path')} has no root "
                "folder to replace"
            )
        init_args["root"] = os.path.abspath(os.path.expanduser(data_root))
    parser = fit_parser()
    cfg, _ = build_fit_config(parser, parser.parse_object(plain))
    return cfg


class NodeFederation(Federation):
    """A federation of which this process holds one client: a Flower node's share.

    Builds the data (or takes `data`, the same config's FederatedData that another node in
    this process built), the backbone, client `client_id` and a strategy that only checks
    this client's uploads; every method it runs is `Federation`'s own. `fabric.devices` and
    `fabric.num_nodes` are ignored: a node trains its client on one device.
    """

    def __init__(self, cfg: FitConfig, client_id: int, data: FederatedData | None = None) -> None:
        # Not Federation.__init__, which builds every client: these are the parts one
        # client's turn and evaluation use, built in the same order with the same seeds.
        check_config(cfg)
        num_clients = cfg.data.num_clients
        if not 0 <= client_id < num_clients:
            raise NodeConfigError(
                f"{CLIENT_ID} {client_id} is not a client of this run (data.num_clients="
                f"{num_clients}: 0 to {num_clients - 1})"
            )
        self.cfg = cfg
        self.run_dir = None
        self.show_progress = False
        seed_everything(cfg.seed, verbose=False)
        self.data = data if data is not None else FederatedData(cfg.data, cfg.seed)
        self.clip = load_backbone(cfg.backbone)  # once per process (load_backbone caches)
        self.fabric = Fabric(
            accelerator=cfg.fabric.accelerator, devices=1, precision=cfg.fabric.precision
        )
        self.world_size, self.rank = 1, 0
        self.clip.to(self.fabric.device)
        self.classnames = self.data.classnames
        learner_cls = type(cfg.learner)
        if self.data.clip is not self.clip:  # shared data is bound once
            self.data.bind(self.clip, learner_cls.inputs)
        self.client_id = client_id
        client = self._make_client(client_id)
        self.clients = {client_id: client}  # indexed by client id, like Federation's list
        self.initial = client.upload()
        self.strategy = copy.deepcopy(cfg.strategy)
        self.strategy.initialize(
            self.initial, num_clients, cfg.seed, schema=dict(client.learner.named_parameters())
        )
        self.privacy = DifferentialPrivacy(cfg.privacy, num_clients, cfg.seed)
        self._stop = None
        self.loaded = False
        self._fresh = copy.deepcopy(client.client_state())  # before any message

    @property
    def client(self):
        return self.clients[self.client_id]

    def describe(self) -> dict[str, Any]:
        """What the server needs to know of this client: its initial shared state, the
        tensors it may upload (names, shapes, dtypes), sample and class counts, class names.
        No sample leaves the node."""
        k = self.client_id
        part = self.data.summary()
        schema = {
            name: [list(p.shape), str(p.dtype).removeprefix("torch.")]
            for name, p in self.client.learner.named_parameters()
        }
        return {
            "client": k,
            "initial": self.initial,
            "schema": schema,
            "num_train": self.data.num_train(k),
            "num_test": len(self.data.test_parts[k]),
            "row": part["clients"][k],
            "train_counts": part["train_counts"][k],
            "test_counts": part["test_counts"][k],
            "dataset": part["dataset"],
            "partitioner": part["partitioner"],
            "classnames": part["classnames"],
            "multilabel": bool(self.data.multilabel),
            "base_to_novel": bool(self.data.cfg.base_to_novel),
            "metric": self.metric,
        }

    def train(self, rnd: int, payload: Payload | None) -> tuple[dict[str, Any], str | None]:
        """The client's turn of round `rnd` (`Federation.client_turn`): what it did, and
        None or the one-line reason it failed (it was then rolled back)."""
        out, error = self.client_turn(self.client_id, rnd, payload)
        return out, None if error is None else failure_reason(error)

    def evaluate(self, payload: Payload | None) -> Any:
        """The client's evaluation after taking its evaluation payload, as in
        `Federation.evaluate`: accuracy, (scores, targets), or base-to-novel counts."""
        self.client.receive(self.client.wanted(payload))
        return self.evaluate_one(self.client_id)

    def experts(self) -> list[int] | None:
        """pFedMoAP: the client ids of the experts the client holds (None for others)."""
        ids = getattr(self.client.learner, "expert_ids", None)
        return None if ids is None else [int(i) for i in ids]

    def state_bytes(self) -> bytes:
        """The client's personal state (learner, optimizers, schedulers), serialised."""
        buffer = io.BytesIO()
        torch.save(self.client.client_state(), buffer)
        return buffer.getvalue()

    def load_state_bytes(self, data: bytes | None) -> None:
        """Restore a personal state from `state_bytes` (plain tensors only: weights_only);
        None: the state the client had before its first message."""
        if data is None:
            state = copy.deepcopy(self._fresh)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        self._load_client(self.client_id, state)


# The expensive parts of a node (backbone, data, frozen-feature cache, the client's modules)
# live as long as the process: Flower's simulation keeps its worker processes across messages
# (one process serves many nodes, which share one FederatedData, as in `Federation`), while a
# SuperNode starts a new process per message. Keyed by run, so a new run drops the old one.
_NODES: dict[tuple[int, str, int, str | None], NodeFederation] = {}
_DATA: dict[tuple[int, str, str | None], FederatedData] = {}


def node_for(
    run_id: int, plain: dict[str, Any], fingerprint: str, client_id: int, data_root: str | None
) -> NodeFederation:
    """This process's NodeFederation of client `client_id` in run `run_id` (built once)."""
    key = (run_id, fingerprint, client_id, data_root)
    if key not in _NODES:
        for cache in (_NODES, _DATA):
            for old in [k for k in cache if k[0] != run_id]:
                del cache[old]
        cfg = site_config(plain, data_root)
        data = _DATA.get((run_id, fingerprint, data_root))
        _NODES[key] = NodeFederation(cfg, client_id, data)
        _DATA[(run_id, fingerprint, data_root)] = _NODES[key].data
    return _NODES[key]
