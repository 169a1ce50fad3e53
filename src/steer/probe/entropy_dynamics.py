"""Entropy-change estimators and the statistics that compare them with measured changes.

Pure tensor functions (no Lightning, no I/O). Conventions: every per-token tensor is ``[B, T]``
with a bool ``mask`` of valid response tokens; entropies are in nats; a *prediction* is a number
proportional to the entropy change ``Delta H`` at the token's state, with the (unknown) step size
left out, so only its sign and relative size carry meaning until one scale factor is fitted.

The three predictors
--------------------
For one softmax head ``pi = softmax(z)`` with entropy ``H = -sum_v pi_v log pi_v``, the entropy
gradient is ``dH/dz_v = -pi_v (log pi_v + H)``. A policy-gradient step on a sampled token ``a`` with
advantage ``A`` moves ``z_a`` by ``eta * A * (1 - pi_a)`` (times the importance ratio ``r`` under
PPO, and zero when the clip cuts the gradient). Keeping only that logit (the "single-logit" view
of Hao et al. 2025, arXiv 2510.10150) gives ``Delta H ~= -eta * Omega`` with

- **first-order Omega**: ``Omega = 1[not clipped] * A * r * pi (1 - pi) (log pi + H)``;
- **released Omega** (the STEER authors' code): ``Omega = (A / pi_old) pi (1 - pi) (log pi + H_old)``.
  On-policy (``pi = pi_old``) it equals the first-order Omega divided by ``pi``, so it weights rare
  sampled tokens ``1 / pi`` times more;
- **covariance proxy** (Cui et al. 2025, arXiv 2505.22617): ``C = (A - mean A)(log pi - mean log pi)``,
  the per-token term of the covariance that drives the entropy change of softmax policy gradient.

All three predict an entropy *decrease* when positive, so each prediction here is the negated
score: ``prediction = -Omega`` (or ``-C``). Both Omegas are computed by the functions of
:mod:`steer.algo.interventions.steer` and the covariance by
:mod:`steer.algo.interventions.covariance`; this module only signs, masks and compares them.

With all logits free, the exact first-order change of one sampled token's step is
``Delta H = -eta * A * [pi_a (log pi_a + H) - sum_v pi_v^2 (log pi_v + H)]``
(:func:`softmax_first_order_entropy_change`); the single-logit Omega keeps its first term.

The parameter-space predictor
-----------------------------
All three ignore that every state's logits depend on the *same* weights, so one token's update
moves the entropy at every other state too. The exact first-order change of the entropy at state
``s`` under the actual parameter update ``Delta theta = theta_after - theta_before`` (Adam's step,
clipping, learning rate and weight decay included) is the directional derivative
``Delta H(s) ~= <grad_theta H(s), Delta theta>``, taken at ``theta_before``. One forward-mode
Jacobian-vector product along ``Delta theta`` gives it for every state of a batch at once
(:func:`parameter_space_entropy_change`). It is not a proportionality: it predicts the change in
nats, so it is also compared at face value (:func:`absolute_agreement`). Its residual against the
measured change is the higher-order part of the step; the per-token predictors' disagreement with
it is the shared-weight coupling they leave out.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from steer.algo.interventions.covariance import covariance_score
from steer.algo.interventions.steer import first_order_omega, released_omega

PER_TOKEN_PREDICTORS = ("released_omega", "first_order_omega", "covariance")
PARAMETER_SPACE = "parameter_space"
PREDICTORS = (*PER_TOKEN_PREDICTORS, PARAMETER_SPACE)
"""Every predictor the probe can log; ``parameter_space`` is absent from a run that turned it off."""
QUADRANTS = ("pos_adv_high_prob", "pos_adv_low_prob", "neg_adv_high_prob", "neg_adv_low_prob")
"""``(A > 0 | A < 0) x (pi above | below e^{-H})``; ``high_prob`` means ``log pi + H > 0``."""


def _finite_masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float64 values with non-finite entries and padding set to 0."""
    values = values.double()
    keep = mask.bool() & torch.isfinite(values)
    return torch.where(keep, values, torch.zeros_like(values))


# --------------------------------------------------------------------------- predictors


