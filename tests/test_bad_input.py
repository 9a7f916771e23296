"""The bad-input catalogue: every case exits with code 2 and one stderr line naming the problem.

The project's rule: bad input gets one line, `fedclip <cmd>: error: ...`, naming what is wrong
(the key, the value, the path, the model ...), exit code 2, and nothing already written is
touched. Each case runs `fedclip.cli.main` in this process against one workspace, made once per
module: a finished one-round run folder, run folders without a checkpoint or with a truncated
one, and fakes of bad configs, data, checkpoints and attribute files. Every file (and folder) of
the workspace is compared byte for byte before and after each case, so a `fit` that would start
a new run must not even create its folder. No case may reach the network: sockets refuse to
connect while a case runs.
"""

from __future__ import annotations

import pickle
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from fedclip.cli import main
from fedclip.data import Shapes

from .conftest import tiny_yaml

TINY = tiny_yaml(
    {
        "seed": 3,
        "backbone.pretrained": None,
        "learner.init_args.n_ctx": 2,
        "data.dataset.init_args": {
            "num_classes": 3,
            "train_per_class": 4,
            "test_per_class": 2,
            "image_size": 32,
        },
        "federation": {"rounds": 1, "local_epochs": 1, "eval_at_start": False},
    }
)


class NeedsRoot(Shapes):
    """A user's data-set plug-in with a required argument (no fedclip class has one).

    Args:
        root: folder of the data (required).
    """

    def __init__(self, root: str, num_classes: int = 3):
        super().__init__(num_classes=num_classes, train_per_class=4, test_per_class=2)
        self.root = root


