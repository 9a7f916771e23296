"""What a Flower node runs: one fedclip client, with the in-process loop's own runtime.

A node is told its client id (and, at a real site, where its data lives) by its node config;
the run's config comes from the server. `NodeClient` builds that one client exactly as
`fedclip fit` builds client k (same seeds, same partition of the data the node loads) and
runs its turns and evaluations with the same `ClientRuntime`. Nothing here imports Flower.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

from fedclip.config import FitConfig, build_fit_config, fit_parser
from fedclip.data.federated import FederatedData
from fedclip.errors import NodeConfigError
from fedclip.federation import ClientOutcome, build_fabric, build_runtime, prepare_data
from fedclip.federation.devices import check_machine
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


class NodeClient:
    """This process's one client of a Flower run: the data (or `data`, the same config's
    FederatedData another node in this process built), the backbone, and a ClientRuntime
    holding client `client_id`, built exactly as `fedclip fit` builds them (same order,
    same seeds), so a node computes bit for bit what `fedclip fit` computes for that client.
    `fabric.devices` and `fabric.num_nodes` are ignored: a node trains on one device.
    """

    def __init__(self, cfg: FitConfig, client_id: int, data: FederatedData | None = None) -> None:
        num_clients = cfg.data.num_clients
        if not 0 <= client_id < num_clients:
            raise NodeConfigError(
                f"{CLIENT_ID} {client_id} is not a client of this run (data.num_clients="
                f"{num_clients}: 0 to {num_clients - 1})"
            )
        self.cfg = cfg
        self.client_id = client_id
        check_machine(cfg.fabric, 1, 1)  # this node's own devices, before its data
        data = prepare_data(cfg, data)
        self.runtime = build_runtime(cfg, data, [client_id], build_fabric(cfg, 1, 1))
        self.data = data
        self.fresh = copy.deepcopy(self.runtime.client_state(client_id))  # before any message

    @property
    def client(self):
        return self.runtime.clients[self.client_id]

    def describe(self) -> dict[str, Any]:
        """What the server needs to know of this client: its initial shared state, the
        tensors it may upload (names, shapes, dtypes), sample and class counts, class names.
        No sample leaves the node."""
        k = self.client_id
        part = self.data.summary()
        learner = self.client.learner
        schema = {
            name: [list(shape), str(dtype).removeprefix("torch.")]
            for name, (shape, dtype) in learner.upload_schema().items()
        }
        return {
            "client": k,
            "initial": self.client.upload(),
            "schema": schema,
            "num_train": self.data.num_train(k),
            "num_test": len(self.data.test_parts[k]),
            "row": part["clients"][k],
            "train_counts": part["train_counts"][k],
            "test_counts": part["test_counts"][k],
            "val_counts": part["val_counts"][k] if "val_counts" in part else None,
            "val_fraction": part.get("val_fraction"),
            "dataset": part["dataset"],
            "partitioner": part["partitioner"],
            "classnames": part["classnames"],
            "datasets": part.get("datasets"),  # the member names over several data sets
            "multilabel": bool(self.data.multilabel),
            "base_to_novel": bool(self.data.cfg.base_to_novel),
        }

    def train(self, rnd: int, payload: Payload | None) -> ClientOutcome:
        """The client's turn of round `rnd` (`ClientRuntime.turn`)."""
        return self.runtime.turn(self.client_id, rnd, payload)

    def evaluate(self, payload: Payload | None) -> Any:
        """The client's evaluation after taking its evaluation payload: accuracy,
        (scores, targets), or base-to-novel counts."""
        self.runtime.take(self.client_id, payload)
        return self.runtime.evaluate_one(self.client_id)

    def report(self) -> dict[str, Any]:
        return self.client.learner.report()

    def state(self) -> dict[str, Any]:
        return self.runtime.client_state(self.client_id)

    def load_state(self, state: dict[str, Any] | None) -> None:
        """Restore a personal state; None: the state before the client's first message."""
        self.runtime.load_client(
            self.client_id, copy.deepcopy(self.fresh if state is None else state)
        )


# The expensive parts of a node (backbone, data, frozen-feature cache, the client's modules)
# live as long as the process: Flower's simulation keeps its worker processes across messages
# (one process serves many nodes, which share one FederatedData, as in `Federation`), while a
# SuperNode starts a new process per message. Keyed by run, so a new run drops the old one.
_NODES: dict[tuple[int, str, int, str | None], NodeClient] = {}
_DATA: dict[tuple[int, str, str | None], FederatedData] = {}


def node_for(
    run_id: int, plain: dict[str, Any], fingerprint: str, client_id: int, data_root: str | None
) -> NodeClient:
    """This process's NodeClient of client `client_id` in run `run_id` (built once)."""
    key = (run_id, fingerprint, client_id, data_root)
    if key not in _NODES:
        for cache in (_NODES, _DATA):
            for old in [k for k in cache if k[0] != run_id]:
                del cache[old]
        cfg = site_config(plain, data_root)
        data = _DATA.get((run_id, fingerprint, data_root))
        _NODES[key] = NodeClient(cfg, client_id, data)
        _DATA[(run_id, fingerprint, data_root)] = _NODES[key].data
    return _NODES[key]
