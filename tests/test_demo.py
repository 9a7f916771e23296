"""The offline demo teaches the point of the field: on Shapes under tungsten light (a colour
cast the tiny backbone never saw in pre-training), learned prompts beat zero-shot CLIP by a
wide margin, and under strong label skew pFedMoAP's personal mixtures beat one global prompt.
The shipped configs are run as they are; the assertions pin orderings with margins, not
exact values."""

from __future__ import annotations

import csv
import json

import pytest

from fedclip.cli import main
from fedclip.methods import get_method, list_methods

from .conftest import ROOT

PROMPTFL = [
    "--learner=fedclip.learners.TextualPrompt",
    "--learner.n_ctx=4",
    "--learner.ctx_init=a photo of a",
    "--strategy=fedclip.strategies.FedAvg",
]


def fit(config: str, tmp_path, name: str, *extra: str) -> tuple[dict, dict]:
    """`fedclip fit --config configs/<config>` in process: (first, last) rows of metrics.csv,
    the last being the final round (also summary.json's eval)."""
    code = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / config),
            f"--output_dir={tmp_path}",
            f"--run_name={name}",
            "--progress=false",
            *extra,
        ]
    )
    assert code == 0, f"fedclip fit --config {config} exited with {code}"
    rows = list(csv.DictReader(open(tmp_path / name / "csv" / "metrics.csv")))
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    assert float(rows[-1]["eval/acc_mean"]) == pytest.approx(summary["eval"]["eval/acc_mean"])
    return rows[0], rows[-1]


def acc(row: dict) -> float:
    return float(row["eval/acc_mean"])


def test_quickstart_prompts_leave_zero_shot_behind(shapes_cache, tmp_path):
    """Fast tier: two rounds of the quickstart already lift mean client accuracy 10 points
    above its round-0 zero-shot start."""
    start, end = fit("quickstart.yaml", tmp_path, "short", "--federation.rounds=2")
    assert acc(end) >= acc(start) + 0.10, (acc(start), acc(end))


@pytest.mark.slow
def test_shipped_quickstarts_order_zero_shot_promptfl_pfedmoap(shapes_cache, tmp_path):
    zs_start, zs_end = fit("zeroshot_quickstart.yaml", tmp_path, "zeroshot")
    start, promptfl = fit("quickstart.yaml", tmp_path, "promptfl")
    # round 0 of PromptFL (context "a photo of a") is the zero-shot baseline, on the same clients
    assert acc(zs_end) == pytest.approx(acc(zs_start)) == pytest.approx(acc(start), abs=1e-6)
    assert acc(promptfl) >= acc(zs_end) + 0.10, (acc(zs_end), acc(promptfl))
    assert float(promptfl["eval/acc_min"]) > float(start["eval/acc_min"])

    # label skew (Dirichlet 0.1, 10 clients): the same data, partition and rounds for both
    skew_start, moap = fit("pfedmoap_quickstart.yaml", tmp_path, "pfedmoap")
    _, global_prompt = fit(
        "pfedmoap_quickstart.yaml", tmp_path, "promptfl-skew", *PROMPTFL, "--optim.lr=0.05"
    )
    assert acc(global_prompt) >= acc(skew_start) + 0.05, (acc(skew_start), acc(global_prompt))
    assert acc(moap) >= acc(global_prompt) + 0.10, (acc(global_prompt), acc(moap))


@pytest.mark.slow
@pytest.mark.parametrize("name", [m for m in list_methods() if m != "zeroshot"])
def test_every_method_s_quickstart_learns(name, shapes_cache, tmp_path):
    """Each registered method's shipped offline quickstart, as it is: the mean personal
    accuracy ends at least 10 points above its round 0, and global and dual are logged."""
    start, end = fit(get_method(name).quickstart, tmp_path, name)
    assert acc(end) >= acc(start) + 0.10, (name, acc(start), acc(end))
    assert 0 < float(end["eval/global"]) <= 1 and 0 < float(end["eval/dual"]) <= 1
