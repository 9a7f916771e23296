"""`learner.predict(images)` for every registered method, and `fedclip predict`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fedclip.cli import main
from fedclip.data.federated import FederatedData
from fedclip.learners.base import make_learner
from fedclip.methods import get_method, list_methods

from .conftest import small_config, tiny_yaml


@pytest.mark.parametrize("name", list_methods())
def test_predict_matches_the_logits_of_the_data_layers_batch(name, tiny_vit):
    """predict() from raw PIL images equals the softmax of forward() on the batch the data
    layer builds for the same test images (cached features, images, ... as declared)."""
    method = get_method(name)
    template, _ = method.build(tiny=True)
    cfg = small_config()
    data = FederatedData(cfg.data, cfg.seed)
    data.bind(tiny_vit, type(template).inputs)
    learner = make_learner(template, tiny_vit, data.classnames, 0).eval()
    if learner.accepts_extras:  # e.g. pFedMoAP's experts, as a download would give them
        learner.receive(learner.example_extras(2, torch.Generator().manual_seed(0)))
    batch = next(data.batches(0, "test"))
    with torch.no_grad():
        expected = learner(batch).float().softmax(-1)
    raw = cfg.data.dataset.dataset("test", None)
    images = [raw[int(i)][0] for i in batch.index]
    probs = learner.predict(images)
    assert probs.shape == (len(images), len(data.classnames))
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(images)))
    tensors = torch.stack([tiny_vit.preprocess_val(im) for im in images])
    torch.testing.assert_close(learner.predict(tensors), probs)  # preprocessed tensors alike
    torch.testing.assert_close(learner.predict_logits(tensors).softmax(-1), probs)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict")
    config = root / "tiny.yaml"
    config.write_text(tiny_yaml({"federation": {"rounds": 1, "eval_at_start": False}}))
    argv = ["fit", "--config", str(config), "--output_dir", str(root / "runs")]
    assert main([*argv, "--run_name", "coop", "--progress", "false"]) == 0
    return root / "runs" / "coop"


LINE = re.compile(r"^(?P<path>.+\.png): (?P<top>(?:[\w ]+ \(\d+\.\d%\)(?:, )?)+)$")


@pytest.mark.parametrize("client", [0, 1])
def test_predict_command_prints_the_evaluation_argmax(run, tmp_path, capsys, client):
    from fedclip.predict import load_client_learner

    learner = load_client_learner(run, client)
    from fedclip.config import read_run_config

    cfg, _ = read_run_config(run)
    data = FederatedData(cfg.data, cfg.seed)
    data.bind(learner.clip, type(learner).inputs)
    batch = next(data.batches(client, "test"))
    with torch.no_grad():
        eval_top = learner(batch).argmax(-1).tolist()
    raw = cfg.data.dataset.dataset("test", None)
    paths = []
    for i in batch.index.tolist()[:3]:
        path = tmp_path / f"img{i}.png"
        raw[i][0].save(path)
        paths.append(str(path))
    capsys.readouterr()
    code = main(["predict", "--run_dir", str(run), *paths, "--top_k", "3", "--client", str(client)])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and len(out) == 3, out
    for path, line, top in zip(paths, out, eval_top, strict=False):
        match = LINE.match(line)
        assert match and match["path"] == path, line
        shown = match["top"].split(", ")
        assert len(shown) == 3
        assert shown[0].rsplit(" (", 1)[0] == learner.classnames[top]
        percents = [float(s.rsplit("(", 1)[1].rstrip("%)")) for s in shown]
        assert percents == sorted(percents, reverse=True) and 0 <= sum(percents) <= 100.1


def test_predict_bad_input_is_one_line(run, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    good = tmp_path / "good.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(good)
    cases = [
        ([str(tmp_path / "missing.png")], "image not found"),
        ([str(bad)], "cannot read image"),
        ([str(tmp_path)], "image not found"),
        ([str(good), "--client", "7"], "the run has 2 clients"),
        ([str(good), "--top_k", "0"], "--top_k must be >= 1"),
    ]
    for args, needle in cases:
        capsys.readouterr()
        code = main(["predict", "--run_dir", str(run), *args])
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert code == 2 and len(err) == 1 and needle in err[0], (args, err)
    assert main(["predict", "--run_dir", str(tmp_path), str(good)]) == 2  # not a run folder
