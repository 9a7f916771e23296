"""What a run's `fabric` section asks of this machine, checked before anything loads.

Lightning Fabric refuses most impossible settings itself, but late (after the data and the
backbone are built), in several lines, with exception types fedclip would take for a bug
(a missing `torch_xla` is a ModuleNotFoundError), or not at all: `16-mixed` on the CPU
silently becomes bf16, and `num_nodes: 2` without a cluster launcher waits for ever for the
other nodes. `check_machine` turns each into one `DeviceError` naming the key, the value
and what this machine has; `check_fabric` holds the checks that need no machine (the Flower
server runs them, its nodes the machine checks).
"""

from __future__ import annotations

import logging
import os

from fedclip.errors import ConfigError, DeviceError

log = logging.getLogger("fedclip")

ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps", "tpu")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")
# how each cluster launcher shows itself (Lightning's cluster environments read the same)
LAUNCHERS = "torchrun (WORLD_SIZE, RANK, LOCAL_RANK), SLURM's srun (SLURM_NTASKS, SLURM_PROCID)"


def check_fabric(fabric) -> None:
    """ConfigError for a `fabric` section no machine can run."""
    if fabric.accelerator not in ACCELERATORS:
        raise ConfigError(
            f"fabric.accelerator must be one of {', '.join(ACCELERATORS)}, got "
            f"{fabric.accelerator!r}"
        )
    for key in ("devices", "num_nodes"):
        value = getattr(fabric, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"fabric.{key} must be an integer >= 1, got {value!r}")
    if fabric.precision not in PRECISIONS:
        raise ConfigError(
            f"fabric.precision must be one of {', '.join(PRECISIONS)}, got {fabric.precision!r}"
        )


def machine_has() -> str:
    """What this machine offers, e.g. 'cpu only' or '2 CUDA GPUs and the cpu'."""
    import torch

    have = []
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        have.append(f"{n} CUDA GPU{'s' if n != 1 else ''}")
    if _mps_available():
        have.append("an MPS GPU")
    return f"{' and '.join(have)} and the cpu" if have else "the cpu only"


def _mps_available() -> bool:
    from lightning.fabric.accelerators import MPSAccelerator

    return MPSAccelerator.is_available()


def _xla_available() -> bool:
    from lightning.fabric.accelerators import XLAAccelerator

    try:
        return XLAAccelerator.is_available()
    except (ImportError, RuntimeError):
        return False


def resolved_accelerator(accelerator: str) -> str:
    """The accelerator `accelerator` means here ('auto' and 'gpu' resolved as Lightning
    resolves them); raises DeviceError when the machine has none of that kind."""
    import torch

    cuda = torch.cuda.is_available()
    if accelerator == "auto":
        return "cuda" if cuda else "mps" if _mps_available() else "cpu"
    available = {
        "cpu": True,
        "cuda": cuda,
        "gpu": cuda or _mps_available(),
        "mps": _mps_available(),
        "tpu": _xla_available(),
    }[accelerator]
    if not available:
        kind = {"cuda": "CUDA GPU", "gpu": "GPU (CUDA or MPS)", "mps": "MPS GPU"}
        what = kind.get(accelerator, "TPU (torch_xla)")
        raise DeviceError(
            f"fabric.accelerator={accelerator}: this machine has no {what}, it has "
            f"{machine_has()}; use --fabric.accelerator=cpu (or auto)"
        )
    if accelerator == "gpu":
        return "cuda" if cuda else "mps"
    return accelerator


def launcher() -> str | None:
    """The cluster launcher this process runs under (Lightning's detection), or None."""
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    for name, env in (
        ("torchrun", TorchElasticEnvironment),
        ("SLURM", SLURMEnvironment),
        ("LSF", LSFEnvironment),
        ("MPI", MPIEnvironment),
    ):
        try:
            if env.detect():
                return name
        except (ImportError, RuntimeError):  # e.g. MPI without mpi4py
            continue
    if os.environ.get("NODE_RANK") is not None and os.environ.get("MASTER_ADDR"):
        return "lightning run"  # `lightning run model --num-nodes ... --node-rank ...`
    return None


def check_machine(fabric, devices: int | None = None, num_nodes: int | None = None) -> str:
    """DeviceError unless this machine can run `fabric` with `devices` per node on
    `num_nodes` nodes (the section's own by default); the accelerator it resolves to."""
    check_fabric(fabric)
    devices = fabric.devices if devices is None else devices
    num_nodes = fabric.num_nodes if num_nodes is None else num_nodes
    accelerator = resolved_accelerator(fabric.accelerator)
    if accelerator == "cuda":
        import torch

        have = torch.cuda.device_count()
        if devices > have:
            raise DeviceError(
                f"fabric.devices={devices}: this machine has {have} CUDA GPU"
                f"{'s' if have != 1 else ''}; use --fabric.devices={have} or fewer"
            )
    elif accelerator == "mps" and devices > 1:
        raise DeviceError(f"fabric.devices={devices}: an MPS machine has one device; use 1")
    if accelerator == "cpu" and fabric.precision == "16-mixed":
        raise DeviceError(
            "fabric.precision=16-mixed: float16 mixed precision needs a GPU, and this "
            f"machine runs on the cpu ({machine_has()}); use --fabric.precision=bf16-mixed "
            "or 32-true"
        )
    if num_nodes > 1 and launcher() is None:
        raise DeviceError(
            f"fabric.num_nodes={num_nodes}: several nodes need a cluster launcher on each "
            f"node, and none is detected (no {LAUNCHERS}; nor LSF or MPI); start every node "
            "with torchrun --nnodes or srun, or set --fabric.num_nodes=1"
        )
    return accelerator


def fall_back_to_cpu(cfg, command: str) -> None:
    """For the commands that read a finished run (evaluate, predict): a run trained on an
    accelerator this machine lacks is read on the cpu, with one warning line (its float16
    mixed precision becomes 32-true there). Only this process's copy of the config changes:
    the run's config.yaml and checkpoint, and so its identity, stay as they are."""
    check_fabric(cfg.fabric)
    try:
        accelerator = resolved_accelerator(cfg.fabric.accelerator)
    except DeviceError:
        accelerator = None
    if accelerator is not None and not (
        accelerator == "cpu" and cfg.fabric.precision == "16-mixed"
    ):
        return
    note = ""
    if cfg.fabric.precision == "16-mixed":
        cfg.fabric.precision = "32-true"
        note = " in 32-true precision (float16 mixed precision needs a GPU)"
    log.warning(
        "%s: the run was trained with fabric.accelerator=%s and precision %s; this machine "
        "has %s: running on the cpu%s",
        command,
        cfg.fabric.accelerator,
        "16-mixed" if note else cfg.fabric.precision,
        machine_has(),
        note,
    )
    cfg.fabric.accelerator = "cpu"
