"""EntroPIC: entropy stabilisation via proportional-integral control (Yang et al. 2025, "EntroPIC:
Towards Stable Long-Term Training of LLMs via Entropy Stabilization with Proportional-Integral
Control", arXiv 2511.15248).

Equations as in the authors' released code (github.com/yk7333/EntroPIC: ``dp_actor.py``,
``EntroPICDataParallelPPOActor.update_policy``; ``core_algos.py``, ``compute_policy_loss_entropic``):

Controller, once per micro-batch ``k`` with ``H_k`` the token-mean entropy of the *current* policy
over the micro-batch and ``I`` the accumulated error of the earlier micro-batches::

    e_k     = H_k - H_target
    alpha_k = clip(K_p e_k + K_i I, -1, 1)
    I      <- I + e_k * rows_k / rows_minibatch

Loss: the PPO loss plus ``alpha_k`` times the mean, over the valid tokens whose current probability
exceeds ``tau`` (0.95), of ``-r |A|`` (``r = pi / pi_old`` with gradient)::

    L = L_PPO + alpha * mean_{pi > tau}( -r |A| )

On those high-probability tokens a positive sample's loss is thus weighted ``1 + alpha`` and a
negative sample's ``1 - alpha`` (relative to ``-r A``): entropy above the target (``alpha > 0``)
strengthens the confident positive tokens, which lowers entropy, and below the target the reverse.

The term enters as a per-token penalty ``alpha * (-r |A|) * n_valid / n_high`` on the high-probability
tokens, so that under ``token-mean`` aggregation it is exactly ``alpha`` times the mean over the
high-probability tokens of the scope:

- ``scope: microbatch`` (released: every micro-batch on every rank runs its own controller update and
  mean). The released code weights each micro-batch's mean by ``1 / (micro-batches)``; here by the
  micro-batch's share of the mini-batch's tokens (the house token-mean); the two agree when a
  mini-batch is one micro-batch (``algorithm.micro_batch_size: null``). Under data parallelism each
  rank's integral follows its own micro-batches, as released; the checkpoint keeps rank 0's.
- ``scope: global``: one controller update and one mean per mini-batch, over all its micro-batches
  and ranks (``H`` token-mean of the mini-batch, ``I <- I + e``); every rank holds the same state.

Both scopes use the mini-batch pass (``needs_minibatch_pass``): ``microbatch`` only for the mini-batch's
row count. The controller state (``I`` and the last ``alpha``) is checkpointed; it advances each time
:meth:`token_penalty` (microbatch) or :meth:`begin_minibatch` (global) runs.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from steer.algo.interventions.base import Intervention, PolicyTokens, PPOTerms
from steer.algo.interventions.scope import RowCursor, check_scope
from steer.distributed import all_reduce


class EntropyPIControl(Intervention):
    """PI control of the high-probability tokens' positive/negative loss weights toward a target entropy.

    Args:
        target_entropy: ``H_target >= 0`` (nats), token-mean entropy of the current policy.
        proportional_gain: ``K_p >= 0``.
        integral_gain: ``K_i >= 0``.
        high_probability: ``tau`` in (0, 1): tokens with ``pi > tau`` carry the control term.
        alpha_limit: ``|alpha|`` is clipped to this bound, ``> 0`` (1 released).
        scope: ``microbatch`` (released) or ``global`` (mini-batch, all ranks).
    """

    name = "entropic"

    def __init__(
        self,
        target_entropy: float = 0.1,
        proportional_gain: float = 1.0,
        integral_gain: float = 0.01,
        high_probability: float = 0.95,
        alpha_limit: float = 1.0,
        scope: str = "microbatch",
    ) -> None:
        if not target_entropy >= 0.0:
            raise ValueError(f"entropic target_entropy must be >= 0, got {target_entropy}")
        if not proportional_gain >= 0.0:
            raise ValueError(f"entropic proportional_gain must be >= 0, got {proportional_gain}")
        if not integral_gain >= 0.0:
            raise ValueError(f"entropic integral_gain must be >= 0, got {integral_gain}")
        if not 0.0 < high_probability < 1.0:
            raise ValueError(f"entropic high_probability must be in (0, 1), got {high_probability}")
        if not alpha_limit > 0.0:
            raise ValueError(f"entropic alpha_limit must be > 0, got {alpha_limit}")
        self.target_entropy = float(target_entropy)
        self.proportional_gain = float(proportional_gain)
        self.integral_gain = float(integral_gain)
        self.high_probability = float(high_probability)
        self.alpha_limit = float(alpha_limit)
        self.scope = check_scope(scope)
        # Controller state (checkpointed).
        self.integral = 0.0
        self.alpha = 0.0
        self._minibatch_rows: int | None = None
        self._global: tuple[float, float, float, RowCursor] | None = None  # alpha, scale, entropy, high-prob cursor

    @property
    def needs_minibatch_pass(self) -> bool:
        return True

    def _control(self, entropy: float, weight: float) -> float:
        """One PI update: ``alpha`` from the current error and the integral so far, then the integral."""
        error = entropy - self.target_entropy
        raw = self.proportional_gain * error + self.integral_gain * self.integral
        self.alpha = min(max(raw, -self.alpha_limit), self.alpha_limit)
        self.integral += error * weight
        return self.alpha

    def high_probability_tokens(self, tokens: PolicyTokens) -> torch.Tensor:
        """``[B, T]`` bool: valid tokens whose current probability exceeds ``tau``."""
        return tokens.mask.bool() & (tokens.logprobs.detach() > math.log(self.high_probability))

    def begin_minibatch(self, tokens: PolicyTokens, ppo: PPOTerms | None = None) -> None:
        self._minibatch_rows = int(tokens.mask.shape[0])
        if self.scope != "global":
            return
        valid = tokens.mask.bool()
        high = self.high_probability_tokens(tokens)
        entropy = torch.where(valid, tokens.entropy.detach().double(), torch.zeros_like(tokens.entropy, dtype=torch.float64))
        sums = all_reduce(torch.stack([entropy.sum(), valid.sum().double(), high.sum().double()]))
        entropy_sum, count, high_count = (float(v) for v in sums)
        if count > 0:
            mean_entropy = entropy_sum / count
            alpha = self._control(mean_entropy, 1.0)
        else:
            mean_entropy, alpha = math.nan, self.alpha
        scale = count / high_count if high_count > 0 else 0.0
        self._global = (alpha, scale, mean_entropy, RowCursor(high))

    def token_penalty(
        self, tokens: PolicyTokens, ppo: PPOTerms, metrics: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        valid = tokens.mask.bool()
        if self.scope == "global":
            if self._global is None:
                raise RuntimeError("entropic with scope=global: begin_minibatch was not called")
            alpha, scale, entropy, cursor = self._global
            high = cursor.take(*valid.shape, tokens.minibatch_rows).to(valid.device) & valid
        else:
            high = self.high_probability_tokens(tokens)
            count = int(valid.sum())
            entropy = math.nan
            if count > 0:
                values = torch.where(valid, tokens.entropy.detach().double(), torch.zeros_like(tokens.entropy, dtype=torch.float64))
                entropy = float(values.sum()) / count
                rows = self._minibatch_rows
                self._control(entropy, valid.shape[0] / rows if rows else 1.0)
            alpha = self.alpha
            high_count = int(high.sum())
            scale = count / high_count if high_count > 0 else 0.0
        term = -ppo.ratio * ppo.advantages.abs() * (alpha * scale)
        penalty = torch.where(high, term, torch.zeros_like(term))
        prefix, device = f"intervention/{self.name}", valid.device
        metrics[f"{prefix}/alpha"] = torch.tensor(alpha, device=device)
        metrics[f"{prefix}/integral"] = torch.tensor(self.integral, device=device)
        if math.isfinite(entropy):
            metrics[f"{prefix}/controller_entropy"] = torch.tensor(entropy, device=device)
        metrics[f"{prefix}/share_high_probability"] = high.sum().float() / valid.sum().clamp(min=1)
        return penalty

    def state_dict(self) -> dict[str, Any]:
        return {"integral": self.integral, "alpha": self.alpha}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.integral = float(state["integral"])
        self.alpha = float(state["alpha"])
