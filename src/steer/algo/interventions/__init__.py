"""Entropy interventions: one small module each, all behind :class:`Intervention`."""

from steer.algo.interventions.base import Intervention, PolicyTokens, PPOTerms
from steer.algo.interventions.ce_gppo import GradientPreservingClip
from steer.algo.interventions.clip_cov import ClipCov
from steer.algo.interventions.clip_higher import ClipHigher
from steer.algo.interventions.entropy_adv import EntropyAdvantage
from steer.algo.interventions.entropic import EntropyPIControl
from steer.algo.interventions.entropy_bonus import AdaptiveEntropyBonus, EntropyBonus
from steer.algo.interventions.fork_tokens import ForkTokens
from steer.algo.interventions.kl_cov import KLCov
from steer.algo.interventions.stare import SurprisalAdvantageReweighting
from steer.algo.interventions.steer import SteerReweighting
from steer.algo.interventions.w_reinforce import WReinforce

__all__ = [
    "Intervention",
    "PolicyTokens",
    "PPOTerms",
    "AdaptiveEntropyBonus",
    "ClipCov",
    "ClipHigher",
    "EntropyAdvantage",
    "EntropyBonus",
    "EntropyPIControl",
    "ForkTokens",
    "GradientPreservingClip",
    "KLCov",
    "SteerReweighting",
    "SurprisalAdvantageReweighting",
    "WReinforce",
]
