"""The `fedclip fit` configuration: one dataclass per YAML section.

Pluggable parts (learner, strategy, data set, partitioner) are given with `class_path` and
`init_args`, so a new method is a new class, never a new script.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fedclip.backbone import BackboneConfig
from fedclip.data.federated import DataConfig
from fedclip.learners.base import MultiLabelConfig, OptimConfig, PromptLearner
from fedclip.learners.textual import TextualPrompt
from fedclip.privacy import PrivacyConfig
from fedclip.strategies.base import Strategy
from fedclip.strategies.fedavg import FedAvg


@dataclass
class FederationConfig:
    """The round loop.

    Args:
        rounds: communication rounds.
        fraction: fraction of clients sampled per round (at least one client).
        local_epochs: local epochs per sampled client per round (one step per batch).
        eval_every: evaluate every client every this many rounds (and after the last).
        eval_at_start: evaluate the initial prompts before round 1 (logged as round 0).
        max_client_failures: a client whose local training raises or whose loss is not
            finite, or whose upload is invalid, is left out of its round (logged with its id
            and reason); the run stops when more than this many fail in one round. null: stop
            only when every sampled client of a round fails. Can be changed on --resume.
    """

    rounds: int = 10
    fraction: float = 1.0
    local_epochs: int = 1
    eval_every: int = 1
    eval_at_start: bool = True
    max_client_failures: int | None = None


@dataclass
class FabricConfig:
    """Devices and precision, handled by Lightning Fabric.

    Args:
        accelerator: 'auto', 'cpu', 'cuda', 'mps'.
        devices: devices per node, one process each; every round's sampled clients are
            split among all ranks (devices x num_nodes) and the outcome is the same as on
            one device. On 'cpu', N processes (gloo). 1: clients run one after another.
        num_nodes: machines (launched by torchrun, SLURM or another cluster launcher).
        precision: '32-true', 'bf16-mixed' or '16-mixed'.
    """

    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "32"] = "32-true"


@dataclass
class LoggerConfig:
    """Where metrics go (the CSV file is always written).

    Args:
        wandb: also log to Weights & Biases (WANDB_MODE=offline works without network).
        project: W&B project.
        entity: W&B entity (team or user); null uses the default.
        tags: W&B tags.
    """

    wandb: bool = False
    project: str = "fedclip"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class FitConfig:
    """A federated prompt-learning run.

    Args:
        seed: seeds partitions, client sampling, prompt initialisation and shuffling.
        output_dir: parent folder of run folders.
        run_name: run folder name under output_dir (default: learner_dataset_time).
        backbone: the frozen CLIP.
        learner: the prompt learner (class_path + init_args).
        strategy: the federation strategy (class_path + init_args).
        data: data set, partition and loaders.
        federation: rounds, participation and evaluation.
        optim: local optimiser.
        fabric: devices and precision.
        logger: metric loggers.
        multilabel: loss of multi-label data sets (ignored for single-label ones).
        privacy: differential privacy of the uploads (client-level clipping and noise).
    """

    seed: int = 0
    output_dir: str = "runs"
    run_name: str | None = None
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    learner: PromptLearner = field(default_factory=TextualPrompt)
    strategy: Strategy = field(default_factory=FedAvg)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fabric: FabricConfig = field(default_factory=FabricConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    multilabel: MultiLabelConfig = field(default_factory=MultiLabelConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