def released_omega_prediction(
    advantages: torch.Tensor,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    old_entropy: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """``-Omega_released`` per token ``[B, T]`` (float64, 0 on padding and non-finite values).

    Args:
        advantages: ``[B, T]`` (or ``[B, 1]``) advantages.
        logprobs: ``[B, T]`` log pi of the sampled tokens at the state before the step.
        old_logprobs, old_entropy: ``[B, T]`` log pi_old and H_old of the rollout policy.
    """
    advantages = advantages.expand_as(logprobs)
    return -_finite_masked(released_omega(advantages, logprobs, old_logprobs, old_entropy), mask)


def first_order_omega_prediction(
    advantages: torch.Tensor,
    ratio: torch.Tensor,
    clipped: torch.Tensor,
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """``-Omega_first_order`` per token ``[B, T]`` (float64, 0 on padding, clipped and non-finite).

    Args:
        ratio: ``[B, T]`` importance ratio ``pi / pi_old`` at the state before the step.
        clipped: ``[B, T]`` bool, the PPO clip cuts this token's gradient.
        logprobs, entropy: ``[B, T]`` log pi and H at the state before the step.
    """
    advantages = advantages.expand_as(logprobs)
    return -_finite_masked(first_order_omega(advantages, ratio, clipped, logprobs, entropy), mask)


def covariance_prediction(advantages: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``-(A - mean A)(log pi - mean log pi)`` per token ``[B, T]``, means over the valid tokens given."""
    advantages = advantages.expand_as(logprobs)
    return -_finite_masked(covariance_score(advantages, logprobs, mask), mask)


def parameter_space_prediction(change: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The JVP's ``<grad_theta H, Delta theta>`` ``[B, T]`` as a prediction (float64, 0 on padding and
    non-finite values); see :func:`parameter_space_entropy_change`."""
    return _finite_masked(change, mask)


def measured_entropy_change(entropy_before: torch.Tensor, entropy_after: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``H_after - H_before`` at the same states ``[B, T]`` (float64, 0 on padding).

    Both entropies must come from forward passes over the *same* token ids (the same prefixes),
    before and after the parameter update.
    """
    return _finite_masked(entropy_after.double() - entropy_before.double(), mask)


class _CallWith(torch.nn.Module):
    """``fn(model)`` as the forward of a module that holds ``model`` (under the name ``model``), so that
    ``torch.func.functional_call`` can substitute the model's parameters for the call."""

    def __init__(self, model: torch.nn.Module, fn: Callable[[torch.nn.Module], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self) -> torch.Tensor:
        return self.fn(self.model)


def parameter_space_entropy_change(
    model: torch.nn.Module,
    entropy_of: Callable[[torch.nn.Module], torch.Tensor],
    params_before: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``H(theta_before)`` and ``<grad_theta H, Delta theta>`` at every state, by one forward-mode JVP.

    Args:
        model: the policy; its own parameters are left untouched (``functional_call`` substitutes).
        entropy_of: ``model -> [B, T]`` entropy at the states of interest (e.g. the probe's forward).
        params_before: ``model.named_parameters()`` names (tied weights once, as ``named_parameters``
            lists them) -> values at ``theta_before``; names not given keep the model's values and
            get no tangent.
        delta: the same names -> ``theta_after - theta_before``.

    Returns:
        ``(entropy, change)``, both ``entropy_of``'s shape: the entropy at ``theta_before`` and its
        first-order change along ``delta`` (nats; ``[B, T]``).

    Tied weights: ``functional_call`` (``tie_weights=True``) gives every alias of a tied tensor the
    value, and so the tangent, of its one entry, so a tied embedding's update counts once, in both
    of its uses. Attention runs on the math SDPA backend: the fused CPU/GPU kernels have no
    forward-mode derivative (PyTorch 2.13), the math backend is plain matmul/softmax.
    """
    names = list(params_before)
    wrapped = _CallWith(model, entropy_of)

    def entropy_at(values: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(wrapped, {f"model.{name}": values[name] for name in names}, ())

    primals = {name: params_before[name] for name in names}
    tangents = {name: delta[name].to(params_before[name].dtype) for name in names}
    with sdpa_kernel([SDPBackend.MATH]):
        entropy, change = torch.func.jvp(entropy_at, (primals,), (tangents,))
    return entropy, change


# --------------------------------------------------------------------------- exact softmax references


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits)`` over the last dimension ``[..., V] -> [...]``."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def softmax_first_order_entropy_change(logits: torch.Tensor, action: int, advantage: float) -> torch.Tensor:
    """First-order ``Delta H / eta`` of one gradient-ascent step on ``A log pi_a`` over all logits ``[V]``.

    ``-A [pi_a (log pi_a + H) - sum_v pi_v^2 (log pi_v + H)]`` (hand-derived from
    ``dH/dz_v = -pi_v (log pi_v + H)`` and ``d log pi_a / dz_v = 1[v = a] - pi_v``).
    """
    logp = torch.log_softmax(logits.double(), dim=-1)
    p = logp.exp()
    h = -(p * logp).sum()
    centred = logp + h
    return -advantage * (p[action] * centred[action] - (p * p * centred).sum())


# --------------------------------------------------------------------------- agreement statistics


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors; NaN when either is constant or has < 2 entries."""
    x, y = x.double(), y.double()
    if x.numel() < 2:
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    denominator = torch.sqrt((xc * xc).sum() * (yc * yc).sum())
    if denominator <= 0:
        return math.nan
    return float((xc * yc).sum() / denominator)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks ``0..n-1`` of a 1-D tensor, tied values sharing their mean rank (float64)."""
    order = torch.argsort(x, stable=True)
    sorted_values = x[order]
    _, counts = torch.unique_consecutive(sorted_values, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() + 1.0) / 2.0
    ranks = torch.empty(x.numel(), dtype=torch.float64, device=x.device)
    ranks[order] = torch.repeat_interleave(mean_rank, counts)
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (Pearson of average ranks) of two 1-D tensors."""
    if x.numel() < 2:
        return math.nan
    return pearson(average_ranks(x.double()), average_ranks(y.double()))


def sign_agreement(predicted: torch.Tensor, measured: torch.Tensor) -> float:
    """Share of tokens with a non-zero prediction whose sign matches the measured change's sign.

    Tokens predicted exactly 0 (zero advantage, clipped) make no sign claim and are left out.
    """
    claims = predicted != 0
    if not bool(claims.any()):
        return math.nan
    return float((torch.sign(predicted[claims]) == torch.sign(measured[claims])).double().mean())


def fitted_scale(predicted: torch.Tensor, measured: torch.Tensor) -> float:
    """Least-squares ``s`` in ``measured ~= s * predicted`` (no intercept): it stands in for the
    step size, which no predictor knows. 0 when every prediction is 0."""
    denominator = float((predicted.double() ** 2).sum())
    if denominator <= 0:
        return 0.0
    return float((predicted.double() * measured.double()).sum()) / denominator


def compare_prediction(predicted: torch.Tensor, measured: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Agreement of one predictor with the measured change over the valid tokens.

    Returns ``pearson``, ``spearman``, ``sign_agreement``, ``scale`` (fitted), ``predicted_sum_raw``
    (sum of the unscaled prediction), ``predicted_sum_fitted`` (``scale *`` that),
    ``relative_error`` (``sum |s p - m| / sum |m|``, per-token error after the fit), and
    ``pearson_top10`` / ``sign_agreement_top10``: the same on the 10% of tokens with the largest
    ``|prediction|`` (where a predictor claims a large change).
    """
    valid = mask.bool()
    p, m = predicted[valid].double(), measured[valid].double()
    scale = fitted_scale(p, m)
    measured_abs = float(m.abs().sum())
    top = torch.zeros_like(p, dtype=torch.bool)
    if p.numel():
        top[torch.argsort(p.abs(), descending=True)[: max(1, math.ceil(0.1 * p.numel()))]] = True
    top &= p != 0
    return {
        "pearson": pearson(p, m),
        "spearman": spearman(p, m),
        "sign_agreement": sign_agreement(p, m),
        "pearson_top10": pearson(p[top], m[top]),
        "sign_agreement_top10": sign_agreement(p[top], m[top]),
        "scale": scale,
        "predicted_sum_raw": float(p.sum()),
        "predicted_sum_fitted": scale * float(p.sum()),
        "relative_error": float((scale * p - m).abs().sum()) / measured_abs if measured_abs > 0 else math.nan,
    }


def absolute_agreement(predicted: torch.Tensor, measured: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How close a prediction *in nats* (no fitted scale) gets to the measured change.

    Returns ``r2`` (``1 - sum (m - p)^2 / sum (m - mean m)^2``: the share of the measured change's
    variance the prediction explains at face value; 1 is exact, <= 0 no better than the mean) and
    ``relative_error_unscaled`` (``sum |p - m| / sum |m|``).
    """
    valid = mask.bool()
    p, m = predicted[valid].double(), measured[valid].double()
    spread = float(((m - m.mean()) ** 2).sum()) if m.numel() else 0.0
    measured_abs = float(m.abs().sum())
    return {
        "r2": 1.0 - float(((m - p) ** 2).sum()) / spread if spread > 0 else math.nan,
        "relative_error_unscaled": float((p - m).abs().sum()) / measured_abs if measured_abs > 0 else math.nan,
    }


# --------------------------------------------------------------------------- quadrants


def quadrant_statistics(
    advantages: torch.Tensor,
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    prediction: torch.Tensor,
) -> dict[str, dict[str, float]]:
    """Token counts and summed predicted ``Delta H`` in the four quadrants of Hao et al. / Cui et al.

    Args:
        advantages: ``[B, T]`` or ``[B, 1]``.
        logprobs, entropy: ``[B, T]`` log pi of the sampled token and H of its state.
        mask: ``[B, T]`` bool.
        prediction: ``[B, T]`` predicted ``Delta H`` (e.g. :func:`first_order_omega_prediction`).

    Returns:
        ``{quadrant: {"tokens": n, "predicted_sum": s}}`` for :data:`QUADRANTS`, plus
        ``"zero_adv": {"tokens": n}`` for tokens with ``A = 0`` (in no quadrant).
        ``high_prob`` means ``pi > e^{-H}``: positive ``A`` there lowers the entropy.
    """
    advantages = advantages.expand_as(logprobs)
    valid = mask.bool() & torch.isfinite(logprobs) & torch.isfinite(entropy)
    high = (logprobs.double() + entropy.double()) > 0
    signs = {"pos_adv": advantages > 0, "neg_adv": advantages < 0}
    levels = {"high_prob": high, "low_prob": ~high}
    out: dict[str, dict[str, float]] = {}
    for sign_name, sign in signs.items():
        for level_name, level in levels.items():
            selected = valid & sign & level
            out[f"{sign_name}_{level_name}"] = {
                "tokens": float(selected.sum()),
                "predicted_sum": float(prediction.double()[selected].sum()),
            }
    out["zero_adv"] = {"tokens": float((valid & (advantages == 0)).sum())}
    return out


# --------------------------------------------------------------------------- STEER diagnostics


def nearest_rank_quantiles(values: torch.Tensor, quantiles: tuple[float, ...]) -> list[float]:
    """Quantiles (nearest-rank on the sorted values) of a 1-D tensor; NaN when empty."""
    if values.numel() == 0:
        return [math.nan for _ in quantiles]
    ordered = values.double().sort().values
    last = ordered.numel() - 1
    return [float(ordered[round(q * last)]) for q in quantiles]


def steer_diagnostics(
    weights: torch.Tensor, omega: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """Why STEER's reweighting does (or does not) act, over the valid tokens of one batch.

    Args:
        weights: ``[B, T]`` the per-token weights the intervention returned.
        omega: ``[B, T]`` its signed Omega (positive = predicted entropy decrease).
        logprobs: ``[B, T]`` log pi of the sampled tokens.
        mask: ``[B, T]`` bool.

    Returns:
        ``weight_mean``, ``weight_p01/p10/p50/p90``, ``share_below_0_99`` (tokens whose weight is
        < 0.99), ``omega_abs_p50/p90/p99/max``, ``max_token_prob`` (pi of the token holding the max
        ``|Omega|``: a rare token sets the scale when this is small), and the share of the predicted
        batch entropy change that the reweighting removes, ``removed_share_signed``
        (``sum (1 - w) Omega / sum Omega``; unstable when the signed sum is near 0) and
        ``removed_share_abs`` (``sum (1 - w) |Omega| / sum |Omega|``).
    """
    valid = mask.bool() & torch.isfinite(omega)
    w, o, lp = weights[valid].double(), omega[valid].double(), logprobs[valid].double()
    out: dict[str, float] = {}
    if w.numel() == 0:
        return out
    out["weight_mean"] = float(w.mean())
    for name, value in zip(("p01", "p10", "p50", "p90"), nearest_rank_quantiles(w, (0.01, 0.1, 0.5, 0.9))):
        out[f"weight_{name}"] = value
    out["share_below_0_99"] = float((w < 0.99).double().mean())
    magnitude = o.abs()
    for name, value in zip(("p50", "p90", "p99"), nearest_rank_quantiles(magnitude, (0.5, 0.9, 0.99))):
        out[f"omega_abs_{name}"] = value
    top = int(torch.argmax(magnitude))
    out["omega_abs_max"] = float(magnitude[top])
    out["max_token_prob"] = float(lp[top].exp())
    signed_total, abs_total = float(o.sum()), float(magnitude.sum())
    out["removed_share_signed"] = float(((1 - w) * o).sum()) / signed_total if signed_total != 0 else math.nan
    out["removed_share_abs"] = float(((1 - w) * magnitude).sum()) / abs_total if abs_total > 0 else math.nan
    return out
