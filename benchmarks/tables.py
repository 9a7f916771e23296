"""The bench's results: merging a run into earlier ones (`--merge`), the markdown tables and
the scaling plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _method_of(row: dict[str, Any]) -> str:
    """A result row's method as the registry spells it ("PromptFL (augmented)" ->
    "promptfl (augmented)"; rows of older runs used display names)."""
    return str(row["method"]).lower()


def merged(old: dict[str, Any], new: dict[str, Any], sections: set[str]) -> dict[str, Any]:
    """`--merge`: the previous results with the rows of the methods re-measured now
    replaced (in the sections run now); sections not run are kept as they were."""
    out = dict(old)
    out["environment"], out["settings"], out["sizes"] = (
        new["environment"], new["settings"], new["sizes"]
    )  # fmt: skip
    if "matmul_peak_gflops" in old.get("environment", {}) and "speed" not in sections:
        out["environment"] = {**new["environment"],
                              "matmul_peak_gflops": old["environment"]["matmul_peak_gflops"]}  # fmt: skip
    for key in ("speed", "memory", "traffic", "accuracy"):
        ran = key in sections or (key == "speed" and "speed_augment" in sections)
        if not ran:
            continue
        redone = {_method_of(r) for r in new[key] if "method" in r}
        kept = [r for r in old.get(key, []) if "method" not in r or _method_of(r) not in redone]
        out[key] = kept + new[key] if key != "memory" else new[key]
    if "scaling" in sections:
        for axis in ("clients", "classes"):
            out["scaling"] = out.get("scaling") or {"clients": {}, "classes": {}}
            out["scaling"][axis] = {**out["scaling"].get(axis, {}), **new["scaling"][axis]}
    return out


def plot_scaling(scaling: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, axis in zip(axes, ("clients", "classes"), strict=True):
        for method, r in scaling[axis].items():
            line = ax.plot(r["x"], r["round_s"], marker="o", label=method)[0]
            xs = np.array(r["x"], dtype=float)
            ax.plot(xs, r["intercept_s"] + r["slope_s"] * xs, ls="--", color=line.get_color())
        ax.set(xlabel=f"number of {axis}", ylabel="round time (s)", title=f"round time vs {axis}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(value: Any, spec: str) -> str:
    """A number as `spec`, or '-' when absent (rows of older runs) or nan (not measured)."""
    return "-" if value is None or value != value else format(value, spec)


def _floor_table(results: dict[str, Any]) -> list[str]:
    """The steps' counted FLOPs over their time, as a fraction of the matmul peak measured
    in the row's own run (a merged table can hold rows of several runs)."""
    peak = results["environment"].get("matmul_peak_gflops", {})
    lines = ["", "## Local step against the matmul floor", "",
             "Measured matmul peak of this run: "
             + (", ".join(f"{k} {v:,.1f} GFLOP/s" for k, v in peak.items()) or "not measured")
             + ". Each row uses the peak measured in its own run (column fp32 peak).", "",
             "| model | method | GFLOP per step | GFLOP/s | fp32 peak (GFLOP/s) | of fp32 peak "
             "| bf16 of bf16 peak | reference GFLOP | reference of fp32 peak |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["speed"]:
        if "step_gflop" not in r:
            continue  # measured before the FLOP count existed
        lines.append(
            f"| {r['model']} | {r['method']} | {_fmt(r['step_gflop'], '.3g')} | "
            f"{_fmt(r['achieved_gflops'], '.3g')} | {_fmt(r['peak_fp32_gflops'], '.1f')} | "
            f"{_fmt(r['fraction_of_peak'], '.1%')} | {_fmt(r.get('bf16_fraction_of_peak'), '.1%')} | "
            f"{_fmt(r.get('reference_gflop'), '.3g')} | "
            f"{_fmt(r.get('reference_fraction_of_peak'), '.1%')} |"
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        "# fedclip benchmark results",
        "",
        f"Device: {env['device']}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, "
        f"{env['cpu_threads']} CPU threads, torch {env['torch']}, open_clip {env['open_clip']}, "
        f"Python {env['python']}; settings: `{results['settings']}`.",
        "",
        "## Local step: fedclip against the reference path (same logits)",
        "",
        "| model | method | fedclip step (s) | reference step (s) | speed-up | bf16 step (s) "
        "| bf16 vs fp32 | max logit diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["speed"]:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['fedclip_step_s']:.3f} | "
            f"{r['reference_step_s']:.3f} | {r['speedup']:.1f}x | "
            + (
                f"{r['bf16_step_s']:.3f} | {r['bf16_speedup_vs_fp32']:.2f}x"
                if r["bf16_step_s"] == r["bf16_step_s"]
                else "- | -"
            )
            + f" | {r['max_logit_diff']:.1e} |"
        )
    lines += _floor_table(results)
    lines += ["", "## Peak memory against the number of clients", "",
              "| model | clients | peak RSS (MB) | ratio to 1 client |", "|---|---|---|---|"]  # fmt: skip
    for r in results["memory"]:
        lines.append(
            f"| {r['model']} | {r['clients']} | {r['peak_rss_mb']:.0f} | "
            f"{r['ratio_to_1_client']:.2f} |"
        )
    lines += ["", "## Traffic per client per round", "",
              "| model | method | up | down |", "|---|---|---|---|"]  # fmt: skip
    for r in results["traffic"]:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['up_bytes'] / 1e3:,.1f} kB | "
            f"{r['down_bytes'] / 1e3:,.1f} kB |"
        )
    lines += ["", "## Round time: fitted lines (tiny model, CPU)", "",
              "| method | s per client | s per class |", "|---|---|---|"]  # fmt: skip
    sc = results["scaling"]
    for method in sc["clients"]:
        lines.append(
            f"| {method} | {sc['clients'][method]['slope_s']:.3f} | "
            f"{sc['classes'][method]['slope_s']:.4f} |"
        )
    lines += ["", "![scaling](scaling.png)", "",
              "## Accuracy sanity table (built-in Shapes under tungsten light, tiny CLIP, equal budgets)", "",
              "| partition | method | personal mean | personal min | global | dual |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["accuracy"]:
        extra = [r.get("global"), r.get("dual")]  # rows measured before they existed: -
        lines.append(
            f"| {r['partition']} | {r['method']} | {100 * r['acc_mean']:.1f}% | "
            f"{100 * r['acc_min']:.1f}% | "
            + " | ".join("-" if v is None else f"{100 * v:.1f}%" for v in extra)
            + " |"
        )
    if results.get("notes"):  # what was run how (kept in results.json, across --merge)
        lines += ["", "## Notes on this run", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"