class Evil:
    """Unpickling this runs open(marker, "w"): a checkpoint that would execute code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@dataclass
class Workspace:
    root: Path
    runs: Path  # output_dir of every fit
    tiny: Path  # the config of the base run
    base: Path  # a finished run folder (config.yaml, checkpoints/last.ckpt, ...)
    half: Path  # a run folder with config.yaml but no checkpoint
    broken: Path  # a run folder whose checkpoint is truncated
    marker: Path  # created if a malicious checkpoint ever runs code


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("bad-input")
    runs = root / "runs"
    tiny = _write(root / "tiny.yaml", TINY)
    code = main(
        [
            "fit",
            "--config",
            str(tiny),
            f"--output_dir={runs}",
            "--run_name=base",
            "--progress=false",
        ]
    )
    assert code == 0, "the base run failed"
    base = runs / "base"
    assert (base / "checkpoints" / "last.ckpt").is_file()

    # a run that never finished a round: its config is saved, no checkpoint yet
    half = runs / "half"
    half.mkdir()
    saved = yaml.safe_load((base / "config.yaml").read_text())
    saved["run_name"] = "half"
    (half / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))

    # checkpoints that must be refused, and a run folder whose checkpoint is cut short
    ckpt = (base / "checkpoints" / "last.ckpt").read_bytes()
    _write(root / "ckpt" / "truncated.ckpt", ckpt[: len(ckpt) // 2])
    broken = runs / "broken"
    saved["run_name"] = "broken"
    _write(broken / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
    _write(broken / "checkpoints" / "last.ckpt", ckpt[: len(ckpt) // 2])
    torch.save({"ctx": torch.zeros(2, 8)}, root / "ckpt" / "foreign.ckpt")
    marker = root / "PWNED"
    torch.save(Evil(marker), root / "ckpt" / "evil.ckpt")  # zip format, as torch.save writes
    with open(root / "ckpt" / "evil.pkl", "wb") as f:  # a bare pickle (torch's legacy format)
        pickle.dump(Evil(marker), f, protocol=2)
    assert not marker.exists()

    # data sets: a CIFAR-100 folder of garbage, a CoOp folder without its split file or lists,
    # a CoOp split file that is not JSON
    for name in ("train", "test", "meta"):
        _write(root / "garbage" / "cifar-100-python" / name, b"not a pickle\n" * 10)
    _write(root / "pets" / "oxford_pets" / "images" / "Abyssinian_1.jpg", b"")
    _write(root / "badsplit" / "oxford_pets" / "images" / "Abyssinian_1.jpg", b"")
    _write(root / "badsplit" / "oxford_pets" / "split_zhou_OxfordPets.json", "{train: [")

    # a FedMVP attribute file without the classes green square and blue triangle
    _write(root / "attrs" / "partial.json", '{"red circle": ["a round shape"]}')

    # config files
    _write(root / "bad_syntax.yaml", "federation: {rounds: 2\nseed: [\n")
    _write(root / "unknown_top.yaml", "epochs: 3\n")
    _write(root / "unknown_nested.yaml", "federation:\n  roundz: 3\n")
    _write(root / "seed_list.yaml", "seed: [1, 2]\n")
    return Workspace(root, runs, tiny, base, half, broken, marker)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under root."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


@dataclass
class Case:
    args: list[str]  # after the command; {ws}, {tiny}, {base}, {half}, ... are filled in
    needle: str | tuple[str, ...]  # must all appear in the error line (same placeholders)
    cmd: str = "fit"
    new_run: bool = True  # a fit into output_dir/new: add --output_dir and --run_name=new
    fixtures: tuple[str, ...] = ()  # pytest fixtures the case needs

    def needles(self, ws: Workspace) -> list[str]:
        return [
            _fill(n, ws) for n in ((self.needle,) if isinstance(self.needle, str) else self.needle)
        ]

    def argv(self, ws: Workspace) -> list[str]:
        args = [_fill(a, ws) for a in self.args]
        if self.cmd == "fit" and self.new_run:
            args += [f"--output_dir={ws.runs}", "--run_name=new", "--progress=false"]
        return [self.cmd, *args]


def _fill(text: str, ws: Workspace) -> str:
    return text.format(
        ws=ws.root, tiny=ws.tiny, base=ws.base, half=ws.half, broken=ws.broken, runs=ws.runs
    )


def fit(*args: str, needle: str | tuple[str, ...], fixtures: tuple[str, ...] = ()) -> Case:
    """`fedclip fit --config tiny.yaml ARGS` into a new run folder."""
    return Case(["--config", "{tiny}", *args], needle, fixtures=fixtures)


CASES = [
    # ---- keys and types
    pytest.param(Case(["--config", "{ws}/unknown_top.yaml"], "epochs"), id="yaml-unknown-top-key"),
    pytest.param(
        Case(["--config", "{ws}/unknown_nested.yaml"], "roundz"), id="yaml-unknown-nested-key"
    ),
    pytest.param(fit("--learner.init_args.n_ctxx=3", needle="n_ctxx"), id="unknown-learner-arg"),
    pytest.param(
        fit("--data.partitioner.init_args.alphaa=1", needle="alphaa"), id="unknown-partitioner-arg"
    ),
    pytest.param(fit("--federation.roundz=3", needle="roundz"), id="unknown-flag"),
    pytest.param(
        fit(f"--data.dataset={__name__}.NeedsRoot", needle=("NeedsRoot", "required: root")),
        id="missing-required-init-arg",
    ),
    pytest.param(Case([], "run_dir", cmd="evaluate"), id="evaluate-missing-run-dir"),
    pytest.param(fit("--federation.rounds=many", needle="rounds"), id="rounds-not-int"),
    pytest.param(fit("--seed=1.5", needle="seed"), id="seed-float"),
    pytest.param(
        Case(["--config", "{tiny}", "--config", "{ws}/seed_list.yaml"], "seed"), id="seed-list"
    ),
    pytest.param(fit("--resume=maybe", needle="resume"), id="resume-not-bool"),
    pytest.param(fit("--fabric.precision=64", needle="precision"), id="precision-invalid"),
    pytest.param(fit("--optim.scheduler=linear", needle="scheduler"), id="scheduler-invalid"),
    pytest.param(
        fit("--learner=fedclip.learners.TextualPromptt", needle="TextualPromptt"),
        id="unknown-learner-class",
    ),
    pytest.param(
        fit("--strategy=fedclip.strategies.FedAvgg", needle="FedAvgg"), id="unknown-strategy-class"
    ),
    pytest.param(
        fit("--data.dataset=fedclip.data.Shapez", needle="Shapez"), id="unknown-dataset-class"
    ),
    pytest.param(
        fit("--data.partitioner=fedclip.data.Dirichlett", needle="Dirichlett"),
        id="unknown-partitioner-class",
    ),
    # ---- impossible values
    pytest.param(fit("--federation.fraction=0", needle="fraction"), id="fraction-0"),
    pytest.param(fit("--federation.rounds=0", needle="rounds"), id="rounds-0"),
    pytest.param(fit("--federation.local_epochs=0", needle="local_epochs"), id="local-epochs-0"),
    pytest.param(fit("--federation.eval_every=0", needle="eval_every"), id="eval-every-0"),
    pytest.param(fit("--data.num_clients=0", needle="num_clients"), id="num-clients-0"),
    pytest.param(
        fit("--data.num_clients=100", needle="num_clients"), id="more-clients-than-samples"
    ),
    pytest.param(fit("--data.batch_size=0", needle="batch_size"), id="batch-size-0"),
    pytest.param(fit("--data.eval_batch_size=0", needle="eval_batch_size"), id="eval-batch-size-0"),
    pytest.param(fit("--data.num_workers=-1", needle="num_workers"), id="num-workers-negative"),
    pytest.param(fit("--optim.lr=-1", needle="optim.lr"), id="lr-negative"),
    pytest.param(fit("--optim.lr=0", needle="optim.lr"), id="lr-0"),
    pytest.param(fit("--optim.momentum=-0.5", needle="optim.momentum"), id="momentum-negative"),
    pytest.param(
        fit("--optim.weight_decay=-1", needle="optim.weight_decay"), id="weight-decay-negative"
    ),
    pytest.param(fit("--multilabel.gamma_neg=-1", needle="gamma_neg"), id="asl-gamma-negative"),
    pytest.param(
        fit(
            "--learner=fedclip.learners.MixtureOfPrompts",
            "--learner.init_args.gating_momentum=-1",
            "--strategy=fedclip.strategies.PFedMoAP",
            needle="gating_momentum",
        ),
        id="moap-gating-momentum-negative",
    ),
    pytest.param(
        fit(
            "--learner=fedclip.learners.MixtureOfPrompts",
            "--strategy=fedclip.strategies.PFedMoAP",
            "--strategy.init_args.num_experts=0",
            needle="num_experts",
        ),
        id="moap-num-experts-0",
    ),
    pytest.param(
        fit("--federation.max_client_failures=-1", needle="max_client_failures"),
        id="max-client-failures-negative",
    ),
    pytest.param(
        fit("--privacy.mode=central", "--privacy.clip_norm=0", needle="clip_norm"),
        id="privacy-clip-norm-0",
    ),
    pytest.param(
        fit("--privacy.mode=local", "--privacy.noise_multiplier=-1", needle="noise_multiplier"),
        id="privacy-noise-negative",
    ),
    pytest.param(
        fit("--privacy.mode=central", needle=("weighted: false", "FedAvg")),
        id="privacy-central-weighted-mean",
    ),
    pytest.param(
        fit(
            "--learner=fedclip.learners.MixtureOfPrompts",
            "--strategy=fedclip.strategies.PFedMoAP",
            "--strategy.init_args.weighted=false",
            "--privacy.mode=central",
            needle=("PFedMoAP", "privacy.mode: local"),
        ),
        id="privacy-central-with-expert-pool",
    ),
    pytest.param(fit("--fabric.accelerator=tpuu", needle="tpuu"), id="accelerator-unknown"),
    pytest.param(fit("--learner.init_args.n_ctx=0", needle="n_ctx"), id="n-ctx-0"),
    pytest.param(
        fit("--data.dataset.init_args.num_classes=0", needle="num_classes"), id="shapes-classes-0"
    ),
    pytest.param(
        fit(
            "--data.partitioner=fedclip.data.Pathological",
            "--data.partitioner.init_args.classes_per_client=5",
            needle="classes_per_client",
        ),
        id="pathological-more-classes-than-data",
    ),
    pytest.param(
        fit(
            "--data.partitioner=fedclip.data.Dirichlet",
            "--data.partitioner.init_args.alpha=0",
            needle="alpha",
        ),
        id="dirichlet-alpha-0",
    ),
    pytest.param(
        fit(
            "--data.partitioner=fedclip.data.Dirichlet",
            "--data.partitioner.init_args.alpha=-1",
            needle="alpha",
        ),
        id="dirichlet-alpha-negative",
    ),
    pytest.param(fit("--fabric.devices=0", needle="fabric.devices"), id="devices-0"),
    pytest.param(
        fit(
            "--data.dataset.init_args.num_classes=1",
            "--data.base_to_novel=true",
            needle="2 classes",
        ),
        id="base-to-novel-one-class",
    ),
    pytest.param(
        fit("--data.partitioner=fedclip.data.ByDomain", needle="ByDomain"),
        id="domain-partitioner-on-single-domain-data",
    ),
    pytest.param(
        fit("--strategy=fedclip.strategies.PFedMoAP", needle="PFedMoAP"),
        id="strategy-learner-mismatch",
    ),
    pytest.param(
        fit(
            "--backbone.model=fedclip-tiny-rn",
            "--learner=fedclip.learners.FedMVP",
            "--learner.init_args.attributes=shapes",
            needle=("visual prompt tokens", "fedclip-tiny-rn"),
        ),
        id="learner-backbone-mismatch",
    ),
    # ---- backbone (never the network)
    pytest.param(fit("--backbone.model=ViT-Q-99", needle="ViT-Q-99"), id="unknown-model"),
    pytest.param(
        fit(
            "--backbone.model=ViT-B-32",
            "--backbone.pretrained=nonexistent_tag",
            needle="nonexistent_tag",
        ),
        id="unknown-pretrained-tag",
    ),
    pytest.param(
        fit("--backbone.pretrained={ws}/nowhere/weights.bin", needle="{ws}/nowhere/weights.bin"),
        id="pretrained-file-missing",
    ),
    # ---- data on disk
    pytest.param(
        fit(
            "--data.dataset=fedclip.data.CIFAR100",
            "--data.dataset.init_args.root={ws}/nodata",
            needle="{ws}/nodata",
        ),
        id="cifar100-root-missing",
    ),
    pytest.param(
        fit(
            "--data.dataset=fedclip.data.CIFAR100",
            "--data.dataset.init_args.root={ws}/garbage",
            needle=("corrupt", "{ws}/garbage/cifar-100-python"),
        ),
        id="cifar100-garbage-files",
    ),
    pytest.param(
        fit(
            "--data.dataset=fedclip.data.CIFAR100",
            "--data.dataset.init_args.root={ws}/garbage",
            needle=("corrupt", "not CIFAR python batches"),
            fixtures=("skip_md5",),
        ),
        id="cifar100-files-not-batches",
    ),
    pytest.param(
        fit(
            "--data.dataset=fedclip.data.OxfordPets",
            "--data.dataset.init_args.root={ws}/pets",
            needle="trainval.txt",
        ),
        id="coop-no-split-file",
    ),
    pytest.param(
        fit(
            "--data.dataset=fedclip.data.OxfordPets",
            "--data.dataset.init_args.root={ws}/badsplit",
            needle="split_zhou_OxfordPets.json",
        ),
        id="coop-corrupt-split-file",
    ),
    pytest.param(
        fit(
            "--learner=fedclip.learners.FedMVP",
            "--learner.init_args.attributes={ws}/attrs/partial.json",
            needle="green square",
        ),
        id="mvp-attributes-missing-classes",
    ),
    pytest.param(
        fit(
            "--learner=fedclip.learners.FedMVP",
            "--learner.init_args.attributes={ws}/attrs/none.json",
            needle="{ws}/attrs/none.json",
        ),
        id="mvp-attribute-file-not-found",
    ),
    # ---- config files
    pytest.param(
        Case(["--config", "{ws}/nope.yaml"], "{ws}/nope.yaml"), id="config-file-not-found"
    ),
    pytest.param(
        Case(["--config", "{ws}/bad_syntax.yaml"], ("bad_syntax.yaml", "line 2")), id="yaml-syntax"
    ),
    # ---- evaluate
    pytest.param(
        Case(["--run_dir", "{ws}/ckpt"], "{ws}/ckpt", cmd="evaluate"), id="evaluate-not-a-run"
    ),
    pytest.param(
        Case(["--run_dir", "{ws}/absent"], "{ws}/absent", cmd="evaluate"),
        id="evaluate-run-dir-missing",
    ),
    pytest.param(
        Case(
            ["--run_dir", "{base}", "--checkpoint", "{ws}/ckpt/truncated.ckpt"],
            "truncated.ckpt",
            cmd="evaluate",
        ),
        id="evaluate-truncated-checkpoint",
    ),
    pytest.param(
        Case(
            ["--run_dir", "{base}", "--checkpoint", "{ws}/ckpt/foreign.ckpt"],
            "foreign.ckpt",
            cmd="evaluate",
        ),
        id="evaluate-foreign-checkpoint",
    ),
    pytest.param(
        Case(
            ["--run_dir", "{base}", "--checkpoint", "{ws}/ckpt/evil.ckpt"],
            ("evil.ckpt", "io.open"),
            cmd="evaluate",
        ),
        id="evaluate-malicious-checkpoint",
    ),
    pytest.param(
        Case(
            ["--run_dir", "{base}", "--checkpoint", "{ws}/ckpt/evil.pkl"],
            ("evil.pkl", "io.open"),
            cmd="evaluate",
        ),
        id="evaluate-malicious-bare-pickle",
    ),
    pytest.param(
        Case(["--run_dir", "{broken}"], "{broken}/checkpoints/last.ckpt", cmd="evaluate"),
        id="evaluate-run-with-truncated-checkpoint",
    ),
    pytest.param(
        Case(["--run_dir", "{base}", "--dataset", "fedclip.data.Shapez"], "Shapez", cmd="evaluate"),
        id="evaluate-unknown-transfer-dataset",
    ),
    pytest.param(
        Case(
            [
                "--run_dir",
                "{base}",
                "--dataset",
                "fedclip.data.CIFAR100",
                "--dataset.root",
                "{ws}/nodata",
            ],
            "{ws}/nodata",
            cmd="evaluate",
        ),
        id="evaluate-transfer-data-missing",
    ),
    pytest.param(
        Case(
            ["--run_dir", "{base}", "--checkpoint", "{ws}/ckpt/absent.ckpt"],
            "absent.ckpt",
            cmd="evaluate",
        ),
        id="evaluate-checkpoint-not-found",
    ),
    # ---- resume and run folders
    pytest.param(
        Case(
            ["--config", "{base}/config.yaml", "--seed=4", "--resume=true"], "seed", new_run=False
        ),
        id="resume-different-seed",
    ),
    pytest.param(
        Case(
            ["--config", "{base}/config.yaml", "--learner.init_args.n_ctx=3", "--resume=true"],
            "n_ctx",
            new_run=False,
        ),
        id="resume-different-n-ctx",
    ),
    pytest.param(
        Case(["--config", "{broken}/config.yaml", "--resume=true"], "last.ckpt", new_run=False),
        id="resume-truncated-checkpoint",
    ),
    pytest.param(
        Case(["--config", "{half}/config.yaml", "--resume=true"], "no checkpoint", new_run=False),
        id="resume-without-checkpoint",
    ),
    pytest.param(
        Case(
            ["--config", "{tiny}", "--output_dir={runs}", "--run_name=base"],
            "already holds a checkpoint",
            new_run=False,
        ),
        id="fresh-fit-into-finished-run",
    ),
    pytest.param(
        Case(
            ["--config", "{tiny}", "--output_dir={tiny}", "--run_name=new"],
            "tiny.yaml",
            new_run=False,
        ),
        id="output-dir-is-a-file",
    ),
    pytest.param(
        Case(
            [
                "--config",
                "{tiny}",
                "--output_dir={runs}",
                "--run_name=../escaped",
                "--progress=false",
            ],
            "run_name",
            new_run=False,
        ),
        id="run-name-leaves-output-dir",
    ),
    # ---- the other commands
    pytest.param(
        Case(["--config", "{tiny}", "--data.num_clients=0"], "num_clients", cmd="partition"),
        id="partition-num-clients-0",
    ),
]


@pytest.fixture
def offline(monkeypatch):
    """No case may try the network: a connection attempt fails the case loudly."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"bad-input case tried to connect to {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.mark.parametrize("case", CASES)
def test_bad_input(ws, case, capsys, offline, request):
    for name in case.fixtures:
        request.getfixturevalue(name)
    capsys.readouterr()
    before = _snapshot(ws.root)
    code = main(case.argv(ws))
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}, stderr:\n{out.err}"
    assert len(lines) == 1 and lines[0].startswith(f"fedclip {case.cmd}: error: "), out.err
    line = lines[0]
    assert line.isprintable(), f"control characters in {line!r}"
    for needle in case.needles(ws):
        assert needle in line, f"{needle!r} not in {line!r}"
    assert not ws.marker.exists(), "a checkpoint ran code while being loaded"
    assert not (ws.runs / "new").exists(), "a refused fit created its run folder"
    assert _snapshot(ws.root) == before, "a bad-input case changed the workspace"


def test_unknown_command_is_one_line_on_stderr(capsys):
    code = main(["train"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("fedclip: error:") and "train" in err[0]


def test_the_real_command_prints_only_the_error_line(ws):
    """The console script in a fresh process: no warnings or log lines around the error."""
    before = _snapshot(ws.root)
    done = subprocess.run(
        [sys.executable, "-m", "fedclip.cli", *fit("--federation.fraction=0", needle="").argv(ws)],
        cwd=ws.root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and _snapshot(ws.root) == before
    assert lines == ["fedclip fit: error: federation.fraction must be in (0, 1], got 0.0"], lines
