"""The method registry (timm's `list_models` shape): each method names its learner, its
default strategy and its configs. The README's method table, the bench, the conformance
tests and the family x learner tests read it; no other file lists methods.

Adding a method: a learner file in fedclip/learners/ (and, if it needs one, a strategy in
fedclip/strategies/), an offline quickstart YAML in configs/, and one `register(...)` line
below. Nothing else changes: the round loop, executors, Flower, the data layer, the bench
and the test tables take it from here.

This module imports nothing heavy (no torch): `fedclip --help` and the registry stay fast.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class Method:
    """A federated prompt-learning method.

    name: its registry name (lower case); learner / strategy: class paths with their default
    init_args; quickstart: the offline quickstart config (configs/NAME); paper: a config in
    the paper's setting (needs real weights and data), if any; reference: the paper;
    summary: one line on what it learns and what travels; learner_args / strategy_args:
    the paper's defaults where they differ from the classes'; tiny_args: learner arguments
    that fit fedclip's tiny offline backbones (tests, benchmarks); bench: it has a fast
    path that `make bench` times against its reference path (`reference_loss`), built with
    learner_args updated by bench_args, on bench_batch images when the bench's batch would
    not fit (None: the bench's).
    """

    name: str
    learner: str
    strategy: str
    quickstart: str
    summary: str
    reference: str
    paper: str | None = None
    learner_args: dict[str, Any] = field(default_factory=dict)
    strategy_args: dict[str, Any] = field(default_factory=dict)
    tiny_args: dict[str, Any] = field(default_factory=dict)
    bench: bool = False
    bench_args: dict[str, Any] = field(default_factory=dict)
    bench_batch: int | None = None

    def learner_class(self) -> type:
        return _resolve(self.learner)

    def strategy_class(self) -> type:
        return _resolve(self.strategy)

    def build(self, tiny: bool = False) -> tuple[Any, Any]:
        """(learner, strategy) instances with the registry's default arguments (with
        `tiny`, the learner's arguments for the tiny offline backbones)."""
        args = {**self.learner_args, **(self.tiny_args if tiny else {})}
        return self.learner_class()(**args), self.strategy_class()(**self.strategy_args)

    def config(self) -> dict[str, Any]:
        """The `learner:` and `strategy:` sections of a config running this method."""
        return {
            "learner": {"class_path": self.learner, "init_args": dict(self.learner_args)},
            "strategy": {"class_path": self.strategy, "init_args": dict(self.strategy_args)},
        }


def _resolve(path: str) -> type:
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method (a name may be registered once)."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered already")
    _REGISTRY[method.name] = method
    return method


def list_methods(pattern: str = "*") -> list[str]:
    """Registered method names matching a shell-style pattern, in registration order."""
    return [n for n in _REGISTRY if fnmatch.fnmatch(n, pattern)]


