"""Prompt learners: the methods fedclip implements, behind one contract (see base.py)."""

from fedclip.learners.adapter import AttentionAdapter
from fedclip.learners.base import Batch, OptimConfig, PromptLearner
from fedclip.learners.cocoop import ConditionalPrompt
from fedclip.learners.dpfpl import PrivateLowRankPrompt
from fedclip.learners.folio import PromptPortfolio
from fedclip.learners.kgcoop import KnowledgeGuidedPrompt
from fedclip.learners.maple import CoupledPrompt
from fedclip.learners.moap import MixtureOfPrompts, PromptGating
from fedclip.learners.multimodal import VisionLanguagePrompt
from fedclip.learners.mvp import FedMVP, PromptFormer
from fedclip.learners.otp import TransportPrompts
from fedclip.learners.pgp import LowRankPersonalPrompt
from fedclip.learners.pha import ProjectedLocalPrompt
from fedclip.learners.promptsrc import SelfRegulatingPrompt
from fedclip.learners.textual import TextualPrompt, ZeroShot
from fedclip.learners.tpg import GeneratedPrompt, TextPromptGenerator
from fedclip.learners.vpt import VisualPromptTuning

__all__ = [
    "AttentionAdapter",
    "Batch",
    "ConditionalPrompt",
    "CoupledPrompt",
    "FedMVP",
    "GeneratedPrompt",
    "KnowledgeGuidedPrompt",
    "LowRankPersonalPrompt",
    "MixtureOfPrompts",
    "OptimConfig",
    "PromptFormer",
    "PromptGating",
    "ProjectedLocalPrompt",
    "SelfRegulatingPrompt",
    "PrivateLowRankPrompt",
    "PromptLearner",
    "PromptPortfolio",
    "TextPromptGenerator",
    "TextualPrompt",
    "TransportPrompts",
    "VisionLanguagePrompt",
    "VisualPromptTuning",
    "ZeroShot",
]
