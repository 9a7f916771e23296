"""Prompt learners: the methods fedclip implements, behind one contract (see base.py)."""

from fedclip.learners.base import Batch, OptimConfig, PromptLearner
from fedclip.learners.moap import MixtureOfPrompts, PromptGating
from fedclip.learners.mvp import FedMVP, PromptFormer
from fedclip.learners.otp import TransportPrompts
from fedclip.learners.textual import TextualPrompt, ZeroShot

__all__ = [
    "Batch",
    "FedMVP",
    "MixtureOfPrompts",
    "OptimConfig",
    "PromptFormer",
    "PromptGating",
    "PromptLearner",
    "TextualPrompt",
    "TransportPrompts",
    "ZeroShot",
]
