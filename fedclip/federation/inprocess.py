"""Federation: a run in this process (or on this process's Fabric ranks): the round loop
with the data, the backbone and every client built here."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.fabric import Fabric
from lightning.fabric.utilities.seed import seed_everything

from fedclip.backbone import load_backbone
from fedclip.backbone.config import cache_bytes_per_image
from fedclip.client import ClientModule
from fedclip.data.federated import FederatedData
from fedclip.errors import DeviceError, one_line
from fedclip.federation.devices import check_machine
from fedclip.federation.executors import FabricExecutor, LocalExecutor
from fedclip.federation.loop import RoundLoop, make_loggers
from fedclip.federation.runtime import ClientRuntime
from fedclip.federation.settings import check_config, check_task, config_fingerprint

QUIET_LOGGERS = ("lightning.fabric", "lightning.pytorch", "lightning_utilities")


def quiet_lightning() -> None:
    """Lightning Fabric's INFO lines off (its warnings stay): with several ranks every rank
    printed "Initializing distributed: GLOBAL_RANK ..." and rank 0 a banner of dashes;
    fedclip says itself what runs where. Lightning sets the level when it is imported, so
    this runs after that, when the Fabric is built. The banner comes through
    `lightning.pytorch`'s rank-zero logger (which has its own handler and also reaches the
    root logger: it was printed twice)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def build_fabric(cfg, devices: int | None = None, num_nodes: int | None = None) -> Fabric:
    """The run's Fabric: one process per device; several ranks use plain DDP collectives
    (modules are never wrapped: clients differ)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    quiet_lightning()
    devices = cfg.fabric.devices if devices is None else devices
    num_nodes = cfg.fabric.num_nodes if num_nodes is None else num_nodes
    try:
        return Fabric(
            accelerator=cfg.fabric.accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy="ddp" if devices * num_nodes > 1 else "auto",
            precision=cfg.fabric.precision,
        )
    except (MisconfigurationException, ValueError, RuntimeError, ImportError, TypeError) as e:
        # Lightning's refusals of an accelerator, device count or precision it cannot give
        # (`check_machine` refuses the usual ones first; a missing torch_xla is an ImportError)
        raise DeviceError(
            f"fabric (accelerator {cfg.fabric.accelerator!r}, devices {devices}, precision "
            f"{cfg.fabric.precision!r}): {one_line(str(e))}"
        ) from e


def prepare_data(cfg, data: FederatedData | None = None) -> FederatedData:
    """Check the config, seed the process and build the data (or take `data`, already
    built from the same config): what every process does first, in this order, so that
    every client gets the same seeds wherever it is built."""
    check_config(cfg)
    seed_everything(cfg.seed, verbose=False)
    if data is None:
        # data errors before the model loads; a data set whose frozen-feature cache cannot
        # fit is refused before a label is listed
        per_image = (
            0 if cfg.data.augment else cache_bytes_per_image(cfg.backbone, type(cfg.learner).inputs)
        )
        data = FederatedData(cfg.data, cfg.seed, per_image)
    check_task(cfg.learner, data.multilabel, data.cfg.base_to_novel)
    return data


def build_runtime(cfg, data: FederatedData, client_ids, fabric: Fabric, stop=None):
    """The backbone on the fabric's device, the data bound to it with the learner's
    declared inputs, and a ClientRuntime holding `client_ids`."""
    clip = load_backbone(cfg.backbone)  # once per process (load_backbone caches)
    clip.to(fabric.device)
    if data.clip is not clip:  # data shared by several nodes of one process is bound once
        data.bind(clip, type(cfg.learner).inputs)
    kwargs = {} if stop is None else {"stop_requested": stop}
    return ClientRuntime(cfg, data, clip, fabric, client_ids, **kwargs)


class Federation(RoundLoop):
    """Builds the backbone, data, clients and strategy of a `FitConfig`, then runs rounds.

    run_dir: where metrics, checkpoints and the summary go (None: nothing is written).
    config_dict: the resolved config as plain data (saved fingerprint for resume checks).
    Several devices or nodes (`fabric.devices`, `fabric.num_nodes`): the ranks are launched
    here, after data and backbone are prepared (downloads and caches made once), and each
    round's clients are split among them (`FabricExecutor`).
    """

    def __init__(
        self,
        cfg,
        run_dir: str | Path | None = None,
        config_dict: dict[str, Any] | None = None,
        show_progress: bool = True,
    ) -> None:
        # data and backbone first, in the launching process: bad input fails here with one
        # line, and downloads and caches are made once before the other ranks start; the
        # devices first, before any of it (a missing GPU or launcher costs no data build)
        check_machine(cfg.fabric)
        data = prepare_data(cfg)
        load_backbone(cfg.backbone)
        self.fabric = fabric = build_fabric(cfg)
        if cfg.fabric.devices * cfg.fabric.num_nodes > 1:
            # starts the other local ranks (they run the same command) unless a launcher
            # such as torchrun or SLURM already did
            fabric.launch()
        self.runtime = build_runtime(
            cfg, data, range(data.num_clients), fabric, stop=lambda: self.stop_requested()
        )
        executor = (
            FabricExecutor(self.runtime) if fabric.world_size > 1 else LocalExecutor(self.runtime)
        )
        run_dir = Path(run_dir) if run_dir is not None else None
        loggers = make_loggers(run_dir, cfg, config_dict) if run_dir is not None else []
        super().__init__(
            cfg,
            executor,
            run_dir,
            config_fingerprint(config_dict or {}),
            loggers,
            show_progress,
        )
        self.world_size = fabric.world_size

    # the parts this process holds
    @property
    def data(self) -> FederatedData:
        return self.runtime.data

    @property
    def clip(self):
        return self.runtime.clip

    @property
    def classnames(self) -> list[str]:
        return self.runtime.data.classnames

    @property
    def clients(self) -> list[ClientModule]:
        return [self.runtime.clients[k] for k in sorted(self.runtime.clients)]

    def fit_client(self, k: int, rnd: int) -> float:
        return self.runtime.fit_client(k, rnd)

    def evaluate_client(self, k: int) -> float:
        return self.runtime.evaluate_client(k)

    def evaluate(self, rnd: int) -> dict[int, Any]:
        """Each client's evaluation result with the strategy's evaluation payloads."""
        ids = list(range(self.info.num_clients))
        return self.executor.evaluate(rnd, ids, self.strategy.evaluation_payloads(rnd, ids))

    def evaluate_transfer(self, name: str) -> dict[str, float]:
        """Accuracy of the global part (`ClientRuntime.global_pass`) on every client's share
        of the transfer split `name`, among that data set's classes; pooled over clients as
        `transfer/NAME/acc` (the whole test set's accuracy of the global model)."""
        ids = list(range(self.info.num_clients))
        payloads = self.strategy.evaluation_payloads(self.round, ids)
        classes = list(range(len(self.data.split_classnames(name))))
        correct = total = 0
        metrics: dict[str, float] = {}
        for k in ids:
            self.runtime.take(k, payloads.get(k))
            with self.runtime.global_pass(k):
                c, t = self.runtime.evaluate_client_on(k, name, classes)
            correct, total = correct + c, total + t
            metrics[f"transfer/{name}/client/{k}/acc"] = c / t if t else float("nan")
        metrics[f"transfer/{name}/acc"] = correct / total if total else float("nan")
        return metrics
