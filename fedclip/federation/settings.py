"""What a run's config must satisfy before anything loads, and what identifies it for
resume (the fingerprint)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fedclip.client import runtime_terms
from fedclip.config_checks import check_selection
from fedclip.data.holdout import check_val_fraction
from fedclip.errors import ConfigError
from fedclip.federation.devices import check_fabric
from fedclip.privacy import check_strategy

# Keys that may change between a run and its resume: they do not change what is computed.
RESUMABLE_KEYS = {
    # select, select_by: which evaluated round is reported, not what is computed
    "federation": ("rounds", "eval_every", "max_client_failures", "select", "select_by"),
    "fabric": ("devices", "num_nodes"),  # any number of ranks computes the same result
}


def without_resumable(config: dict[str, Any]) -> dict[str, Any]:
    """A plain config without the RESUMABLE_KEYS (the sections are copied, not changed)."""
    core = dict(config)
    for section, keys in RESUMABLE_KEYS.items():
        core[section] = {k: v for k, v in (core.get(section) or {}).items() if k not in keys}
    return core


def config_fingerprint(config: dict[str, Any]) -> str:
    """Hash of what defines the computation (not where it is logged or how long it runs)."""
    volatile = {"output_dir", "run_name", "logger", "config", "resume", "__path__"}
    core = without_resumable({k: v for k, v in config.items() if k not in volatile})
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_config(cfg) -> None:
    """Raise ConfigError for a config no federation can run (checked before anything
    loads): loop settings, devices, the strategy/learner pairing, the extras the strategy
    sends against those the learner and the client runtime accept, and privacy."""
    fed = cfg.federation
    if fed.rounds < 1:
        raise ConfigError(f"federation.rounds must be >= 1, got {fed.rounds}")
    if not 0.0 < fed.fraction <= 1.0:
        raise ConfigError(f"federation.fraction must be in (0, 1], got {fed.fraction}")
    if fed.local_epochs < 1:
        raise ConfigError(f"federation.local_epochs must be >= 1, got {fed.local_epochs}")
    if fed.local_steps is not None and fed.local_steps < 1:
        raise ConfigError(f"federation.local_steps must be >= 1 or null, got {fed.local_steps}")
    if fed.eval_every < 1:
        raise ConfigError(f"federation.eval_every must be >= 1, got {fed.eval_every}")
    if fed.max_client_failures is not None and fed.max_client_failures < 0:
        raise ConfigError(
            f"federation.max_client_failures must be >= 0 or null, got {fed.max_client_failures}"
        )
    check_val_fraction(cfg.data.val_fraction)
    multilabel = bool(getattr(cfg.data.dataset, "multilabel", False))
    check_selection(fed, cfg.data.val_fraction, multilabel)
    check_fabric(cfg.fabric)
    cfg.strategy.check_learner(cfg.learner)
    check_extras(cfg.strategy, cfg.learner)
    check_strategy(cfg.privacy, cfg.strategy)


def check_extras(strategy, learner) -> None:
    """Every payload extra the strategy declares must be taken by the learner or applied by
    the client runtime."""
    sent = set(type(strategy).sends_extras)
    taken = set(type(learner).accepts_extras) | runtime_terms()
    missing = sorted(sent - taken)
    if missing:
        raise ConfigError(
            f"{type(strategy).__name__} sends {missing} to its clients, which "
            f"{type(learner).__name__} does not take (it takes "
            f"{sorted(type(learner).accepts_extras) or 'no extras'}); pair it with a learner "
            "made for it"
        )


def check_task(learner, multilabel: bool, base_to_novel: bool) -> None:
    """Refuse, in one line, a task the learner cannot run."""
    name = type(learner).__name__
    if multilabel and not type(learner).supports_multilabel:
        raise ConfigError(f"{name} does not support multi-label data sets")
    if base_to_novel and not type(learner).supports_base_to_novel:
        raise ConfigError(f"{name} does not support base-to-novel evaluation")
