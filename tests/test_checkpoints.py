"""Tampered and foreign checkpoints and run folders: `fedclip fit --resume`, `evaluate`,
`export` and `predict` refuse each in one line naming the key path, with every file as it
was; real checkpoints of every method (finished, stopped between rounds) still load.

Each tampered checkpoint is made from the real one of a tiny finished run: torch.load
(weights_only), one change, torch.save."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fedclip.cli import main

from .test_bad_input import TINY, _snapshot, _write

Tamper = Callable[[dict], None]


def _set(path: str, value) -> Tamper:
    def tamper(state: dict) -> None:
        *keys, last = path.split("/")
        node = state
        for k in keys:
            node = node[int(k) if isinstance(node, list) else k]
        node[int(last) if isinstance(node, list) else last] = value

    return tamper


def _del(key: str) -> Tamper:
    return lambda state: state.pop(key)


def _nan_global(state: dict) -> None:
    state["strategy"]["global_state"]["ctx"][0, 0] = float("nan")


def _first_opt_state(state: dict) -> dict:
    return next(iter(state["clients"][0]["optimizers"][0]["state"].values()))


def _opt_shape(state: dict) -> None:
    entry = _first_opt_state(state)
    name = next(k for k, v in entry.items() if isinstance(v, torch.Tensor) and v.dim() > 0)
    entry[name] = torch.zeros(7, 3)


def _partial_nan(state: dict) -> None:
    ctx = state["strategy"]["global_state"]["ctx"]
    state["partial"] = {
        "round": state["round"], "sampled": [0, 1], "done": [0],
        "results": {0: {"state": {"ctx": torch.full_like(ctx, float("nan"))},
                        "num_samples": 4, "metrics": {}}},
        "losses": {0: 1.0}, "failures": [], "metrics": {}, "released": [0],
        "down": 0, "up": 0, "elapsed": 0.0,
    }  # fmt: skip


# name -> (change, words the error line must hold, refused by export too)
TAMPERINGS: dict[str, tuple[Tamper, tuple[str, ...], bool]] = {
    "missing-key": (_del("sampler"), ("lacks 'sampler'",), False),
    "extra-key": (_set("extra", 1), ("unexpected 'extra'",), False),
    "global-shape": (_set("strategy/global_state/ctx", torch.zeros(3, 5)),
                     ("strategy.global_state", "'ctx' has shape (3, 5)"), False),
    "global-dtype": (lambda s: s["strategy"]["global_state"].update(
        ctx=s["strategy"]["global_state"]["ctx"].double()), ("'ctx' has dtype torch.float64",), False),
    "global-nan": (_nan_global, ("strategy.global_state", "NaN"), True),
    "global-missing": (_set("strategy/global_state", None), ("strategy.global_state",), False),
    "global-extra": (_set("strategy/global_state/bogus", torch.zeros(2)), ("'bogus'",), False),
    "learner-shape": (_set("clients/1/learner/ctx", torch.zeros(9, 2)),
                      ("clients[1].learner.ctx has shape (9, 2)",), True),
    "learner-missing": (lambda s: s["clients"][0]["learner"].pop("ctx"),
                        (".learner ", "'ctx'"), True),
    "optimizer-shape": (_opt_shape, ("clients[0].optimizers[0].state", "shape (7, 3)"), False),
    "scheduler-key": (lambda s: s["clients"][0]["schedulers"][0].pop("last_epoch"),
                      ("clients[0].schedulers[0] lacks 'last_epoch'",), False),
    "round-str": (_set("round", "1"), ("round is a str",), True),
    "round-negative": (_set("round", -1), ("round is -1",), True),
    "round-too-large": (_set("round", 10**6), ("history holds rounds [1]", "1000000"), True),
    "history-not-dicts": (_set("history", [1, 2]), ("history[0] is a int",), True),
    "sampler-type": (_set("sampler", [1, 2, 3]), ("sampler is a list",), False),
    "rng-dtype": (lambda s: s.update(torch_rng=s["torch_rng"].float()), ("torch_rng",), False),
    "clients-length": (lambda s: s["clients"].pop(), ("holds 1 clients",), True),
    "partial-malformed": (_set("partial", {"round": 1}), ("partial lacks",), True),
    "partial-nan-upload": (_partial_nan, ("partial.results.0.state", "NaN"), False),
    "failures-malformed": (_set("failures", [{"round": 1}]), ("failures[0] lacks",), True),
    "privacy-malformed": (_set("privacy/central", "x"), ("privacy.central",), False),
}  # fmt: skip


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    runs = root / "runs"
    tiny = _write(root / "tiny.yaml", TINY)
    argv = ["fit", "--config", str(tiny), f"--output_dir={runs}", "--run_name=base"]
    assert main([*argv, "--progress=false"]) == 0
    base = runs / "base"
    real = torch.load(base / "checkpoints" / "last.ckpt", weights_only=True)
    saved = yaml.safe_load((base / "config.yaml").read_text())
    for name, (tamper, _, _) in TAMPERINGS.items():
        state = copy.deepcopy(real)
        tamper(state)
        torch.save(state, root / "ckpt" / f"{name}.ckpt") if (root / "ckpt").is_dir() else (
            (root / "ckpt").mkdir(),
            torch.save(state, root / "ckpt" / f"{name}.ckpt"),
        )
        folder = runs / name  # a run folder holding it, for --resume
        saved["run_name"] = name
        _write(folder / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
        shutil.copy(root / "ckpt" / f"{name}.ckpt", folder / "checkpoints" / "last.ckpt") if (
            folder / "checkpoints"
        ).mkdir() is None else None
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "img.png")
    _write(runs / "badyaml" / "config.yaml", "federation: {rounds: 2\n")
    shutil.copytree(base / "checkpoints", runs / "badyaml" / "checkpoints")
    (runs / "noconfig").mkdir()
    shutil.copytree(base / "checkpoints", runs / "noconfig" / "checkpoints")
    return root


def _argv(cmd: str, ws: Path, name: str) -> list[str]:
    base, ckpt = ws / "runs" / "base", ws / "ckpt" / f"{name}.ckpt"
    if cmd == "fit":
        return ["fit", "--config", str(ws / "runs" / name / "config.yaml"), "--resume=true",
                "--progress=false"]  # fmt: skip
    common = ["--run_dir", str(base), "--checkpoint", str(ckpt)]
    if cmd == "export":
        return ["export", *common, "--out", str(ws / "out.safetensors")]
    if cmd == "predict":
        return ["predict", *common, str(ws / "img.png")]
    return ["evaluate", *common]


def _refused(ws: Path, argv: list[str], needles, capsys) -> None:
    capsys.readouterr()
    before = _snapshot(ws)
    code = main(argv)
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"fedclip {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err[0], f"{needle!r} not in {err[0]!r}"
    assert _snapshot(ws) == before, "a refused command changed the workspace"


CASES = [
    pytest.param(cmd, name, id=f"{cmd}-{name}")
    for name, (_, _, export) in TAMPERINGS.items()
    for cmd in ("fit", "evaluate", "predict", *(("export",) if export else ()))
]


@pytest.mark.parametrize(("cmd", "name"), CASES)
def test_tampered_checkpoint_is_refused(ws, cmd, name, capsys):
    _refused(ws, _argv(cmd, ws, name), TAMPERINGS[name][1], capsys)


@pytest.mark.parametrize("cmd", ["evaluate", "export", "predict"])
@pytest.mark.parametrize(
    ("folder", "needle"), [("badyaml", "config.yaml"), ("noconfig", "config.yaml")]
)
def test_bad_run_folder_is_refused(ws, cmd, folder, needle, capsys):
    argv = [cmd, "--run_dir", str(ws / "runs" / folder)]
    if cmd == "predict":
        argv.append(str(ws / "img.png"))
    _refused(ws, argv, (needle,), capsys)


@pytest.mark.parametrize("cmd", ["evaluate", "export", "predict"])
def test_the_real_checkpoint_still_works(ws, cmd, capsys):
    argv = [cmd, "--run_dir", str(ws / "runs" / "base")]
    argv += {
        "export": ["--out", str(ws / "legit.safetensors")],
        "predict": [str(ws / "img.png")],
    }.get(cmd, [])
    assert main(argv) == 0, capsys.readouterr().err
