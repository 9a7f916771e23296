"""`make bench` at toy sizes: every section runs, the fast paths give the reference's logits,
and the results are written as JSON, Markdown and PNG."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench, floor
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


def test_flop_count_is_the_hand_count():
    """One linear layer, forward and backward, on an input that needs no gradient:
    forward x W^T (B x I x O multiply-adds) and the weight gradient g^T x (the same count),
    2 FLOPs per multiply-add; no input gradient, element-wise work not counted."""
    import torch

    b, i, o = 3, 4, 5
    layer = torch.nn.Linear(i, o, bias=False)
    x = torch.randn(b, i)
    assert bench.count_flops(lambda: layer(x).sum().backward()) == 2 * (2 * b * i * o)
    y = torch.randn(b, i, requires_grad=True)  # now the input gradient g W as well
    assert bench.count_flops(lambda: layer(y).sum().backward()) == 3 * (2 * b * i * o)
    # attention softmax(q k^T) v over L queries and S keys of width E: 2 L S E twice
    q, k, v = torch.randn(1, 1, 6, 8), torch.randn(1, 1, 7, 8), torch.randn(1, 1, 7, 8)
    attend = torch.nn.functional.scaled_dot_product_attention
    assert bench.count_flops(lambda: attend(q, k, v)) == 2 * (2 * 6 * 7 * 8)


def test_speed_rows_carry_the_fraction_of_the_matmul_peak(monkeypatch):
    import torch

    monkeypatch.setattr(floor, "PEAKS", {})
    sizes = bench.Sizes(**{**bench.QUICK.__dict__, "bf16": False, "peak_sides": (64,)})
    clip, images, labels = bench._inputs("fedclip-tiny-vit", sizes, torch.device("cpu"))
    fast, ref, diff = bench.bench_method("promptfl", clip, sizes, images, labels)
    (row,) = bench._speed_rows("tiny", "promptfl", fast, ref, diff, sizes, torch.device("cpu"))
    # C classes x (the text encoder's FLOPs) and more: at least the logits' B x D x C products
    assert row["step_gflop"] * 1e9 >= 2 * sizes.batch * clip.embed_dim * sizes.num_classes
    assert row["achieved_gflops"] == pytest.approx(row["step_gflop"] / row["fedclip_step_s"])
    assert row["fraction_of_peak"] == pytest.approx(
        row["achieved_gflops"] / row["peak_fp32_gflops"]
    )
    assert row["peak_fp32_gflops"] == floor.PEAKS["float32"] / 1e9 > 0
    results = {"environment": {"device": "cpu", "cpu_threads": 1, "torch": "t", "open_clip": "o",
               "python": "p", "matmul_peak_gflops": {"float32": row["peak_fp32_gflops"]}},
               "settings": "quick", "speed": [row], "memory": [], "traffic": [],
               "scaling": {"clients": {}, "classes": {}}, "accuracy": []}  # fmt: skip
    text = bench.markdown(results)
    assert "of fp32 peak" in text and f"{row['fraction_of_peak']:.1%}" in text
    assert "float32" in text  # the environment line names the measured peak


def test_merge_keeps_each_rows_own_peak():
    old = {"environment": {"device": "cpu", "matmul_peak_gflops": {"float32": 10.0}},
           "settings": "full", "sizes": {},
           "speed": [{"model": "m", "method": "coop", "peak_fp32_gflops": 10.0}]}  # fmt: skip
    new = {"environment": {"device": "cpu", "matmul_peak_gflops": {"float32": 20.0}},
           "settings": "full", "sizes": {}, "memory": [], "traffic": [], "accuracy": [],
           "speed": [{"model": "m", "method": "promptfl", "peak_fp32_gflops": 20.0}],
           "scaling": {"clients": {}, "classes": {}}}  # fmt: skip
    out = bench.merged(old, new, {"speed"})
    assert [r["peak_fp32_gflops"] for r in out["speed"]] == [10.0, 20.0]
    assert out["environment"]["matmul_peak_gflops"] == {"float32": 20.0}
