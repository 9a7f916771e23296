"""`make bench` at toy sizes: every section runs, the fast paths give the reference's logits,
and the results are written as JSON, Markdown and PNG."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench
from fedclip.methods import get_method, list_methods


@pytest.mark.slow
def test_bench_quick_writes_every_section(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.QUICK, "memory_clients", (1,))  # one child process is enough
    results = bench.main(["--quick", "--out", str(tmp_path), "--device", "cpu"])
    methods = {(r["model"], r["method"]) for r in results["speed"]}
    assert ("fedclip-tiny-vit", "fedmvp") in methods and ("fedclip-tiny-rn", "pfedmoap") in methods
    assert ("fedclip-tiny-rn", "fedmvp") not in methods  # no visual prompts on a ResNet
    assert ("fedclip-tiny-vit", "promptfl (augmented)") in methods  # the text-side gain
    for row in results["speed"]:
        assert row["same_logits"], row  # the fast paths compute the same thing
        assert row["fedclip_step_s"] > 0 and row["reference_step_s"] > 0
    assert results["memory"][0]["peak_rss_mb"] > 0
    traffic = {r["method"]: r for r in results["traffic"]}
    assert traffic["pfedmoap"]["down_bytes"] == 3 * traffic["pfedmoap"]["up_bytes"]  # 1 + E-1
    assert traffic["fedmvp (after its switch)"]["up_bytes"] < traffic["fedmvp"]["up_bytes"] / 10
    assert traffic["coop"]["up_bytes"] == traffic["zeroshot"]["down_bytes"] == 0
    benched = {m for m in list_methods() if get_method(m).bench}
    assert set(results["scaling"]["clients"]) == benched  # the registry's benched methods
    assert len(results["accuracy"]) == 2 * len(list_methods())  # every method, 2 partitions
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["environment"]["device"] == "cpu"
    assert "speed-up" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_merge_replaces_only_the_methods_measured_again():
    old = {
        "environment": {"device": "cpu"}, "settings": "full", "sizes": {},
        "speed": [{"model": "m", "method": "PromptFL", "speedup": 1.0},
                  {"model": "m", "method": "PromptFL (augmented)", "speedup": 2.0},
                  {"model": "m", "method": "pFedMoAP", "speedup": 3.0}],
        "memory": [{"model": "m", "clients": 1}],
        "traffic": [{"model": "m", "method": "pfedmoap"}],
        "scaling": {"clients": {"promptfl": 1}, "classes": {"promptfl": 2}},
        "accuracy": [{"partition": "IID", "method": "promptfl", "acc_mean": 0.5}],
    }  # fmt: skip
    new = {
        "environment": {"device": "cuda"}, "settings": "full", "sizes": {},
        "speed": [{"model": "m", "method": "promptfl", "speedup": 9.0}],
        "memory": [], "traffic": [], "scaling": {"clients": {}, "classes": {}}, "accuracy": [],
    }  # fmt: skip
    out = bench.merged(old, new, {"speed"})
    # the plain promptfl row redone; the augmented one (another section) and pFedMoAP kept
    assert [r["speedup"] for r in out["speed"]] == [2.0, 3.0, 9.0]
    assert out["accuracy"] == old["accuracy"] and out["memory"] == old["memory"]
    assert out["environment"]["device"] == "cuda"


def test_methods_option_refuses_an_unknown_name():
    from fedclip.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        bench.main(["--methods", "nope", "--sections", "traffic"])
