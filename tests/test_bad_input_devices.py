"""Bad input about devices and launchers, and sizes no memory can hold: one line, exit 2.

The same catalogue machinery as `tests/test_bad_input.py` (its workspace, `Case` and
byte-for-byte snapshot): every case runs `fedclip.cli.main` in this process and must leave
every file as it was, without creating a run folder. The device cases are written for a
machine without a GPU (the CI's); those that would mean something else on a GPU machine
are skipped there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fedclip.checkpoint import load_checkpoint, save_atomic
from fedclip.cli import main
from fedclip.data import memory

# the catalogue's fixtures, under names of their own here
from .test_bad_input import Case, Workspace, _snapshot, fit
from .test_bad_input import offline as no_network  # noqa: F401
from .test_bad_input import ws as bad_ws  # noqa: F401

NO_GPU = not torch.cuda.is_available()
needs_no_gpu = pytest.mark.skipif(not NO_GPU, reason="written for a machine without a GPU")
LAUNCHER_VARS = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "GROUP_RANK",
    "TORCHELASTIC_RUN_ID",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_JOB_NAME",
    "LSB_JOBID",
    "LSB_DJOB_RANKFILE",
)
MOAP = ("--learner=fedclip.learners.MixtureOfPrompts", "--strategy=fedclip.strategies.PFedMoAP")
MULTI = ("--data.dataset=fedclip.data.MultiShapes", "--data.dataset.init_args.num_classes=3")


@pytest.fixture
def no_launcher(monkeypatch):
    """No torchrun, SLURM, LSF or `lightning run` around this process."""
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def small_machine(monkeypatch):
    """A machine with 8 GB of memory, whatever this one has."""
    monkeypatch.setattr(memory, "machine_memory", lambda: 8 * 10**9)


def trained_on(ws: Workspace, name: str, **fabric) -> Path:
    """A copy of the finished base run, as if trained with these `fabric` settings (its
    config and its checkpoint's fingerprint say so)."""
    from fedclip.federation import config_fingerprint

    run = ws.runs / name
    saved = yaml.safe_load((ws.base / "config.yaml").read_text())
    saved["run_name"] = name
    saved["fabric"].update(fabric)
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    state = load_checkpoint(ws.base / "checkpoints" / "last.ckpt")
    state["fingerprint"] = config_fingerprint(saved)
    save_atomic(state, run / "checkpoints" / "last.ckpt")
    return run


@pytest.fixture(scope="module")
def dws(request) -> Workspace:
    """The bad-input workspace plus a run whose config.yaml names an unknown accelerator."""
    ws = request.getfixturevalue("bad_ws")
    from PIL import Image

    trained_on(ws, "tpuu", accelerator="tpuu")
    Image.new("RGB", (32, 32), (255, 0, 0)).save(ws.root / "red.png")
    return ws


DEVICE_CASES = [
    pytest.param(
        fit("--fabric.accelerator=cuda", needle=("fabric.accelerator=cuda", "the cpu only")),
        id="accelerator-cuda-missing",
        marks=needs_no_gpu,
    ),
    pytest.param(
        fit("--fabric.accelerator=mps", needle=("fabric.accelerator=mps", "no MPS GPU")),
        id="accelerator-mps-missing",
    ),
    pytest.param(
        fit("--fabric.accelerator=tpu", needle=("fabric.accelerator=tpu", "no TPU")),
        id="accelerator-tpu-missing",
    ),
    pytest.param(
        fit("--fabric.accelerator=gpu", needle=("fabric.accelerator=gpu", "no GPU")),
        id="accelerator-gpu-missing",
        marks=needs_no_gpu,
    ),
    pytest.param(
        fit("--fabric.accelerator=CUDA", needle=("fabric.accelerator", "'CUDA'")),
        id="accelerator-wrong-case",
    ),
    pytest.param(fit("--fabric.accelerator=", needle="fabric.accelerator"), id="accelerator-empty"),
    pytest.param(
        fit(
            "--fabric.accelerator=cuda",
            "--fabric.devices=3",
            needle=("fabric.accelerator=cuda", "the cpu only"),
        ),
        id="devices-3-on-missing-cuda",
        marks=needs_no_gpu,
    ),
    pytest.param(fit("--fabric.devices=-1", needle="fabric.devices"), id="devices-negative"),
    pytest.param(fit("--fabric.devices=auto", needle="fabric.devices"), id="devices-auto"),
    pytest.param(fit("--fabric.devices=1.5", needle="fabric.devices"), id="devices-float"),
    pytest.param(fit("--fabric.num_nodes=0", needle="fabric.num_nodes"), id="num-nodes-0"),
    pytest.param(
        fit(
            "--fabric.num_nodes=2",
            needle=("fabric.num_nodes=2", "launcher", "torchrun"),
            fixtures=("no_launcher",),
        ),
        id="num-nodes-2-without-launcher",
    ),
    pytest.param(
        fit(
            "--fabric.accelerator=cpu",
            "--fabric.devices=2",
            "--fabric.num_nodes=3",
            needle="fabric.num_nodes=3",
            fixtures=("no_launcher",),
        ),
        id="num-nodes-3-cpu-ranks-without-launcher",
    ),
    pytest.param(
        fit(
            "--fabric.accelerator=cpu",
            "--fabric.precision=16-mixed",
            needle=("fabric.precision=16-mixed", "bf16-mixed"),
        ),
        id="precision-16-mixed-on-cpu",
    ),
    pytest.param(
        fit("--fabric.precision=16-mixed", needle="fabric.precision=16-mixed"),
        id="precision-16-mixed-auto-without-gpu",
        marks=needs_no_gpu,
    ),
    pytest.param(fit("--fabric.precision=bf16-true", needle="precision"), id="precision-bf16-true"),
    pytest.param(fit("--fabric.precision=fp16", needle="precision"), id="precision-fp16"),
    pytest.param(fit("--fabric.precision=16", needle="precision"), id="precision-16"),
    pytest.param(
        Case(["--run_dir", "{runs}/tpuu"], ("fabric.accelerator", "'tpuu'"), cmd="evaluate"),
        id="evaluate-run-config-unknown-accelerator",
    ),
    pytest.param(
        Case(
            ["--run_dir", "{runs}/tpuu", "{ws}/red.png"],
            ("fabric.accelerator", "'tpuu'"),
            cmd="predict",
        ),
        id="predict-run-config-unknown-accelerator",
    ),
]

SIZE_CASES = [
    pytest.param(
        fit(
            "--data.dataset.init_args.train_per_class=1000000000000",
            needle=("data.dataset.init_args.train_per_class=1000000000000", "this machine has"),
        ),
        id="shapes-train-per-class-1e12",
    ),
    pytest.param(
        fit(
            "--data.dataset.init_args.test_per_class=1000000000000",
            needle="data.dataset.init_args.test_per_class=1000000000000",
        ),
        id="shapes-test-per-class-1e12",
    ),
    pytest.param(
        fit(
            "--data.dataset.init_args.train_per_class=100000000",
            needle=("train_per_class=100000000", "frozen features", "this machine has 8.0 GB"),
            fixtures=("small_machine",),
        ),
        id="shapes-feature-cache-too-big",
    ),
    pytest.param(
        fit(
            "--data.dataset.init_args.image_size=100000",
            needle=("data.dataset.init_args.image_size=100000", "100000 x 100000"),
        ),
        id="shapes-image-size-1e5",
    ),
    pytest.param(
        fit(
            "--data.dataset.init_args.image_size=10000",
            "--data.num_workers=4",
            needle=("image_size=10000", "4 workers"),
            fixtures=("small_machine",),
        ),
        id="shapes-image-size-times-workers",
    ),
    pytest.param(
        fit("--data.dataset.init_args.num_classes=1000000000", needle="num_classes"),
        id="shapes-num-classes-1e9",
    ),
    pytest.param(fit("--data.num_clients=1000000000", needle="num_clients"), id="clients-1e9"),
    pytest.param(
        fit(
            *MULTI,
            "--data.dataset.init_args.train_images=100000000000",
            needle="data.dataset.init_args.train_images=100000000000",
        ),
        id="multishapes-train-images-1e11",
    ),
    pytest.param(
        fit(
            *MULTI,
            "--data.dataset.init_args.num_classes=56",
            "--data.dataset.init_args.test_images=100000000",
            needle=("test_images=100000000", "targets"),
            fixtures=("small_machine",),
        ),
        id="multishapes-targets-too-big",
    ),
    pytest.param(
        fit(*MULTI, "--data.dataset.init_args.image_size=100000", needle="image_size=100000"),
        id="multishapes-image-size-1e5",
    ),
    pytest.param(
        fit("--learner.init_args.n_ctx=1000000", needle="n_ctx"), id="n-ctx-beyond-context"
    ),
    pytest.param(
        fit(*MOAP, "--learner.init_args.gating_heads=1000000", needle="gating_heads"),
        id="moap-gating-heads-1e6",
    ),
    pytest.param(
        fit(
            *MOAP,
            "--learner.init_args.gating_projection=linear",
            "--learner.init_args.d_gating=1000000",
            needle=("learner.init_args.d_gating=1000000", "this machine has"),
        ),
        id="moap-linear-d-gating-1e6",
    ),
    pytest.param(
        Case(
            ["--config", "{tiny}", "--data.dataset.init_args.train_per_class=1000000000000"],
            "train_per_class=1000000000000",
            cmd="partition",
        ),
        id="partition-train-per-class-1e12",
    ),
]


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("case", DEVICE_CASES + SIZE_CASES)
def test_bad_input(dws, case, capsys, request):
    for name in case.fixtures:
        request.getfixturevalue(name)
    capsys.readouterr()
    before = _snapshot(dws.root)
    start = time.monotonic()
    code = main(case.argv(dws))
    took = time.monotonic() - start
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}, stderr:\n{out.err}"
    assert len(lines) == 1 and lines[0].startswith(f"fedclip {case.cmd}: error: "), out.err
    for needle in case.needles(dws):
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert not (dws.runs / "new").exists(), "a refused fit created its run folder"
    assert _snapshot(dws.root) == before, "a bad-input case changed the workspace"
    assert took < 60, f"refused after {took:.0f} s"


