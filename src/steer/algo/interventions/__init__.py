"""Entropy interventions: one small module each, all behind :class:`Intervention`, and
:func:`assemble_interventions`, which builds a run's list of them."""

from __future__ import annotations

from typing import Any, Sequence

from steer.algo.interventions.base import Intervention, PolicyTokens, PPOTerms
from steer.algo.interventions.ce_gppo import GradientPreservingClip
from steer.algo.interventions.clip_cov import ClipCov
from steer.algo.interventions.clip_higher import ClipHigher
from steer.algo.interventions.entropy_adv import EntropyAdvantage
from steer.algo.interventions.entropic import EntropyPIControl
from steer.algo.interventions.entropy_bonus import AdaptiveEntropyBonus, EntropyBonus
from steer.algo.interventions.fork_tokens import ForkTokens
from steer.algo.interventions.kl_cov import KLCov
from steer.algo.interventions.kl_penalty import ReferenceKLPenalty
from steer.algo.interventions.rollout_correction import RolloutCorrection
from steer.algo.interventions.stare import SurprisalAdvantageReweighting
from steer.algo.interventions.steer import SteerReweighting
from steer.algo.interventions.w_reinforce import WReinforce

__all__ = [
    "assemble_interventions",
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
    "ReferenceKLPenalty",
    "RolloutCorrection",
    "SteerReweighting",
    "SurprisalAdvantageReweighting",
    "WReinforce",
]


def assemble_interventions(configured: Sequence[Intervention], algorithm: Any) -> list[Intervention]:
    """Every intervention of a run, in the order their hooks run: the configured ones
    (``intervention.components``, already built), then the KL penalty to the reference model
    (when ``algorithm.kl.coef > 0``) and the sampler/trainer mismatch correction (when
    ``algorithm.rollout_correction != none``).

    ``algorithm`` is the run's ``AlgorithmConfig`` (read for ``kl`` and ``rollout_correction*``).
    """
    interventions = list(configured)
    if algorithm.kl.coef > 0:
        interventions.append(ReferenceKLPenalty(algorithm.kl.coef, algorithm.kl.estimator))
    if algorithm.rollout_correction != "none":  # see rollout_correction.py
        interventions.append(
            RolloutCorrection(algorithm.rollout_correction, algorithm.rollout_correction_cap, algorithm.rollout_correction_threshold)
        )
    return interventions
