"""`fedclip export`: prompts as safetensors, loaded back bitwise; foreign files refused."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fedclip.checkpoint import CheckpointError, load_checkpoint
from fedclip.cli import main
from fedclip.config import build_fit_config, fit_parser
from fedclip.data import Shapes
from fedclip.errors import UsageError
from fedclip.export import (
    FORMAT,
    apply_prompts,
    build_learner,
    client_ids,
    cmd_export,
    export_prompts,
    load_learner,
    load_prompts,
)
from fedclip.federation import Federation

from .conftest import tiny_yaml

COOP = tiny_yaml({"seed": 3, "federation": {"rounds": 1, "eval_at_start": False}})

# two rounds: in the second each client downloads the other's context as its expert
MOAP = tiny_yaml(
    {
        "seed": 1,
        "learner": {
            "class_path": "fedclip.learners.MixtureOfPrompts",
            "init_args": {
                "n_ctx": 4,
                "ctx_init": "a photo of a",
                "d_gating": 16,
                "gating_heads": 2,
            },
        },
        "strategy": {"class_path": "fedclip.strategies.PFedMoAP", "init_args": {"num_experts": 2}},
        "federation": {"rounds": 2, "eval_at_start": False},
    }
)


def _fit(root: Path, name: str, text: str) -> Path:
    cfg = root / f"{name}.yaml"
    cfg.write_text(text)
    code = main(
        [
            "fit",
            "--config",
            str(cfg),
            "--output_dir",
            str(root / "runs"),
            "--run_name",
            name,
            "--progress",
            "false",
        ]
    )
    assert code == 0
    return root / "runs" / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    return {"coop": _fit(root, "coop", COOP), "moap": _fit(root, "moap", MOAP)}


def _federation(run_dir: Path) -> Federation:
    """The run reopened as `fedclip evaluate` does."""
    parser = fit_parser()
    cfg, plain = build_fit_config(
        parser, parser.parse_args(["--config", str(run_dir / "config.yaml")])
    )
    fed = Federation(cfg, None, plain, show_progress=False)
    fed.load(run_dir / "checkpoints" / "last.ckpt")
    return fed


def _flat_learner(state: dict) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[key] = value
        else:
            out.update({f"{key}/{n}": t for n, t in value.items()})
    return out


def _assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _one_line_error(excinfo, *needles: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_export_coop(runs, capsys):
    run_dir = runs["coop"]
    assert cmd_export(["--run_dir", str(run_dir)]) == 0
    path = run_dir / "prompts.safetensors"
    printed = capsys.readouterr().out
    assert str(path) in printed and f"{path.stat().st_size} bytes" in printed

    tensors = load_file(path)  # plain safetensors, no fedclip needed
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    glob = ckpt["strategy"]["global_state"]
    assert {k for k in tensors if k.startswith("global/")} == {f"global/{k}" for k in glob}
    for key, value in glob.items():
        _assert_bitwise(tensors[f"global/{key}"], value)
    for k, cs in enumerate(ckpt["clients"]):
        flat = _flat_learner(cs["learner"])
        assert {t for t in tensors if t.startswith(f"client/{k}/")} == {
            f"client/{k}/{n}" for n in flat
        }
        for name, value in flat.items():
            _assert_bitwise(tensors[f"client/{k}/{name}"], value)
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in tensors.values())

    again, meta = load_prompts(path)
    assert again.keys() == tensors.keys()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert meta["format"] == FORMAT == "fedclip-prompts" and meta["version"] == "1"
    assert json.loads(meta["learner"]) == saved["learner"]
    assert json.loads(meta["strategy"])["class_path"] == "fedclip.strategies.FedAvg"
    backbone = json.loads(meta["backbone"])
    assert backbone["model"] == "fedclip-tiny-vit" and backbone["pretrained"] is None
    shapes = Shapes(num_classes=4, train_per_class=8, test_per_class=4, image_size=32)
    assert json.loads(meta["classnames"]) == shapes.classnames
    assert meta["round"] == "1" and json.loads(meta["clients"]) == [0, 1]
    assert meta["num_clients"] == "2" and meta["seed"] == "3"
    assert json.loads(meta["multilabel"]) is False and json.loads(meta["partial"]) is False

    # the file is the safetensors layout and nothing else: u64 header size, JSON header,
    # then exactly the tensors' bytes (no pickle anywhere)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"] == meta
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    assert len(raw) == 8 + n + max(ends)
    assert not raw.startswith(b"PK") and b"\x80\x02" not in raw[: 8 + n]


def test_round_trip_logits_coop(runs):
    run_dir = runs["coop"]
    path = export_prompts(run_dir, run_dir / "shared" / "coop.safetensors")
    fed = _federation(run_dir)
    tensors, meta = load_prompts(path)
    batch = next(fed.data.batches(0, "test"))
    with torch.no_grad():
        for k in range(2):
            learner = build_learner(meta, clip=fed.clip)
            apply_prompts(learner, tensors, client=k)
            trained = fed.clients[k].learner.eval()
            _assert_bitwise(learner(batch), trained(batch))
        # the global prompts: what every FedAvg client evaluates with
        fed.clients[1].receive(fed.strategy.configure_evaluate(fed.round, [1])[1])
        glob = load_learner(path)  # backbone from the metadata (the process-wide instance)
        _assert_bitwise(glob(batch), fed.clients[1].learner(batch))


def test_moap_exports_personal_gating_and_experts(runs):
    run_dir = runs["moap"]
    path = export_prompts(run_dir)
    tensors, meta = load_prompts(path)
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    for k in range(2):
        flat = _flat_learner(ckpt["clients"][k]["learner"])
        assert any(n.startswith("gating.") for n in flat)
        for name, value in flat.items():
            _assert_bitwise(tensors[f"client/{k}/{name}"], value)
        assert tensors[f"client/{k}/_extra_state/expert_ids"].tolist() == [1 - k]
    assert set(k for k in tensors if k.startswith("global/")) == {"global/ctx"}
    assert json.loads(meta["learner"])["class_path"] == "fedclip.learners.MixtureOfPrompts"
    assert json.loads(meta["strategy"])["class_path"] == "fedclip.strategies.PFedMoAP"

    fed = _federation(run_dir)
    with torch.no_grad():
        for k in range(2):
            batch = next(fed.data.batches(k, "test"))
            learner = build_learner(meta, clip=fed.clip)
            apply_prompts(learner, tensors, client=k)
            assert learner.expert_ids == [1 - k] and learner.num_experts == 1
            _assert_bitwise(learner(batch), fed.clients[k].learner.eval()(batch))
        fresh = build_learner(meta, clip=fed.clip)
        apply_prompts(fresh, tensors)  # global: the context only, no experts, no gating
        _assert_bitwise(fresh.ctx.detach().cpu(), tensors["global/ctx"])
        assert fresh.num_experts == 0


def test_clients_option(runs, tmp_path):
    run_dir = runs["coop"]
    out = tmp_path / "one.safetensors"
    assert cmd_export(["--run_dir", str(run_dir), "--out", str(out), "--clients", "1"]) == 0
    tensors, meta = load_prompts(out)
    assert client_ids(tensors) == [1] and json.loads(meta["clients"]) == [1]
    assert "global/ctx" in tensors

    export_prompts(run_dir, out, clients="none")  # replaces the file
    tensors, meta = load_prompts(out)
    assert client_ids(tensors) == [] and list(tensors) == ["global/ctx"]
    assert [p.name for p in tmp_path.iterdir()] == ["one.safetensors"]  # no temp files left
    with pytest.raises(CheckpointError) as e:
        apply_prompts(build_learner(meta), tensors, client=0)
    _one_line_error(e, "no client 0")

    with pytest.raises(UsageError) as e:
        export_prompts(run_dir, out, clients="0,5,7")
    _one_line_error(e, "[5, 7]")
    with pytest.raises(UsageError):
        cmd_export(["--run_dir", str(run_dir), "--clients", "first"])
    with pytest.raises(UsageError) as e:
        export_prompts(run_dir, tmp_path)
    _one_line_error(e, "is a folder")
    with pytest.raises(UsageError) as e:
        export_prompts(tmp_path, out)
    _one_line_error(e, "no config.yaml")
    with pytest.raises(CheckpointError) as e:  # another run's checkpoint
        export_prompts(run_dir, out, checkpoint=runs["moap"] / "checkpoints" / "last.ckpt")
    _one_line_error(e, "different configuration")


def test_foreign_and_corrupt_files(runs, tmp_path):
    good = export_prompts(runs["coop"], tmp_path / "good.safetensors")
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError) as e:
        load_prompts(missing)
    _one_line_error(e, str(missing), "not found")

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:-40])  # truncated
    with pytest.raises(CheckpointError) as e:
        load_prompts(corrupt)
    _one_line_error(e, str(corrupt), "corrupt")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(CheckpointError) as e:
        load_prompts(junk)
    _one_line_error(e, str(junk))
    ckpt = runs["coop"] / "checkpoints" / "last.ckpt"  # a torch pickle zip is refused too
    with pytest.raises(CheckpointError) as e:
        load_prompts(ckpt)
    _one_line_error(e, str(ckpt))

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(CheckpointError) as e:
        load_prompts(foreign)
    _one_line_error(e, str(foreign), "not a fedclip-prompts file")
    newer = tmp_path / "newer.safetensors"
    save_file({"global/ctx": torch.zeros(4, 64)}, newer, {"format": FORMAT, "version": "2"})
    with pytest.raises(CheckpointError) as e:
        load_prompts(newer)
    _one_line_error(e, str(newer), "version")


def test_apply_refuses_mismatches(runs):
    tensors, meta = load_prompts(export_prompts(runs["coop"]))
    learner = build_learner(meta)
    bad = {"global/ctx": torch.zeros(5, 64)}
    with pytest.raises(CheckpointError) as e:
        apply_prompts(learner, bad)
    _one_line_error(e, "global/ctx", "(5, 64)")
    with pytest.raises(CheckpointError) as e:
        apply_prompts(learner, {"global/gating.q.weight": torch.zeros(1)})
    _one_line_error(e, "global/gating.q.weight")
    with pytest.raises(CheckpointError) as e:
        apply_prompts(learner, {**tensors, "client/0/extra": torch.zeros(1)}, client=0)
    _one_line_error(e, "client/0/extra")
    with pytest.raises(CheckpointError) as e:
        apply_prompts(learner, {"client/0/ctx": torch.zeros(3, 64)}, client=0)
    _one_line_error(e, "client/0/ctx")
    moap, moap_meta = load_prompts(export_prompts(runs["moap"]))
    with pytest.raises(CheckpointError) as e:  # gating tensors missing
        apply_prompts(build_learner(moap_meta), {"client/0/ctx": moap["client/0/ctx"]}, client=0)
    _one_line_error(e, "client/0/gating.")
    before = learner.ctx.detach().clone()
    with pytest.raises(CheckpointError):  # a MixtureOfPrompts client into a TextualPrompt
        apply_prompts(learner, moap, client=0)
    assert torch.equal(learner.ctx.detach(), before)  # nothing was loaded


def test_export_through_main(runs, capsys, tmp_path, monkeypatch):
    import fedclip.cli as cli

    if "export" not in cli.COMMANDS:  # until the command is registered there
        monkeypatch.setitem(cli.COMMANDS, "export", cmd_export)
    out = tmp_path / "p.safetensors"
    assert main(["export", "--run_dir", str(runs["coop"]), "--out", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert main(["export", "--run_dir", str(runs["coop"]), "--clients", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedclip export: error:") and "[9]" in err and "\n" not in err


def test_apply_global_with_later_shared_parameters(runs):
    """FedMVP's global state holds its LoRA factors once clients switched to them; a fresh
    learner (not in the LoRA phase, so not sharing them yet) still takes all of it."""
    _, meta = load_prompts(export_prompts(runs["coop"]))
    meta = {**meta, "learner": json.dumps({"class_path": "fedclip.learners.FedMVP"})}
    learner = build_learner(meta)
    assert "former.q.lora_a" not in learner.shared_keys()
    keys = [*learner.shared_keys(), "former.q.lora_a", "former.q.lora_b"]
    sd = learner.state_dict()
    tensors = {f"global/{k}": torch.full_like(sd[k], 0.5) for k in keys}
    apply_prompts(learner, tensors)
    sd = learner.state_dict()
    assert all(bool((sd[k] == 0.5).all()) for k in keys)


def test_build_learner_refuses_other_classes(runs):
    _, meta = load_prompts(export_prompts(runs["coop"]))
    spec = {"class_path": "subprocess.Popen", "init_args": {"args": ["true"]}}
    with pytest.raises(CheckpointError) as e:
        build_learner({**meta, "learner": json.dumps(spec)})
    _one_line_error(e, "subprocess.Popen", "not a fedclip PromptLearner")
