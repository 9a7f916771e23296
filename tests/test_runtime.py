"""The client runtime: optimizers rebuilt after a learner's trainable set changes keep the
schedule's position; declared extras; the learner factory."""

from __future__ import annotations

import math

import pytest

from fedclip.errors import ConfigError
from fedclip.federation import Federation
from fedclip.federation.settings import check_extras
from fedclip.learners import FedMVP, TextualPrompt
from fedclip.strategies import FedProx, PFedMoAP

from .conftest import small_config


def test_lr_schedule_continues_across_fedmvp_lora_switch():
    """sigma 100 switches every client to its LoRA factors after round 1; the cosine over
    the run must go on from the step it reached, not restart with the new optimizer."""
    cfg = small_config(
        learner=FedMVP(attributes="shapes", lora=True, sigma=100.0, lora_rank=2, random_flip=False),
        rounds=3,
    )
    cfg.optim.cosine_span = "run"
    fed = Federation(cfg, None, show_progress=False)
    per_round = fed.runtime.steps_per_round(0)
    total = per_round * cfg.federation.rounds
    seen = []
    for stop in (1, 2, 3):
        fed.fit(stop_after=stop)
        client = fed.clients[0]
        assert client.learner.lora_phase
        sched = client.optimizer_pairs[0][1]
        seen.append((sched.last_epoch, client.optimizer_pairs[0][0].param_groups[0]["lr"]))
    for rounds, (step, lr) in zip((1, 2, 3), seen, strict=True):
        assert step == rounds * per_round
        expected = cfg.optim.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        assert lr == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # the optimizer after the switch trains the LoRA factors only
    trained = {
        id(p) for g in fed.clients[0].optimizer_pairs[0][0].param_groups for p in g["params"]
    }
    names = {n for n, p in fed.clients[0].learner.named_parameters() if id(p) in trained}
    assert names and all("lora" in n for n in names)


def test_extras_a_learner_does_not_take_are_refused_at_config_time():
    check_extras(FedProx(mu=0.1), TextualPrompt())  # a runtime term: every learner takes it
    with pytest.raises(ConfigError, match=r"PFedMoAP sends \['expert_ids', 'experts'\]"):
        check_extras(PFedMoAP(), TextualPrompt())


def test_a_learner_that_does_not_declare_its_tensors_is_refused(tiny_vit):
    """No default shares everything: an undeclared trainable tensor, or a learner without
    shared_keys(), stops at construction with ContractError (a bug, not bad input)."""
    import torch

    from fedclip.errors import ContractError, FedclipError
    from fedclip.learners import MixtureOfPrompts, PromptLearner
    from fedclip.learners.base import make_learner

    class ForgotGating(MixtureOfPrompts):
        def personal_keys(self):
            return []

    class NoDeclaration(PromptLearner):
        def setup(self, clip, classnames, seed):
            super().setup(clip, classnames, seed)
            self.w = torch.nn.Parameter(torch.zeros(3))

    names = ["red circle", "blue square"]
    with pytest.raises(ContractError, match=r"gating\..* are neither in shared_keys"):
        make_learner(ForgotGating(n_ctx=2, d_gating=32, gating_heads=4), tiny_vit, names, 0)
    with pytest.raises(ContractError, match="must declare what it uploads"):
        make_learner(NoDeclaration(), tiny_vit, names, 0)
    assert not issubclass(ContractError, FedclipError)
