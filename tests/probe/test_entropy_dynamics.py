"""Entropy-change predictors against hand-derived values and exact softmax steps; the statistics.

The step-size tests take one gradient step of size eta on the logits of a single categorical and
check that the measured entropy change matches eta * prediction with an error that shrinks like eta^2.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from scipy import stats

from steer.algo.interventions.base import ClipConfig, PolicyTokens
from steer.algo.interventions.steer import SteerReweighting
from steer.algo.interventions.steer_extensions import SteerBandReweighting, SteerQuantileReweighting
from steer.algo.policy_loss import ppo_token_loss
from steer.probe import entropy_dynamics as ed

torch.set_num_threads(1)

LOGITS = torch.tensor([1.3, -0.4, 0.2, 2.1, -1.0], dtype=torch.float64)


def one_token(x: float) -> torch.Tensor:
    return torch.tensor([[x]], dtype=torch.float64)


def entropy_after_single_logit_step(logits: torch.Tensor, action: int, step: float) -> float:
    moved = logits.clone()
    moved[action] += step
    return float(ed.softmax_entropy(moved))


# --------------------------------------------------------------------------- predictors vs exact steps


@pytest.mark.parametrize("action, advantage", [(3, 1.0), (1, 1.0), (3, -0.7), (4, 2.0)])
def test_first_order_omega_is_exact_to_first_order_for_a_single_logit_step(action, advantage):
    """Gradient ascent on A log pi_a moving only z_a: Delta H = eta * prediction + O(eta^2)."""
    logp = torch.log_softmax(LOGITS, -1)
    h = float(ed.softmax_entropy(LOGITS))
    pi = float(logp[action].exp())
    prediction = float(ed.first_order_omega_prediction(
        one_token(advantage), one_token(1.0), torch.tensor([[False]]), one_token(float(logp[action])), one_token(h),
        torch.tensor([[True]]),
    ))
    # hand-derived: -A pi (1 - pi) (log pi + H)
    assert prediction == pytest.approx(-advantage * pi * (1 - pi) * (math.log(pi) + h), rel=1e-12)
    errors = []
    for eta in (1e-2, 1e-3, 1e-4):
        measured = entropy_after_single_logit_step(LOGITS, action, eta * advantage * (1 - pi)) - h
        errors.append(abs(measured - eta * prediction))
        assert math.copysign(1, measured) == math.copysign(1, prediction)
    assert errors[1] < errors[0] / 50 and errors[2] < errors[1] / 50  # O(eta^2): x100 per decade


def test_first_order_omega_carries_the_ratio_and_the_clip_indicator():
    """Under PPO the step on z_a is eta * A * r * (1 - pi); a clipped token does not move."""
    action, advantage = 0, 1.5
    logp = torch.log_softmax(LOGITS, -1)
    pi, h = float(logp[action].exp()), float(ed.softmax_entropy(LOGITS))
    old_logprob = math.log(pi) - 0.15
    ratio = math.exp(0.15)
    prediction = float(ed.first_order_omega_prediction(
        one_token(advantage), one_token(ratio), torch.tensor([[False]]), one_token(math.log(pi)), one_token(h),
        torch.tensor([[True]]),
    ))
    errors = []
    for eta in (1e-2, 1e-3):
        measured = entropy_after_single_logit_step(LOGITS, action, eta * advantage * ratio * (1 - pi)) - h
        errors.append(abs(measured - eta * prediction))
    assert errors[1] < errors[0] / 50
    # the same token through the real PPO terms: ratio 1.16 > 1 + 0.1 is clipped for A > 0
    ppo = ppo_token_loss(one_token(math.log(pi)), one_token(old_logprob), one_token(advantage), ClipConfig(0.1, 0.1))
    assert bool(ppo.clipped)
    clipped = ed.first_order_omega_prediction(one_token(advantage), ppo.ratio, ppo.clipped, one_token(math.log(pi)),
                                              one_token(h), torch.tensor([[True]]))
    assert float(clipped) == 0.0


@pytest.mark.parametrize("action, advantage", [(3, 1.0), (1, -1.0), (2, 0.5)])
def test_full_softmax_first_order_change_shrinks_like_eta_squared(action, advantage):
    """All logits free: Delta z = eta A (e_a - pi); the hand-derived full first-order form is exact to O(eta^2)."""
    p = torch.softmax(LOGITS, -1)
    h = float(ed.softmax_entropy(LOGITS))
    prediction = float(ed.softmax_first_order_entropy_change(LOGITS, action, advantage))
    direction = -p.clone()
    direction[action] += 1.0
    errors = []
    for eta in (1e-2, 1e-3, 1e-4):
        measured = float(ed.softmax_entropy(LOGITS + eta * advantage * direction)) - h
        errors.append(abs(measured - eta * prediction))
    assert errors[1] < errors[0] / 50 and errors[2] < errors[1] / 50
    # the single-logit Omega is its first term: -A pi_a (1 - pi_a)(log pi_a + H) != the full form
    pi = float(p[action])
    single = -advantage * pi * (1 - pi) * (math.log(pi) + h)
    assert single != pytest.approx(prediction, rel=1e-3)


def test_released_omega_hand_values_and_on_policy_relation():
    # A = 2, pi = 0.5, pi_old = 0.25, H_old = 1: Omega = 2 / 0.25 * 0.25 * (log 0.5 + 1)
    prediction = ed.released_omega_prediction(one_token(2.0), one_token(math.log(0.5)), one_token(math.log(0.25)),
                                              one_token(1.0), torch.tensor([[True]]))
    assert float(prediction) == pytest.approx(-2.0 * (math.log(0.5) + 1.0), rel=1e-12)
    # on-policy (pi = pi_old, H_old = H) the released Omega is the first-order Omega divided by pi
    logprobs = torch.tensor([[-0.1, -1.0, -4.0]], dtype=torch.float64)
    entropy = torch.tensor([[0.5, 1.2, 2.0]], dtype=torch.float64)
    advantages = torch.tensor([[1.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    released = ed.released_omega_prediction(advantages, logprobs, logprobs, entropy, mask)
    first = ed.first_order_omega_prediction(advantages, torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.bool), logprobs, entropy, mask)
    torch.testing.assert_close(released * logprobs.exp(), first)


def test_covariance_prediction_hand_values_and_padding():
    advantages = torch.tensor([[1.0, -1.0, 1.0, 5.0]])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    # means over valid tokens: A 1/3, log pi -2 -> C = (2/3)(1), (-4/3)(0), (2/3)(-1)
    expected = torch.tensor([[-2 / 3, 0.0, 2 / 3, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(ed.covariance_prediction(advantages, logprobs, mask), expected)


def test_predictions_are_zero_on_padding_and_non_finite_values():
    mask = torch.tensor([[True, False]])
    prediction = ed.released_omega_prediction(one_token(1.0).expand(1, 2), torch.tensor([[-1.0, -1.0]]),
                                              torch.tensor([[-1.0, -1.0]]), torch.tensor([[math.nan, 1.0]]), mask)
    assert prediction.tolist() == [[0.0, 0.0]]


def test_measured_entropy_change_known_answer():
    """Uniform over 4 -> uniform over 2 at one state, unchanged at another, padding ignored."""
    before_logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0], [5.0, 0.0, 0.0, 0.0]]])
    after_logits = torch.tensor([[[0.0, 0.0, -1e9, -1e9], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    change = ed.measured_entropy_change(ed.softmax_entropy(before_logits), ed.softmax_entropy(after_logits), mask)
    torch.testing.assert_close(change, torch.tensor([[-math.log(2.0), 0.0, 0.0]], dtype=torch.float64))


# --------------------------------------------------------------------------- statistics


def test_correlations_match_scipy_including_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=g, dtype=torch.float64)
    x[:10] = 0.0  # ties, as zero-advantage tokens give
    y = x + 0.5 * torch.randn(50, generator=g, dtype=torch.float64)
    assert ed.pearson(x, y) == pytest.approx(stats.pearsonr(x.numpy(), y.numpy())[0], rel=1e-9)
    assert ed.spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy())[0], rel=1e-9)
    assert math.isnan(ed.pearson(torch.zeros(5), y[:5]))


def test_sign_agreement_scale_and_comparison():
    predicted = torch.tensor([1.0, -2.0, 0.0, 3.0])
    measured = torch.tensor([0.5, -1.0, 7.0, -1.5])
    assert ed.sign_agreement(predicted, measured) == pytest.approx(2 / 3)  # the 0 prediction makes no claim
    assert ed.fitted_scale(predicted, 0.25 * predicted) == pytest.approx(0.25)
    result = ed.compare_prediction(predicted, 0.25 * predicted, torch.ones(4, dtype=torch.bool))
    assert result["pearson"] == pytest.approx(1.0)
    assert result["predicted_sum_fitted"] == pytest.approx(0.25 * 2.0)
    assert result["relative_error"] == pytest.approx(0.0, abs=1e-12)
    # top 10% by |prediction|: the one largest claim, 3.0 vs -1.5, disagrees
    assert ed.compare_prediction(predicted, measured, torch.ones(4, dtype=torch.bool))["sign_agreement_top10"] == 0.0


def test_quadrant_statistics_hand_case():
    advantages = torch.tensor([[1.0], [-1.0], [0.0]])
    logprobs = torch.log(torch.tensor([[0.9, 0.01], [0.9, 0.01], [0.5, 0.5]]))
    entropy = torch.full((3, 2), 0.5)  # e^{-0.5} = 0.61: 0.9 is above, 0.01 below
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    prediction = torch.tensor([[-1.0, 2.0], [3.0, 100.0], [0.0, 0.0]])
    out = ed.quadrant_statistics(advantages, logprobs, entropy, mask, prediction)
    assert out["pos_adv_high_prob"] == {"tokens": 1.0, "predicted_sum": -1.0}
    assert out["pos_adv_low_prob"] == {"tokens": 1.0, "predicted_sum": 2.0}
    assert out["neg_adv_high_prob"] == {"tokens": 1.0, "predicted_sum": 3.0}
    assert out["neg_adv_low_prob"] == {"tokens": 0.0, "predicted_sum": 0.0}  # padding excluded
    assert out["zero_adv"] == {"tokens": 2.0}


def test_steer_diagnostics_hand_case():
    weights = torch.tensor([[1.0, 1.0, 0.8, 1.0]])
    omega = torch.tensor([[0.1, -0.1, 10.0, 0.0]], dtype=torch.float64)
    logprobs = torch.log(torch.tensor([[0.5, 0.5, 0.001, 0.9]]))
    mask = torch.ones(1, 4, dtype=torch.bool)
    out = ed.steer_diagnostics(weights, omega, logprobs, mask)
    assert out["max_token_prob"] == pytest.approx(0.001)
    assert out["share_below_0_99"] == pytest.approx(0.25)
    assert out["weight_mean"] == pytest.approx(0.95)
    assert out["removed_share_signed"] == pytest.approx(0.2 * 10.0 / 10.0)
    assert out["removed_share_abs"] == pytest.approx(2.0 / 10.2)


# --------------------------------------------------------------------------- item-8 extensions


def heavy_tailed_tokens() -> tuple[PolicyTokens, object]:
    g = torch.Generator().manual_seed(3)
    # |log pi| spread over 7 decades: mostly near-certain tokens, a few rare ones that hold the max |Omega|
    logprobs = -(10.0 ** (7.0 * torch.rand(8, 12, generator=g) - 6.0))
    entropy = 0.3 * torch.rand(8, 12, generator=g)
    advantages = torch.randn(8, 1, generator=g).expand(8, 12)
    mask = torch.ones(8, 12, dtype=torch.bool)
    tokens = PolicyTokens(logprobs, entropy, logprobs, entropy, advantages, mask)
    return tokens, ppo_token_loss(logprobs, logprobs, advantages, ClipConfig())


def test_quantile_normaliser_of_one_is_faithful_steer_and_lower_quantiles_act_on_the_bulk():
    tokens, ppo = heavy_tailed_tokens()
    faithful = SteerReweighting(lambda_min=0.8).token_weights(tokens, ppo, {})
    same = SteerQuantileReweighting(quantile=1.0, omega_floor=0.02, lambda_min=0.8).token_weights(tokens, ppo, {})
    torch.testing.assert_close(same, faithful)
    bulk = SteerQuantileReweighting(quantile=0.9, lambda_min=0.8).token_weights(tokens, ppo, {})
    assert int((faithful <= 0.8 + 1e-6).sum()) == 1  # the max alone reaches lambda_min
    assert (bulk < 0.99).float().mean() > (faithful < 0.99).float().mean()
    assert bulk.mean() < faithful.mean() - 0.01
    assert (bulk >= 0.8 - 1e-6).all() and (bulk <= 1.0).all()
    assert (bulk <= 0.8 + 1e-6).float().mean() == pytest.approx(0.1, abs=0.02)  # ~1 - quantile at lambda_min


def test_band_factors_put_the_net_predicted_change_on_the_band_edge():
    band = SteerBandReweighting(lower=-0.1, upper=0.1, lambda_min=0.5)
    c_decrease, c_increase = band.band_factors(decrease=0.7, increase=0.3)
    assert c_increase == 1.0 and c_decrease == pytest.approx((0.3 + 0.1 * 1.0) / 0.7)
    assert (0.3 - c_decrease * 0.7) / 1.0 == pytest.approx(-0.1)
    assert band.band_factors(decrease=0.5, increase=0.5) == (1.0, 1.0)
    assert band.band_factors(decrease=0.99, increase=0.0) == (0.5, 1.0)  # clamped at lambda_min
    assert band.band_factors(decrease=0.35, increase=0.65)[1] == pytest.approx((0.35 + 0.1) / 0.65)
    one_sided = SteerBandReweighting(lower=0.0, upper=1.0)
    assert one_sided.band_factors(decrease=0.2, increase=0.8) == (1.0, 1.0)
    assert one_sided.band_factors(decrease=0.6, increase=0.4)[0] == pytest.approx(0.4 / 0.6)


def test_band_weights_shrink_only_the_dominating_side():
    tokens, ppo = heavy_tailed_tokens()
    intervention = SteerBandReweighting(lower=0.0, upper=0.0, lambda_min=0.1)
    weights = intervention.token_weights(tokens, ppo, metrics := {})
    omega = intervention.signed_omega(tokens, ppo)
    decrease, increase = float(omega.clamp(min=0).sum()), float((-omega).clamp(min=0).sum())
    shrunk_side = omega > 0 if decrease > increase else omega < 0
    assert (weights[~shrunk_side] == 1).all()
    assert (weights[shrunk_side] < 1).all()
    reweighted = (weights.double() * omega).sum()
    assert float(reweighted) == pytest.approx(0.0, abs=1e-6 * float(omega.abs().sum()))  # band 0: predicted net change cancelled
    assert "intervention/steer_band/predicted_net_share" in metrics


def test_extension_arguments_are_checked():
    with pytest.raises(ValueError, match="quantile"):
        SteerQuantileReweighting(quantile=0.0)
    with pytest.raises(ValueError, match="band"):
        SteerBandReweighting(lower=0.2, upper=0.1)


# --------------------------------------------------------------------------- the parameter-space predictor


def tiny_float64_policy():
    """A 1-layer tiny Qwen2 with tied input/output embeddings, in float64, and a fixed batch."""
    from steer.models.tiny import build_char_tokenizer, build_tiny_policy

    model = build_tiny_policy(build_char_tokenizer(), hidden_size=16, num_layers=1, num_heads=2, seed=3).double()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the case where a tangent could count twice
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):  # Qwen2's norm computes in float32: keep float64 for the difference
            module.forward = types.MethodType(rms_norm_float64, module)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (3, 9), generator=generator)
    attention = torch.ones_like(ids)
    attention[0, :2] = 0  # a left-padded prompt
    return model, ids, attention


def rms_norm_float64(self, hidden: torch.Tensor) -> torch.Tensor:
    return self.weight * hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def entropy_float64(model, ids, attention) -> torch.Tensor:
    """Per-state entropy ``[B, T]`` from the model's full logits, float64 throughout."""
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=position_ids, use_cache=False).logits
    return ed.softmax_entropy(logits)