def test_num_nodes_without_launcher_fails_fast(dws):
    ws = dws
    """`fabric.num_nodes: 2` with nothing to start the other node used to wait for it for
    ever: the real command now refuses it in one line, well before any data is built."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    before = _snapshot(ws.root)
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "fedclip.cli", *fit("--fabric.num_nodes=2", needle="").argv(ws)],
        cwd=ws.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - start
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "fabric.num_nodes=2" in lines[0], lines
    assert _snapshot(ws.root) == before
    assert took < 60, f"took {took:.0f} s"


# ---- legitimate inputs still work ------------------------------------------------------------
def test_large_batches_and_bf16_on_cpu_still_run(dws, tmp_path, no_launcher):
    """A batch larger than a client's data is one batch; bf16-mixed runs on the CPU; a size
    that fits is not refused."""
    code = main(
        [
            "fit",
            "--config",
            str(dws.tiny),
            f"--output_dir={tmp_path}",
            "--run_name=ok",
            "--progress=false",
            "--data.batch_size=1000000000000",
            "--data.eval_batch_size=1000000000000",
            "--fabric.accelerator=cpu",
            "--fabric.precision=bf16-mixed",
            "--data.dataset.init_args.train_per_class=6",
        ]
    )
    assert code == 0
    assert (tmp_path / "ok" / "checkpoints" / "last.ckpt").is_file()


@needs_no_gpu
def test_evaluate_and_predict_fall_back_to_cpu(dws, tmp_path, capsys, caplog):
    """A run trained on a GPU (in float16 mixed precision) is evaluated and used for
    predictions on a CPU-only machine, with one warning line."""
    import shutil

    from PIL import Image

    run = trained_on(dws, "gpu-run", accelerator="cuda", precision="16-mixed")
    try:
        assert main(["evaluate", "--run_dir", str(run)]) == 0
        warned = [r.getMessage() for r in caplog.records if "accelerator=cuda" in r.getMessage()]
        assert len(warned) == 1 and "running on the cpu in 32-true" in warned[0], warned
        caplog.clear()
        image = tmp_path / "red.png"
        Image.new("RGB", (32, 32), (255, 0, 0)).save(image)
        assert main(["predict", "--run_dir", str(run), str(image)]) == 0
        assert str(image) in capsys.readouterr().out
        warned = [r.getMessage() for r in caplog.records if "accelerator=cuda" in r.getMessage()]
        assert len(warned) == 1 and warned[0].startswith("predict:"), warned
    finally:
        shutil.rmtree(run)


def test_flower_node_ignores_num_nodes_but_not_missing_devices(no_launcher):
    """A Flower node trains on one device: `fabric.num_nodes` of the run does not apply to
    it (no launcher needed), while an accelerator its machine lacks is refused in one line
    before its data is built; the server's own check refuses an unknown accelerator."""
    from fedclip.errors import ConfigError, DeviceError
    from fedclip.federation import check_config
    from fedclip.flower.node import NodeClient

    from .conftest import small_config

    cfg = small_config()
    cfg.fabric.num_nodes = cfg.fabric.devices = 2
    assert NodeClient(cfg, 0).client_id == 0
    cfg = small_config()
    cfg.fabric.accelerator = "tpu"
    with pytest.raises(DeviceError, match="fabric.accelerator=tpu"):
        NodeClient(cfg, 0)
    cfg.fabric.accelerator = "tpuu"
    with pytest.raises(ConfigError, match="fabric.accelerator"):
        check_config(cfg)


def test_python_api_refuses_impossible_data_sizes():
    from fedclip.data import Shapes
    from fedclip.data.federated import DataConfig, FederatedData
    from fedclip.errors import ConfigError

    with pytest.raises(ConfigError, match="train_per_class=1000000000000"):
        FederatedData(DataConfig(dataset=Shapes(train_per_class=10**12)), 0)
    assert memory.human(40 * 10**12) == "40 TB" and memory.human(8 * 10**9) == "8.0 GB"
