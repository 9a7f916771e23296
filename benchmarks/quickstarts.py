"""Run every registered method's offline quickstart and print (and write) one table:
round 0 and final personal accuracy (mean / worst client), global, dual and wall time;
with `--b2n`, the same quickstarts under the base-to-novel protocol (`data.base_to_novel`:
clients train on the first half of the classes): local, base, novel and their HM.

    .venv/bin/python benchmarks/quickstarts.py [--out benchmarks/results] [--methods a,b] [--b2n]

Each quickstart runs as `fedclip fit --config configs/<quickstart>` would, in this
process, into a temporary folder; the numbers come from its summary.json. `make
quickstarts` runs it. The README's "offline accuracies of every method" table is its
output.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(value: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def run(config: str, out: Path, *extra: str) -> tuple[dict, float]:
    from fedclip.cli import main

    t0 = time.perf_counter()
    code = main(
        ["fit", "--config", str(ROOT / "configs" / config), f"--output_dir={out}",
         "--run_name=q", "--progress=false", *extra]
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"fedclip fit --config configs/{config} exited with {code}")
    return json.loads((out / "q" / "summary.json").read_text()), wall


def row(name: str, config: str, summary: dict, wall: float) -> str:
    metric = summary["metric"]
    ev, base = summary["eval"], (summary.get("baseline") or {}).get("eval", {})
    key = "map" if metric == "map" else "acc"
    return (
        f"| {name} | `{config}` | {pct(base.get(f'eval/{key}_mean'))} | "
        f"**{pct(ev.get(f'eval/{key}_mean'))}** / {pct(ev.get(f'eval/{key}_min'))} | "
        f"{pct(ev.get('eval/global'))} | {pct(ev.get('eval/dual'))} | {wall:.0f} s |"
    )


def b2n_row(name: str, config: str, summary: dict, wall: float) -> str:
    ev = summary["eval"]
    cells = " | ".join(pct(ev.get(f"eval/{k}")) for k in ("local", "base", "novel"))
    return f"| {name} | `{config}` | {cells} | **{pct(ev.get('eval/hm'))}** | {wall:.0f} s |"


B2N_HEAD = [
    "| method | config | local | base | novel | HM | wall |",
    "|---|---|---|---|---|---|---|",
]


def main(argv: list[str] | None = None) -> int:
    from fedclip.methods import get_method, list_methods

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for quickstarts.md")
    parser.add_argument("--methods", default="*", help="comma-separated names (default: all)")
    parser.add_argument("--b2n", action="store_true", help="the base-to-novel protocol")
    args = parser.parse_args(argv)
    names = list_methods() if args.methods == "*" else args.methods.split(",")
    lines = [
        "| method | config | round 0 | personal (mean / worst) | global | dual | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    extra, render = (), row
    if args.b2n:
        lines, extra, render = list(B2N_HEAD), ("--data.base_to_novel=true",), b2n_row
    for name in names:
        config = get_method(name).quickstart
        with tempfile.TemporaryDirectory() as tmp:
            summary, wall = run(config, Path(tmp), *extra)
        lines.append(render(name, config, summary, wall))
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "quickstarts_b2n.md" if args.b2n else "quickstarts.md"
        (args.out / name).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