def random_direction(model, only: str | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        name: (torch.randn(p.shape, generator=generator, dtype=p.dtype) if only in (None, name) else torch.zeros_like(p))
        for name, p in model.named_parameters()
    }


@torch.no_grad()
def finite_difference(model, ids, attention, direction, eps: float = 1e-5) -> torch.Tensor:
    """``(H(theta + eps d) - H(theta - eps d)) / 2 eps``, moving the model's own (tied) tensors in place."""
    params = dict(model.named_parameters())
    original = {name: p.clone() for name, p in params.items()}
    results = []
    for sign in (1.0, -1.0):
        for name, p in params.items():
            p.copy_(original[name] + sign * eps * direction[name])
        results.append(entropy_float64(model, ids, attention))
    for name, p in params.items():
        p.copy_(original[name])
    return (results[0] - results[1]) / (2 * eps)


@pytest.mark.parametrize("only", [None, "model.embed_tokens.weight"])
def test_parameter_space_jvp_equals_finite_difference_and_reverse_mode(only):
    """One JVP = the central difference along the direction, and = <grad H(s), d> by autograd.grad;
    moving only the tied embedding checks that its tangent enters both uses, once."""
    model, ids, attention = tiny_float64_policy()
    direction = random_direction(model, only)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():  # as the probe calls it: forward mode does not need grad mode
        entropy, change = ed.parameter_space_entropy_change(
            model, lambda m: entropy_float64(m, ids, attention), before, direction)
    reference = finite_difference(model, ids, attention, direction)
    assert change.shape == (3, 9) and change.abs().max() > 1e-3
    torch.testing.assert_close(change, reference, rtol=1e-6, atol=1e-6 * float(reference.abs().max()))
    torch.testing.assert_close(entropy, entropy_float64(model, ids, attention), rtol=1e-12, atol=1e-12)
    for b, t in ((1, 4), (0, 8)):
        state = entropy_float64(model, ids, attention)[b, t]
        names, params = zip(*model.named_parameters())  # named_parameters lists the tied weight once
        grads = torch.autograd.grad(state, params, allow_unused=True)
        reverse = sum((g * direction[n]).sum() for n, g in zip(names, grads) if g is not None)
        assert float(change[b, t]) == pytest.approx(float(reverse), rel=1e-10, abs=1e-12)
    # the model's own parameters are untouched by the functional call
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def adam_step_change(lr: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW step (clipping and weight decay on) on a policy-gradient loss of the tiny model:
    the valid mask, the parameter-space prediction and the measured per-state entropy change."""
    model, ids, attention = tiny_float64_policy()
    advantages = torch.tensor([1.0, -0.5, 0.8], dtype=torch.float64)[:, None]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        entropy_before = entropy_float64(model, ids, attention)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=attention, position_ids=position_ids).logits[:, :-1], -1)
    taken = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    (-(advantages * taken * attention[:, 1:]).sum() / attention[:, 1:].sum()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    delta = {name: p.detach() - before[name] for name, p in model.named_parameters()}
    with torch.no_grad():
        measured = entropy_float64(model, ids, attention) - entropy_before
        _, change = ed.parameter_space_entropy_change(model, lambda m: entropy_float64(m, ids, attention), before, delta)
    mask = attention.bool()
    return mask, ed.parameter_space_prediction(change, mask), ed.measured_entropy_change(entropy_before, entropy_before + measured, mask)


def test_parameter_space_predictor_is_first_order_in_the_step():
    """Exact to first order: near-perfect at a tiny learning rate; its relative error grows like the
    step (the second-order term over the first), and it is poor at a large learning rate."""
    results = {}
    for lr in (1e-6, 1e-5, 3e-2):
        mask, prediction, measured = adam_step_change(lr)
        results[lr] = {**ed.compare_prediction(prediction, measured, mask), **ed.absolute_agreement(prediction, measured, mask)}
    small, large = results[1e-6], results[3e-2]
    assert small["pearson"] > 0.99999 and small["r2"] > 0.9999 and small["sign_agreement"] == 1.0
    assert small["scale"] == pytest.approx(1.0, abs=1e-3)  # it predicts nats, not a proportion
    assert small["relative_error_unscaled"] < 1e-3
    # Adam's step is ~lr per weight: 10x the step, ~10x the relative error
    assert 5 < results[1e-5]["relative_error_unscaled"] / small["relative_error_unscaled"] < 20
    assert large["relative_error_unscaled"] > 100 * small["relative_error_unscaled"]
    assert large["pearson"] < 0.9 and large["r2"] < 0.5


def test_absolute_agreement_hand_values():
    measured = torch.tensor([[1.0, -1.0, 2.0, 0.0]])
    predicted = torch.tensor([[1.0, -0.5, 2.0, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    out = ed.absolute_agreement(predicted, measured, mask)
    # m = (1, -1, 2), mean 2/3, spread 14/3; residual 0.25; |error| 0.5 over |m| 4
    assert out["r2"] == pytest.approx(1 - 0.25 / (14 / 3))
    assert out["relative_error_unscaled"] == pytest.approx(0.125)
    assert ed.absolute_agreement(predicted, torch.zeros_like(measured), mask) == {"r2": pytest.approx(math.nan, nan_ok=True),
                                                                                   "relative_error_unscaled": pytest.approx(math.nan, nan_ok=True)}
