"""What a new user sees first: the round-0 line, one plain line per round outside a
terminal, summary.json's baseline and provenance, the final table's change from round 0,
and a resume that extends a run's cosine schedule."""

from __future__ import annotations

import io
import logging
import math

import pytest
from rich.console import Console

from fedclip.federation import Federation
from fedclip.learners import FedMVP, TextualPrompt, ZeroShot
from fedclip.progress import Progress, round_line

from .conftest import small_config


def test_round_zero_is_the_first_line_and_says_what_it_is(capsys):
    cfg = small_config(learner=TextualPrompt(n_ctx=4, ctx_init="a photo of a"), rounds=2)
    Federation(cfg, None, {}, show_progress=True).fit()
    lines = capsys.readouterr().err.strip().splitlines()
    rounds = [line for line in lines if line.startswith("round ")]
    assert [r.split(" |")[0] for r in rounds] == [
        "round 0/2 (before training)",
        "round 1/2",
        "round 2/2",
    ]
    assert "acc " in rounds[0] and "zero-shot, 'a photo of a {class}.'" in rounds[0]
    assert "loss" not in rounds[0] and "up " not in rounds[0]  # nothing trained or sent yet


def test_learners_say_what_round_zero_is():
    assert "zero-shot" in TextualPrompt(ctx_init="a photo of a").initial_state()
    assert "not zero-shot" in TextualPrompt(n_ctx=4).initial_state()
    assert "not zero-shot" in FedMVP().initial_state()
    assert ZeroShot(["a {}.", "a photo of a {}."]).initial_state() == (
        "zero-shot, 'a {class}.', 'a photo of a {class}.'"
    )


def test_outside_a_terminal_each_round_is_one_plain_line():
    """Not a TTY (a SLURM log): no wrapping at 80 columns, no rich source suffix."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=80)
    metrics = {
        "round": 3.0,
        "train/loss_mean": 0.123456,
        "eval/acc_mean": 0.5,
        "eval/acc_std": 0.1,
        "eval/acc_min": 0.4,
        "traffic/up_bytes": 12345.0,
        "traffic/down_bytes": 54321.0,
        "time/round_s": 1.5,
        "privacy/epsilon": 1.25,
        "train/failed_clients": 1.0,
    }
    with Progress(10, console=console) as progress:
        progress.round_done(metrics)
        progress.round_done(metrics)
    lines = out.getvalue().splitlines()
    assert lines == [round_line(metrics, 10)] * 2
    assert len(lines[0]) > 80 and "progress.py" not in out.getvalue()


def test_summary_holds_the_baseline_and_where_the_result_came_from(capsys):
    from fedclip.report import print_table

    cfg = small_config(learner=TextualPrompt(n_ctx=4, ctx_init="a photo of a"), rounds=2)
    fed = Federation(cfg, None, {}, show_progress=False)
    fed.fit()
    summary = fed.summary()
    start = fed.history[0]
    assert start["round"] == 0
    assert summary["baseline"]["initial"].startswith("zero-shot")
    assert summary["baseline"]["eval"]["eval/acc_mean"] == start["eval/acc_mean"]
    for row in summary["clients"]:
        assert row["acc_round0"] == start[f"client/{row['client']}/acc"]
    assert summary["federation"] == {
        "rounds": 2,
        "fraction": 1.0,
        "local_epochs": 1,
        "local_steps": None,
        "clients": 2,
        "eval_every": 1,
    }
    run = summary["run"]
    assert {"fedclip", "torch", "open_clip", "lightning", "python"} <= set(run["versions"])
    assert run["versions"]["torch"] and run["versions"]["open_clip"]
    assert run["device"] == "cpu" and run["precision"] == "32-true"
    assert run["wall_time_s"] > 0
    git = run["git"]
    assert git is None or (len(git["commit"]) == 40 and isinstance(git["dirty"], bool))

    print_table(fed, "t")
    out = capsys.readouterr().out
    assert "vs round 0" in out and "round 0: zero-shot" in out
    mean, before = summary["eval"]["eval/acc_mean"], start["eval/acc_mean"]
    assert f"{100 * (mean - before):+.2f}" in out


def test_wall_time_survives_resume(tmp_path):
    fed = Federation(small_config(rounds=2), tmp_path, {}, show_progress=False)
    fed.fit(stop_after=1)
    first = fed.elapsed_s()
    resumed = Federation(small_config(rounds=2), tmp_path, {}, show_progress=False)
    resumed.load(tmp_path / "checkpoints" / "last.ckpt")
    assert resumed.elapsed_s() == pytest.approx(first, rel=0.2)
    resumed.fit()
    assert resumed.elapsed_s() > first


def _lrs(fed) -> list[float]:
    return [c.optimizer_pairs[0][0].param_groups[0]["lr"] for c in fed.clients]


def test_resume_with_more_rounds_stretches_the_run_cosine(tmp_path, caplog):
    """2 rounds with cosine_span 'run', resumed to 4: the LR goes on from where it was, down
    to 0 at the new last round, never back up to the full LR."""
    from fedclip.config import warn_stretched_schedule

    def config(rounds):
        cfg = small_config(rounds=rounds, lr=0.05)
        cfg.optim.cosine_span = "run"
        return cfg

    short = config(3)
    fed = Federation(short, tmp_path, {}, show_progress=False)
    fed.fit(stop_after=2)
    per_round = fed.runtime.steps_per_round(0)
    reached = _lrs(fed)
    expected = 0.05 * 0.5 * (1 + math.cos(math.pi * 2 / 3))
    assert reached[0] == pytest.approx(expected, rel=1e-9)

    longer = Federation(config(5), tmp_path, {}, show_progress=False)
    longer.load(tmp_path / "checkpoints" / "last.ckpt")
    assert _lrs(longer) == pytest.approx(reached, rel=1e-12)  # no jump at the resume
    seen = []
    for stop in (3, 4, 5):
        longer.fit(stop_after=stop)
        seen.append(_lrs(longer)[0])
    assert seen[0] < reached[0] and seen[0] > seen[1] > seen[2]
    assert seen[2] == pytest.approx(0.0, abs=1e-12)
    # step s of the stretched cosine: from the factor reached at round 2, to 0 at round 5
    step = 3 * per_round
    factor = (
        reached[0] / 0.05 * 0.5 * (1 + math.cos(math.pi * (step - 2 * per_round) / (3 * per_round)))
    )
    assert seen[0] == pytest.approx(0.05 * factor, rel=1e-9)

    saved = {"federation": {"rounds": 3}, "optim": {"cosine_span": "run"}}
    with caplog.at_level(logging.WARNING, logger="fedclip"):
        warn_stretched_schedule(saved, {"federation": {"rounds": 5}, "optim": saved["optim"]})
        warn_stretched_schedule(saved, {"federation": {"rounds": 3}, "optim": saved["optim"]})
        warn_stretched_schedule(
            saved, {"federation": {"rounds": 5}, "optim": {"cosine_span": "round"}}
        )
    assert [r.getMessage() for r in caplog.records if "stretched" in r.getMessage()] == [
        "--resume: federation.rounds 3 -> 5 with optim.cosine_span 'run': the cosine LR "
        "schedule is stretched from the step reached, from its current LR down to 0 at the "
        "new last round"
    ]