def get_method(name: str) -> Method:
    """The registered method `name`; an unknown name raises ConfigError naming the known."""
    if name not in _REGISTRY:
        from fedclip.errors import ConfigError

        raise ConfigError(f"unknown method {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


# ---- the methods ---------------------------------------------------------------------------
L, S = "fedclip.learners", "fedclip.strategies"
register(Method(
    "zeroshot", f"{L}.ZeroShot", f"{S}.LocalOnly", "zeroshot_quickstart.yaml",
    "frozen CLIP with hand-written templates; nothing is learnt or sent",
    "CLIP: Radford et al., ICML 2021",
))  # fmt: skip
register(Method(
    "coop", f"{L}.TextualPrompt", f"{S}.LocalOnly", "coop_quickstart.yaml",
    "each client learns its own context (CoOp); nothing is sent",
    "CoOp: Zhou et al., IJCV 2022", learner_args={"n_ctx": 16}, tiny_args={"n_ctx": 4},
))  # fmt: skip
register(Method(
    "promptfl", f"{L}.TextualPrompt", f"{S}.FedAvg", "quickstart.yaml",
    "one context shared by all clients; FedAvg of the context",
    "PromptFL: Guo et al., IEEE TMC 2023", paper="promptfl_cifar100.yaml",
    learner_args={"n_ctx": 16}, tiny_args={"n_ctx": 4}, bench=True,
))  # fmt: skip
register(Method(
    "fedprox", f"{L}.TextualPrompt", f"{S}.FedProx", "fedprox_quickstart.yaml",
    "PromptFL plus mu/2 times the squared distance to the global context in every client's loss",
    "FedProx: Li et al., MLSys 2020", learner_args={"n_ctx": 16}, tiny_args={"n_ctx": 4},
    strategy_args={"mu": 0.01},
))  # fmt: skip
register(Method(
    "pfedmoap", f"{L}.MixtureOfPrompts", f"{S}.PFedMoAP", "pfedmoap_quickstart.yaml",
    "a local context plus a personal gating network over other clients' contexts (experts); "
    "the context is averaged, the gating stays",
    "pFedMoAP: Luo et al., ICLR 2025", paper="pfedmoap_cifar100.yaml", bench=True,
    tiny_args={"n_ctx": 4, "d_gating": 32, "gating_heads": 4},
))  # fmt: skip
register(Method(
    "fedmvp", f"{L}.FedMVP", f"{S}.FedAvg", "fedmvp_quickstart.yaml",
    "a PromptFormer turning patches and class attributes into visual prompts; FedAvg of "
    "it, then of rank-8 LoRA factors only",
    "FedMVP: Singha et al., ICCV 2025", paper="fedmvp_cifar100_b2n.yaml",
    learner_args={"attributes": "shapes"}, strategy_args={"weighted": False}, bench=True,
    tiny_args={"random_flip": False},
    bench_args={  # 10 attribute sentences per class for the benchmark's made-up classes
        "attributes": None, "random_flip": False,
        "fallback_templates": [f"a photo of a {{classname}}, view {i}." for i in range(10)],
    },
))  # fmt: skip
register(Method(
    "fedotp", f"{L}.TransportPrompts", f"{S}.FedAvg", "fedotp_quickstart.yaml",
    "a global and a local prompt matched to the image patches by unbalanced optimal "
    "transport; the global prompt is averaged, the local one stays",
    "FedOTP: Li et al., CVPR 2024", paper="fedotp_caltech101.yaml", bench=True,
    learner_args={"n_ctx": 16, "solver": "cot", "eps": 0.01, "rho": 0.8, "max_iter": 100},
    tiny_args={"n_ctx": 4},
))  # fmt: skip
register(Method(
    "fedpgp", f"{L}.LowRankPersonalPrompt", f"{S}.FedAvg", "fedpgp_quickstart.yaml",
    "a global context sigma plus a personal low-rank U V, with a contrastive pull of sigma "
    "to the frozen anchor; sigma is averaged, U and V stay",
    "FedPGP: Cui et al., ICML 2024", paper="fedpgp_caltech101.yaml", bench=True,
    learner_args={"n_ctx": 16, "bottleneck": 8, "mu": 0.5, "temp": 0.5},
    tiny_args={"n_ctx": 4, "bottleneck": 2},
))  # fmt: skip
register(Method(
    "promptfolio", f"{L}.PromptPortfolio", f"{S}.FedAvg", "promptfolio_quickstart.yaml",
    "a global and a local context whose text features are mixed with a fixed theta; the "
    "global context is averaged, the local one stays",
    "PromptFolio: Pan et al., NeurIPS 2024", paper="promptfolio_caltech101.yaml", bench=True,
    learner_args={"n_ctx": 8, "theta": 0.4}, tiny_args={"n_ctx": 4},
))  # fmt: skip
register(Method(
    "fedpha", f"{L}.ProjectedLocalPrompt", f"{S}.FedAvg", "fedpha_quickstart.yaml",
    "a global context (averaged) and a personal local context of any length, tied by an SVD "
    "projection onto the global context's weak singular directions; only the global travels",
    "FedPHA: Fang et al., ICML 2025", paper="fedpha_caltech101.yaml", bench=True,
    learner_args={"n_ctx": 16, "n_local": 16}, tiny_args={"n_ctx": 5, "n_local": 4},
))  # fmt: skip
register(Method(
    "dpfpl", f"{L}.PrivateLowRankPrompt", f"{S}.FedAvg", "dpfpl_quickstart.yaml",
    "a global prompt (averaged, client-level DP via `privacy:`) plus a personal local prompt "
    "factorised low-rank + residual at every step, its factor gradients clipped per example "
    "and noised (local DP)",
    "DP-FPL: Tran et al., ICLR 2025", paper="dpfpl_caltech101.yaml",
    learner_args={"n_ctx": 16, "rank": 8, "clip_norm": 10.0},
    strategy_args={"weighted": False}, tiny_args={"n_ctx": 4, "rank": 2},
))  # fmt: skip
register(Method(
    "kgcoop", f"{L}.KnowledgeGuidedPrompt", f"{S}.FedAvg", "kgcoop_quickstart.yaml",
    "one shared context (FedAvg, as PromptFL) pulled towards the frozen features of a "
    "hand-crafted template by w (1 - mean cosine)",
    "KgCoOp: Yao et al., CVPR 2023", paper="kgcoop_b2n.yaml", bench=True,
    learner_args={"n_ctx": 4, "ctx_init": "a photo of a", "w": 8.0}, tiny_args={"n_ctx": 4},
))  # fmt: skip
register(Method(
    "adapter", f"{L}.AttentionAdapter", f"{S}.FedAvg", "adapter_quickstart.yaml",
    "an attention adapter re-weighting the frozen image feature against frozen class texts "
    "(FedCLIP); FedAvg of the adapter (~0.5 M parameters)",
    "FedCLIP: Lu et al., arXiv 2302.13485 (2023)", paper="adapter_pacs.yaml", bench=True,
))  # fmt: skip
register(Method(
    "ivlp", f"{L}.VisionLanguagePrompt", f"{S}.FedAvg", "ivlp_quickstart.yaml",
    "independent text and visual prompt tokens, deep in both towers (MaPLe's IVLP "
    "baseline); FedAvg of all of them",
    "IVLP: Khattak et al., CVPR 2023 (MaPLe's baseline)", paper="ivlp_b2n.yaml", bench=True,
    learner_args={"n_ctx": 2, "n_vision": 2, "text_depth": 12, "vision_depth": 12},
    tiny_args={"text_depth": 2, "vision_depth": 2},
))  # fmt: skip
register(Method(
    "maple", f"{L}.CoupledPrompt", f"{S}.FedAvg", "maple_quickstart.yaml",
    "a deep text prompt whose every layer is mapped linearly into visual prompts; FedAvg of "
    "the prompts and the couplings (about 3.56 M values at ViT-B/16)",
    "MaPLe: Khattak et al., CVPR 2023", paper="maple_b2n.yaml", bench=True,
    learner_args={"n_ctx": 2, "prompt_depth": 9}, tiny_args={"prompt_depth": 2},
))  # fmt: skip
register(Method(
    "fedtpg", f"{L}.GeneratedPrompt", f"{S}.FedAvg", "fedtpg_quickstart.yaml",
    "a shared generator turning the frozen text features of the class names into the "
    "context; the whole generator is averaged, nothing is personal",
    "FedTPG: Qiu et al., ICLR 2024", paper="fedtpg_b2n.yaml", bench=True,
    learner_args={"n_ctx": 4, "d_ctx": 1, "depth": 0},
))  # fmt: skip
register(Method(
    "cocoop", f"{L}.ConditionalPrompt", f"{S}.FedAvg", "cocoop_quickstart.yaml",
    "a context shifted per image by a meta-net on the image feature (B x C text prompts "
    "per step); FedAvg of the context and the meta-net",
    "CoCoOp: Zhou et al., CVPR 2022", paper="cocoop_b2n.yaml", bench=True,
    learner_args={"n_ctx": 4, "ctx_init": "a photo of a"}, tiny_args={"n_ctx": 4},
    bench_batch=1,  # B x C prompts per step; the official CoCoOp batch is 1
))  # fmt: skip
register(Method(
    "vpt_shallow", f"{L}.VisualPromptTuning", f"{S}.FedAvg", "vpt_quickstart.yaml",
    "visual prompt tokens at the vision tower's input, classified by the frozen "
    "'a photo of a {class}.' text features; FedAvg of the tokens",
    "VPT: Jia et al., ECCV 2022", bench=True, learner_args={"num_prompts": 8},
))  # fmt: skip
register(Method(
    "vpt_deep", f"{L}.VisualPromptTuning", f"{S}.FedAvg", "vpt_deep_quickstart.yaml",
    "visual prompt tokens at the input and replaced before every vision block (VPT-deep), "
    "frozen text side; FedAvg of the tokens",
    "VPT: Jia et al., ECCV 2022", bench=True,
    learner_args={"num_prompts": 8, "deep": True},
))  # fmt: skip
register(Method(
    "promptsrc", f"{L}.SelfRegulatingPrompt", f"{S}.GaussianPromptAggregation",
    "promptsrc_quickstart.yaml",
    "IVLP prompts (4+4, depth 9) with L1 pulls to the frozen text (60 templates) and image "
    "features and a KL to the zero-shot logits; FedAvg of the prompts, a Gaussian average "
    "over rounds kept at the server and evaluated (eval/global_gpa)",
    "PromptSRC: Khattak et al., ICCV 2023", paper="promptsrc_b2n.yaml", bench=True,
    learner_args={"n_ctx": 4, "n_vision": 4, "text_depth": 9, "vision_depth": 9},
    tiny_args={"text_depth": 2, "vision_depth": 2},
))  # fmt: skip
del L, S


def markdown_table() -> str:
    """The README's method table, from the registry (a test keeps them equal)."""
    rows = [
        "| method | paper | learner | strategy | what it learns and sends | offline quickstart | "
        "paper setting |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in list_methods():
        m = get_method(name)
        args = ", ".join(
            f"`{k}: {v}`".replace("False", "false") for k, v in m.strategy_args.items()
        )
        strategy = f"`{m.strategy}`" + (f" ({args})" if args else "")
        paper = f"`configs/{m.paper}`" if m.paper else "-"
        rows.append(
            f"| {name} | {m.reference} | `{m.learner}` | {strategy} | {m.summary} | "
            f"`configs/{m.quickstart}` | {paper} |"
        )
    return "\n".join(rows)
