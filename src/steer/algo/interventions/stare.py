"""STARE: Surprisal-guided Token-level Advantage Reweighting for policy Entropy stability (Luo et al.
2026, arXiv 2606.19236).

Equations as in the authors' released code (github.com/hp-luo/STARE, ``verl/trainer/ppo/core_algos.py``:
``compute_stare_token_weights`` and ``STAREController``, which cite paper Sections 4.1-4.4):

1. Candidates. Valid tokens are split by the sign of their advantage: ``T+ = {A > 0}``,
   ``T- = {A < 0}`` (tokens with ``A = 0`` are never reweighted).
2. Entropy-critical subsets. Within each candidate set, the ``k = int(n P + 0.999999)`` tokens
   (``n`` the set's size, at least 1 and at most ``n``; none when ``n = 0``) of largest surprisal
   ``s = -log pi`` (current policy, no gradient) form ``L+`` (and ``L-``). Ties go to the earliest
   tokens in row-major order (rank order across ranks); the released ``torch.topk`` leaves them
   unspecified.
3. Weights. With the gate on: ``w = W`` on ``L+``; with variant ``C2`` also ``w = M`` on ``L-``;
   ``w = 1`` elsewhere. The weight multiplies the token's (dual-)clipped PPO loss
   (``J = (1/N) sum w * J_GRPO``); the aggregation denominator is unchanged.
4. Closed-loop gate (Section 4.3): ``gate_on = [H < H_target]`` with ``H`` the batch token-mean
   entropy of the rollout policy; a non-finite ``H`` leaves the controller unchanged.
5. Optional adaptive weights (Section 4.4, ``adaptive: true``):
   ``W <- clip(W + alpha sgn(H_target - H), 1, w_max)``, ``M <- clip(M - alpha sgn(H_target - H), m_min, 1)``.

Deviation (timing of the gate): the released trainer updates the gate from the *current* RL step's
batch entropy before that step's update. The intervention interface offers the step's reduced
metrics only after the update (:meth:`after_rl_step`, metric ``actor/entropy``, the same batch
token-mean of the rollout policy's entropy), so here the gate and the adaptive weights of step
``k`` come from the entropy of step ``k - 1``; at step 0 the gate is on (the released initial state).

The subsets are chosen per micro-batch (``scope: microbatch``, as released: the loss function runs
on each GPU micro-batch) or over the whole mini-batch on every rank (``scope: global``).
Controller state (gate, ``W``, ``M``, last entropy) is checkpointed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from steer.algo.aggregation import masked_mean
from steer.algo.interventions.base import Intervention, PolicyTokens, PPOTerms
from steer.algo.interventions.scope import NEEDS_PPO, RowCursor, check_scope, own_selection
from steer.distributed import all_gather_1d

VARIANTS = ("O1", "C2")


def subset_size(count: int, top_ratio: float) -> int:
    """``k`` of a candidate set of ``count`` tokens: ``int(count * P + 0.999999)`` clamped to
    ``[1, count]`` (the released code's ceiling); 0 for an empty set or ``P = 0``."""
    if count == 0 or top_ratio <= 0.0:
        return 0
    return min(max(1, int(count * top_ratio + 0.999999)), count)


def top_surprisal(
    surprisal: torch.Tensor, candidates: torch.Tensor, top_ratio: float, across_ranks: bool = False
) -> torch.Tensor:
    """The ``[B, T]`` bool mask of the ``k`` highest-surprisal tokens among ``candidates``.

    With ``across_ranks`` the candidates of every rank are ranked together (rank order breaks ties).
    """
    flat = candidates.flatten().nonzero().squeeze(1)
    values, offset = surprisal.flatten()[flat], 0
    if across_ranks:
        values, offset = all_gather_1d(values)
    count = subset_size(values.numel(), top_ratio)
    order = torch.sort(values, descending=True, stable=True).indices[:count]
    return own_selection(order, offset, flat, candidates)


class SurprisalAdvantageReweighting(Intervention):
    """Reweight the PPO loss of the highest-surprisal tokens of each advantage sign, gated by entropy.

    Args:
        top_ratio: ``P`` in [0, 1], the share of each candidate set that is reweighted.
        positive_weight: ``W > 0``, the weight of ``L+`` (``> 1`` amplifies; initial value when adaptive).
        negative_weight: ``M > 0``, the weight of ``L-`` (variant C2 only; initial value when adaptive).
        target_entropy: ``H_target > 0`` (nats): reweight only while the batch entropy is below it.
        variant: ``O1`` (only ``L+``) or ``C2`` (``L+`` and ``L-``).
        adaptive: move ``W`` and ``M`` by ``alpha`` per RL step toward more (less) reweighting while
            the entropy is below (above) the target.
        alpha: step of the adaptive schedule, ``>= 0``.
        w_max: upper bound of ``W`` when adaptive, ``>= 1``.
        m_min: lower bound of ``M`` when adaptive, in (0, 1].
        scope: ``microbatch`` (released) or ``global`` (mini-batch, all ranks).
        entropy_key: the metric holding the step's batch token-mean entropy.
    """

    name = "stare"

    def __init__(
        self,
        top_ratio: float = 0.1,
        positive_weight: float = 1.1,
        negative_weight: float = 0.9,
        target_entropy: float = 0.3,
        variant: str = "O1",
        adaptive: bool = False,
        alpha: float = 0.01,
        w_max: float = 1.5,
        m_min: float = 0.5,
        scope: str = "microbatch",
        entropy_key: str = "actor/entropy",
    ) -> None:
        if not 0.0 <= top_ratio <= 1.0:
            raise ValueError(f"stare top_ratio must be in [0, 1], got {top_ratio}")
        if not positive_weight > 0.0:
            raise ValueError(f"stare positive_weight must be > 0, got {positive_weight}")
        if not negative_weight > 0.0:
            raise ValueError(f"stare negative_weight must be > 0, got {negative_weight}")
        if not target_entropy > 0.0:
            raise ValueError(f"stare target_entropy must be > 0, got {target_entropy}")
        if variant not in VARIANTS:
            raise ValueError(f"stare variant must be one of {list(VARIANTS)}, got {variant!r}")
        if not alpha >= 0.0:
            raise ValueError(f"stare alpha must be >= 0, got {alpha}")
        if not w_max >= 1.0:
            raise ValueError(f"stare w_max must be >= 1, got {w_max}")
        if not 0.0 < m_min <= 1.0:
            raise ValueError(f"stare m_min must be in (0, 1], got {m_min}")
        if adaptive and not 1.0 <= positive_weight <= w_max:
            raise ValueError(f"stare positive_weight must be in [1, w_max={w_max}] when adaptive, got {positive_weight}")
        if adaptive and not m_min <= negative_weight <= 1.0:
            raise ValueError(f"stare negative_weight must be in [m_min={m_min}, 1] when adaptive, got {negative_weight}")
        self.top_ratio = float(top_ratio)
        self.target_entropy = float(target_entropy)
        self.variant = variant
        self.adaptive = bool(adaptive)
        self.alpha = float(alpha)
        self.w_max = float(w_max)
        self.m_min = float(m_min)
        self.scope = check_scope(scope)
        self.entropy_key = entropy_key
        # Controller state (checkpointed): the released initial state is gate on, no entropy seen.
        self.positive_weight = float(positive_weight)
        self.negative_weight = float(negative_weight)
        self.gate_on = True
        self.last_entropy = math.nan
        self._cursors: tuple[RowCursor, RowCursor] | None = None

    @property
    def needs_minibatch_pass(self) -> bool:
        return self.scope == "global"

    # ------------------------------------------------------------------ selection
    def select(self, tokens: PolicyTokens, ppo: PPOTerms, across_ranks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L+, L-)``: ``[B, T]`` bool masks (``L-`` empty for variant O1)."""
        valid = tokens.mask.bool()
        surprisal = -tokens.logprobs.detach().double()
        plus = top_surprisal(surprisal, valid & (ppo.advantages > 0), self.top_ratio, across_ranks)
        if self.variant == "C2":
            minus = top_surprisal(surprisal, valid & (ppo.advantages < 0), self.top_ratio, across_ranks)
        else:
            minus = torch.zeros_like(plus)
        return plus, minus

    def begin_minibatch(self, tokens: PolicyTokens, ppo: PPOTerms | None = None) -> None:
        if ppo is None:
            raise ValueError("stare with scope=global " + NEEDS_PPO)
        plus, minus = self.select(tokens, ppo, across_ranks=True)
        self._cursors = (RowCursor(plus), RowCursor(minus))

    def token_weights(
        self, tokens: PolicyTokens, ppo: PPOTerms, metrics: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        valid = tokens.mask.bool()
        if self.scope == "global":
            if self._cursors is None:
                raise RuntimeError("stare with scope=global: begin_minibatch was not called")
            plus, minus = (cursor.take(*valid.shape, tokens.minibatch_rows).to(valid.device) for cursor in self._cursors)
        else:
            plus, minus = self.select(tokens, ppo)
        plus, minus = plus & valid, minus & valid
        weights = torch.ones_like(ppo.loss)
        if self.gate_on:
            weights = torch.where(plus, torch.full_like(weights, self.positive_weight), weights)
            weights = torch.where(minus, torch.full_like(weights, self.negative_weight), weights)
        prefix, device = f"intervention/{self.name}", valid.device
        metrics[f"{prefix}/gate_on"] = torch.tensor(float(self.gate_on), device=device)
        metrics[f"{prefix}/positive_weight"] = torch.tensor(self.positive_weight, device=device)
        metrics[f"{prefix}/negative_weight"] = torch.tensor(self.negative_weight, device=device)
        metrics[f"{prefix}/share_positive_selected"] = masked_mean(plus.float(), valid)
        metrics[f"{prefix}/share_negative_selected"] = masked_mean(minus.float(), valid)
        metrics[f"{prefix}/share_reweighted"] = masked_mean((weights != 1.0).float(), valid)
        metrics[f"{prefix}/weight_mean"] = masked_mean(weights.detach(), valid)
        if math.isfinite(self.last_entropy):  # none before the first RL step
            metrics[f"{prefix}/gate_entropy"] = torch.tensor(self.last_entropy, device=device)
        return weights

    # ------------------------------------------------------------------ controller
    def after_rl_step(self, metrics: dict[str, float]) -> None:
        if self.entropy_key not in metrics:
            raise KeyError(f"stare needs the metric {self.entropy_key!r} after each RL step")
        entropy = float(metrics[self.entropy_key])
        if not math.isfinite(entropy):
            return  # as released: a non-finite entropy leaves the controller unchanged
        self.last_entropy = entropy
        self.gate_on = entropy < self.target_entropy
        if not self.adaptive or self.alpha == 0.0:
            return
        sign = float((self.target_entropy > entropy) - (self.target_entropy < entropy))
        self.positive_weight = min(max(self.positive_weight + self.alpha * sign, 1.0), self.w_max)
        self.negative_weight = min(max(self.negative_weight - self.alpha * sign, self.m_min), 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "gate_on": self.gate_on,
            "positive_weight": self.positive_weight,
            "negative_weight": self.negative_weight,
            "last_entropy": self.last_entropy,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gate_on = bool(state["gate_on"])
        self.positive_weight = float(state["positive_weight"])
        self.negative_weight = float(state["negative_weight"])
        self.last_entropy = float(state["last_entropy"])
