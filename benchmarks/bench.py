"""`make bench`: how fast fedclip trains each method, how its cost grows, and how much it saves
over the straightforward way of computing the same thing (the public reference code's).

Every speed number is a ratio against a reference path measured in the same process on the
same inputs, after checking that both give the same logits:

- reference text path: every class's full 77-token prompt through the text encoder at every
  step (no truncation, no shared prefix);
- reference image path: the frozen image encoder at every step (no feature cache);
- FedMVP's reference: attribute features and the frozen flipped-view targets recomputed at
  every step.

Sections (each written to results.json and results.md, plots as PNG): step and round speed
per method and precision, peak memory against the number of clients, traffic per client per
round, round time against clients and classes (fitted lines), and an accuracy sanity table
on the built-in offline data. `--quick` runs everything at toy sizes (used by the tests).

    python benchmarks/bench.py [--quick] [--out benchmarks/results] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: python benchmarks/bench.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import floor  # noqa: E402
from benchmarks.floor import count_flops, matmul_peak, peaks, timed  # noqa: E402, F401
from benchmarks.tables import markdown, merged, plot_scaling  # noqa: E402
from fedclip.backbone import BackboneConfig, FrozenCLIP, load_backbone
from fedclip.batch import Batch, Input
from fedclip.data.datasets import COLOURS, SHAPES
from fedclip.errors import BackboneError
from fedclip.federation import tensor_bytes
from fedclip.methods import get_method, list_methods

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Sizes:
    """The settings of one benchmark run."""

    models: tuple[str, ...]
    num_classes: int
    batch: int
    experts: int
    steps: int
    memory_clients: tuple[int, ...]
    memory_model: str
    scaling_clients: tuple[int, ...]
    scaling_classes: tuple[int, ...]
    accuracy_rounds: int
    accuracy_backbone: str | None  # pretrained tag of the tiny model (None: random weights)
    accuracy_images: tuple[int, int]  # train, test images per class
    bf16: bool = True  # also time fedclip's step under bf16 autocast
    peak_sides: tuple[int, ...] = (512, 1024, 2048)  # square matmuls timed (CPU; GPU: 4x)


FULL = Sizes(
    models=("ViT-B-32", "RN50"),
    num_classes=100,
    batch=32,
    experts=9,
    steps=2,
    memory_clients=(1, 10, 100),
    memory_model="ViT-B-32",
    scaling_clients=(2, 4, 8, 16),
    scaling_classes=(5, 10, 20, 40),
    accuracy_rounds=5,
    accuracy_backbone="shapes",
    accuracy_images=(40, 20),
)
QUICK = Sizes(
    models=("fedclip-tiny-vit", "fedclip-tiny-rn"),
    num_classes=10,
    batch=4,
    experts=2,
    steps=1,
    memory_clients=(1, 2),
    memory_model="fedclip-tiny-vit",
    scaling_clients=(2, 3),
    scaling_classes=(4, 6),
    accuracy_rounds=1,
    accuracy_backbone=None,
    accuracy_images=(4, 2),
    peak_sides=(256, 512),
)


def class_names(n: int) -> list[str]:
    """n readable two- or three-word class names (token lengths like real data sets')."""
    base = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    names = base + [f"dark {name}" for name in base] + [f"light {name}" for name in base]
    return names[:n]


# ---- step speed: fedclip against the reference path ------------------------------------------
def _sgd_step(learner, loss: torch.Tensor) -> None:
    params = [p for p in learner.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss.backward()
    with torch.no_grad():
        for p in params:
            p.add_(p.grad, alpha=-1e-3)


def bench_learner(name: str, clip: FrozenCLIP, sizes: Sizes):
    """Registered method `name`'s learner with its benchmark arguments, set up on `clip`
    and `sizes.num_classes` classes, holding `sizes.experts` example extras (None when
    the backbone cannot take it)."""
    method = get_method(name)
    tiny = method.tiny_args if clip.name.startswith("fedclip-tiny") else {}  # --quick
    learner = method.learner_class()(**{**method.learner_args, **tiny, **method.bench_args})
    try:
        learner.setup(clip, class_names(sizes.num_classes), seed=0)
    except BackboneError:  # e.g. visual prompts on a convolutional tower
        return None
    learner.receive(learner.example_extras(sizes.experts, torch.Generator().manual_seed(1)))
    return learner


def bench_method(name: str, clip: FrozenCLIP, sizes: Sizes, images, labels, augment=False):
    """fedclip's step and the learner's reference step (`PromptLearner.reference_loss`)
    on the same batch, and the max difference of their logits; None when the learner
    cannot run on `clip`."""
    learner = bench_learner(name, clip, sizes)
    if learner is None:
        return None
    if (b := get_method(name).bench_batch) is not None:  # B x C text sequences: fewer images
        images, labels = images[:b], labels[:b]
    inputs = type(learner).inputs
    index = torch.arange(len(labels))
    raw = Input.RAW_FEATURES in inputs
    if Input.IMAGES in inputs:
        targets = features = None
        if Input.FLIP_TARGETS in inputs:  # the cache: each view encoded once per sample
            with torch.no_grad():
                targets = torch.stack(
                    [clip.encode_image(images), clip.encode_image(images.flip(-1))], 1
                )
        if Input.FEATURES in inputs:  # the frozen unprompted features, cached
            with torch.no_grad():
                features = clip.encode_image(images)
        batch = Batch(labels=labels, index=index, images=images, targets=targets, features=features)
    elif Input.TOKENS in inputs:  # the dense-token cache, float16 as the data layer keeps it
        with torch.no_grad():
            tokens = clip.encode_dense(images).to(torch.float16).float()
        batch = Batch(labels=labels, index=index, tokens=tokens)
    else:
        with torch.no_grad():  # the cache: computed once per sample per process
            feats = clip.encode_image(images, normalize=not raw)
        batch = Batch(labels=labels, index=index, features=feats)

    def fast_step():
        if augment:  # random augmentation: no image cache, the text side's gain alone
            with torch.no_grad():
                batch.features = clip.encode_image(images, normalize=not raw)
        _sgd_step(learner, learner.training_loss(batch))

    def reference_step():
        _sgd_step(learner, learner.reference_loss(images, batch))

    learner.eval()
    with torch.no_grad():
        diff = float((learner(batch) - learner.reference_logits(images)).abs().max())
    learner.train()
    return fast_step, reference_step, diff


ONLY: set[str] | None = None  # --methods: the methods this run measures (None: all)


def chosen() -> list[str]:
    """The registered methods this run measures (`--methods`, default all)."""
    return [m for m in list_methods() if ONLY is None or m in ONLY]


def benched() -> list[str]:
    """The chosen methods with a fast path to time against their reference path."""
    return [m for m in chosen() if get_method(m).bench]


def _inputs(model: str, sizes: Sizes, device: torch.device):
    """The backbone (random weights) on `device`, a batch of random images at its input
    size and random labels."""
    clip = load_backbone(BackboneConfig(model=model))
    clip.to(device)
    size = clip.preprocess_val.transforms[0].size
    side = size if isinstance(size, int) else size[0]
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(sizes.batch, 3, side, side, generator=gen).to(device)
    labels = torch.randint(0, sizes.num_classes, (sizes.batch,), generator=gen).to(device)
    return clip, images, labels


def section_speed(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for model in sizes.models:
        clip, images, labels = _inputs(model, sizes, device)
        for method in benched():
            timed_pair = bench_method(method, clip, sizes, images, labels)
            if timed_pair is not None:
                rows += _speed_rows(model, method, *timed_pair, sizes, device)
        clip.to("cpu")
    return rows


def section_speed_augment(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    """Learners fed cached features, with random augmentation on: the image encoder runs at
    every step on both paths, so the ratio is the text side's gain alone."""
    rows = []
    no_bf16 = Sizes(**{**sizes.__dict__, "bf16": False})
    for model in sizes.models:
        clip, images, labels = _inputs(model, sizes, device)
        for method in benched():
            inputs = get_method(method).learner_class().inputs
            if Input.FEATURES not in inputs or Input.IMAGES in inputs:
                continue
            timed_pair = bench_method(method, clip, sizes, images, labels, augment=True)
            rows += _speed_rows(model, f"{method} (augmented)", *timed_pair, no_bf16, device)
        clip.to("cpu")
    return rows


def _speed_rows(model, method, fast, ref, diff, sizes, device) -> list[dict[str, Any]]:
    peak = peaks(sizes, device)
    flops: list[int] = []  # counted on each path's warm-up step: fedclip's, the reference's
    t_fast = timed(fast, sizes.steps, device, flops)
    t_ref = timed(ref, sizes.steps, device, flops)
    t_bf16 = float("nan")
    if sizes.bf16:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            t_bf16 = timed(fast, sizes.steps, device)
    bf16_peak = peak.get("bfloat16", float("nan"))
    row = {
        "model": model,
        "method": method,
        "fedclip_step_s": t_fast,
        "reference_step_s": t_ref,
        "speedup": t_ref / t_fast,
        "bf16_step_s": t_bf16,
        "bf16_speedup_vs_fp32": t_fast / t_bf16 if t_bf16 == t_bf16 else float("nan"),
        "max_logit_diff": diff,
        "same_logits": diff <= 1e-3 * 100,  # logits are scaled by s = 100: 1e-3 in cosine
        "device": str(device),
        # the distance to the floor: counted FLOPs over time, against this run's matmul peak
        "step_gflop": flops[0] / 1e9,
        "achieved_gflops": flops[0] / t_fast / 1e9,
        "peak_fp32_gflops": peak["float32"] / 1e9,
        "fraction_of_peak": flops[0] / t_fast / peak["float32"],
        "bf16_fraction_of_peak": flops[0] / t_bf16 / bf16_peak,  # nan without bf16
        "peak_bf16_gflops": bf16_peak / 1e9,
        "reference_gflop": flops[1] / 1e9,
        "reference_fraction_of_peak": flops[1] / t_ref / peak["float32"],
    }
    log.info("%s %s: %.3fs vs %.3fs reference (%.1fx), bf16 %.3fs, max logit diff %.2e; "
             "%.3g GFLOP, %.3g GFLOP/s = %.3f of the fp32 matmul peak",
             model, method, t_fast, t_ref, row["speedup"], t_bf16, diff, row["step_gflop"],
             row["achieved_gflops"], row["fraction_of_peak"])  # fmt: skip
    return [row]


# ---- memory against the number of clients ------------------------------------------------------
MEMORY_CHILD = r"""
import resource, sys, json, logging
logging.disable(logging.WARNING)
from fedclip.backbone import BackboneConfig
from fedclip.config import FabricConfig, FederationConfig, FitConfig
from fedclip.data import IID, Shapes
from fedclip.data.federated import DataConfig
from fedclip.federation import Federation
from fedclip.learners import TextualPrompt
model, clients = sys.argv[1], int(sys.argv[2])
cfg = FitConfig(backbone=BackboneConfig(model=model), learner=TextualPrompt(n_ctx=16),
    data=DataConfig(dataset=Shapes(num_classes=10, train_per_class=max(2, clients // 5 + 1),
    test_per_class=2, image_size=32), partitioner=IID(), num_clients=clients, batch_size=8),
    federation=FederationConfig(rounds=1, eval_at_start=False), fabric=FabricConfig(accelerator="cpu"))
Federation(cfg, None, show_progress=False).fit()
print(json.dumps({"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def section_memory(sizes: Sizes) -> list[dict[str, Any]]:
    rows = []
    for n in sizes.memory_clients:
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, sizes.memory_model, str(n)],
            capture_output=True,
            text=True,
            check=True,
        )
        mb = json.loads(out.stdout.strip().splitlines()[-1])["max_rss_mb"]
        rows.append({"model": sizes.memory_model, "clients": n, "peak_rss_mb": mb})
        log.info("memory: %d clients, peak RSS %.0f MB", n, mb)
    base = rows[0]["peak_rss_mb"]
    for r in rows:
        r["ratio_to_1_client"] = r["peak_rss_mb"] / base
    return rows


# ---- traffic per client per round --------------------------------------------------------------
def section_traffic(sizes: Sizes) -> list[dict[str, Any]]:
    """Bytes per sampled client per round of every registered method: up, its shared
    tensors (none when its strategy collects nothing); down, those plus its example extras
    (pFedMoAP's experts); and again after a change of its trainable set (FedMVP's switch)."""
    model = sizes.models[0]
    clip = load_backbone(BackboneConfig(model=model))
    rows = []
    for method in chosen():
        learner = bench_learner(method, clip, sizes)
        if learner is None:
            continue
        sends = get_method(method).strategy_class().collects_uploads
        extras = tensor_bytes(learner.example_extras(sizes.experts)) if sends else 0
        up = tensor_bytes(learner.shared_state()) if sends else 0
        rows.append({"method": method, "up_bytes": up, "down_bytes": up + extras})
        if learner.end_of_round(0.0):  # a new trainable (and shared) set
            up = tensor_bytes(learner.shared_state()) if sends else 0
            rows.append(
                {"method": f"{method} (after its switch)", "up_bytes": up, "down_bytes": up}
            )
    for r in rows:
        r["model"] = model
    return rows


# ---- scaling: round time against clients and classes --------------------------------------------
def _quickstart(name: str):
    """(learner, strategy, optim) of a registered method's offline quickstart config."""
    from fedclip.config import build_fit_config, fit_parser
    from fedclip.methods import CONFIGS, get_method

    parser = fit_parser()
    ns = parser.parse_args(["--config", str(CONFIGS / get_method(name).quickstart)])
    cfg, _ = build_fit_config(parser, ns)
    return cfg.learner, cfg.strategy, cfg.optim


def _round_time(method: str, clients: int, classes: int) -> float:
    from fedclip.config import FabricConfig, FederationConfig, FitConfig
    from fedclip.data import IID, Shapes
    from fedclip.data.federated import DataConfig
    from fedclip.federation import Federation
    from fedclip.methods import get_method

    learner, strategy = get_method(method).build(tiny=True)
    cfg = FitConfig(
        backbone=BackboneConfig(model="fedclip-tiny-vit"),
        learner=learner,
        strategy=strategy,
        data=DataConfig(
            dataset=Shapes(num_classes=classes, train_per_class=8, test_per_class=2),
            partitioner=IID(),
            num_clients=clients,
            batch_size=16,
        ),
        federation=FederationConfig(rounds=2, eval_at_start=False, eval_every=10),
        fabric=FabricConfig(accelerator="cpu"),
    )
    history = Federation(cfg, None, show_progress=False).fit()
    return history[-1]["time/round_s"]  # round 2: caches warm, experts in play


def section_scaling(sizes: Sizes) -> dict[str, Any]:

    out: dict[str, Any] = {"clients": {}, "classes": {}}
    for method in benched():
        for axis, values, fixed in (
            ("clients", sizes.scaling_clients, {"classes": 10}),
            ("classes", sizes.scaling_classes, {"clients": 4}),
        ):
            times = [_round_time(method, **{axis: v, **fixed}) for v in values]
            slope, intercept = np.polyfit(values, times, 1)
            out[axis][method] = {
                "x": list(values),
                "round_s": times,
                "slope_s": float(slope),
                "intercept_s": float(intercept),
            }
            log.info("scaling %s vs %s: %.3f s + %.4f s per unit", method, axis, intercept, slope)
    return out


# ---- accuracy sanity table ------------------------------------------------------------------------
def section_accuracy(sizes: Sizes) -> list[dict[str, Any]]:
    """Every registered method with its quickstart's learner, strategy and optimiser on
    the same offline task (20 Shapes classes under tungsten light, the quickstarts' shift
    from the backbone's pre-training; 10 clients, IID and Dirichlet 0.1)."""
    from fedclip.config import FabricConfig, FederationConfig, FitConfig
    from fedclip.data import IID, Dirichlet, Shapes
    from fedclip.data.federated import DataConfig
    from fedclip.federation import Federation

    rows = []
    dirichlet = lambda: Dirichlet(0.1, min_size=2 if sizes.accuracy_images[0] < 10 else 10)  # noqa: E731
    for split_name, partitioner in (("IID", IID), ("Dirichlet 0.1", dirichlet)):
        for method in chosen():
            learner, strategy, optim = _quickstart(method)
            cfg = FitConfig(
                backbone=BackboneConfig(
                    model="fedclip-tiny-vit", pretrained=sizes.accuracy_backbone
                ),
                learner=learner,
                strategy=strategy,
                data=DataConfig(
                    dataset=Shapes(
                        num_classes=20,
                        train_per_class=sizes.accuracy_images[0],
                        test_per_class=sizes.accuracy_images[1],
                        style="tungsten",
                    ),
                    partitioner=partitioner(),
                    num_clients=10,
                    batch_size=32,
                ),
                federation=FederationConfig(rounds=sizes.accuracy_rounds, local_epochs=2),
                optim=optim,
                fabric=FabricConfig(accelerator="cpu"),
            )
            last = Federation(cfg, None, show_progress=False).fit()[-1]
            rows.append(
                {
                    "partition": split_name,
                    "method": method,
                    "acc_mean": last["eval/acc_mean"],
                    "acc_min": last["eval/acc_min"],
                    "global": last["eval/global"],
                    "dual": last["eval/dual"],
                }
            )
            log.info("accuracy %s %s: %.3f", split_name, method, last["eval/acc_mean"])
    return rows


# ---- output ---------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    import open_clip

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return env


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes (for the tests)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per path")
    parser.add_argument(
        "--no-bf16", action="store_true", help="skip the bf16 timing (slow on CPUs without bf16)"
    )
    parser.add_argument(
        "--sections",
        default="speed,speed_augment,memory,traffic,scaling,accuracy",
        help="comma-separated subset of the sections",
    )
    parser.add_argument(
        "--methods", default=None, help="comma-separated registry names (default: all)"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep OUT/results.json's other rows: replace only what this run measured",
    )
    args = parser.parse_args(argv)
    global ONLY
    ONLY = None if args.methods is None else set(args.methods.split(","))
    for name in ONLY or ():
        get_method(name)  # an unknown name stops here, naming the registered ones
    logging.basicConfig(level=logging.ERROR, format="%(message)s")  # quiet libraries
    log.setLevel(logging.INFO)  # this script's numbers as they come
    sizes = QUICK if args.quick else FULL
    if args.steps is not None or args.no_bf16:
        from dataclasses import replace

        sizes = replace(
            sizes, steps=args.steps or sizes.steps, bf16=sizes.bf16 and not args.no_bf16
        )
    device = torch.device(args.device)
    floor.PEAKS.clear()  # measured again in every run (the rows store their run's peak)
    sections = set(args.sections.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "environment": environment(device),
        "settings": "quick" if args.quick else "full",
        "sizes": sizes.__dict__,
        "speed": (section_speed(sizes, device) if "speed" in sections else [])
        + (section_speed_augment(sizes, device) if "speed_augment" in sections else []),
        "memory": section_memory(sizes) if "memory" in sections else [],
        "traffic": section_traffic(sizes) if "traffic" in sections else [],
        "scaling": section_scaling(sizes)
        if "scaling" in sections
        else {"clients": {}, "classes": {}},
        "accuracy": section_accuracy(sizes) if "accuracy" in sections else [],
    }
    if floor.PEAKS:  # measured by the speed sections, in this run
        results["environment"]["matmul_peak_gflops"] = {k: v / 1e9 for k, v in floor.PEAKS.items()}
    previous = out / "results.json"
    if args.merge and previous.exists():
        results = merged(json.loads(previous.read_text()), results, sections)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    (out / "results.md").write_text(markdown(results))
    if results["scaling"]["clients"]:
        plot_scaling(results["scaling"], out / "scaling.png")
    log.info("wrote %s", out / "results.md")
    return results


if __name__ == "__main__":
    main()
