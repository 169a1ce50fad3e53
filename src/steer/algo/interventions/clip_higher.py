"""Clip-higher (Yu et al. 2025, DAPO, arXiv 2503.14476): decoupled PPO clip bounds.

The ratio is clipped to ``[1 - low, 1 + high]`` with ``high > low`` so that low-probability
tokens with positive advantage can grow more before their gradient is cut, which keeps entropy
from collapsing. DAPO uses ``low = 0.2``, ``high = 0.28``; the STEER paper's extreme setting is
``low = 0.99``, ``high = 5`` (run/run_exp_extreme.sh in the released code). The dual-clip constant
is left to the algorithm config.

The clip only binds when the ratio moves away from 1, so strictly on-policy (one mini-batch, one
epoch) it has no effect: ``uses_ratio = True``.
"""

from __future__ import annotations

from steer.algo.interventions.base import ClipConfig, Intervention


class ClipHigher(Intervention):
    """Set the PPO clip bounds.

    Args:
        low: ``epsilon_low`` in [0, 1] (the ratio's lower bound ``1 - low`` stays >= 0).
        high: ``epsilon_high >= 0``.
    """

    name = "clip_higher"
    uses_ratio = True

    def __init__(self, low: float = 0.2, high: float = 0.28) -> None:
        if not 0.0 <= low <= 1.0:
            raise ValueError(f"clip_higher low (epsilon_low) must be in [0, 1], got {low}")
        if not high >= 0.0:
            raise ValueError(f"clip_higher high (epsilon_high) must be >= 0, got {high}")
        self.low = float(low)
        self.high = float(high)

    def adjust_clip(self, clip: ClipConfig) -> ClipConfig:
        return clip.with_bounds(low=self.low, high=self.high)
