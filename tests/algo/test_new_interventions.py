"""STARE, EntroPIC and CE-GPPO: float64 references, gradients, controllers, composition, scopes, presets.

Every reference below is written from the method's equations (see each module's docstring for the
paper section / released code file), one token at a time over Python floats; none calls the code
under test except to build the input tensors.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from steer.algo.interventions import (
    ClipHigher,
    EntropyPIControl,
    GradientPreservingClip,
    Intervention,
    PolicyTokens,
    SurprisalAdvantageReweighting,
)
from steer.algo.interventions.base import ClipConfig
from steer.algo.policy_loss import LossTotals, begin_minibatch, policy_loss, ppo_token_loss
from tests.algo.test_interventions import (
    BASE_CLIP,
    PRESETS,
    CASES,
    as_lists,
    fresh,
    grads,
    load_preset,
    make_tokens,
    positions,
    ref_ppo,
    rows,
)

torch.set_num_threads(1)

NEW_PRESETS = ("stare", "entropic", "ce_gppo")


def ppo_sum(t: dict, keys, advantages=None, clip: dict = BASE_CLIP) -> float:
    advantages = advantages or t["advantages"]
    return sum(ref_ppo(t["logprobs"][i][j], t["old_logprobs"][i][j], advantages[i][j], **clip)[0] for i, j in keys)


# ============================================================================ STARE


def ref_subset(count: int, share: float) -> int:
    """Released STARE: ceil(n P) written as int(n P + 0.999999), at least 1, at most n."""
    if count == 0 or share <= 0:
        return 0
    return min(max(1, int(count * share + 0.999999)), count)


def ref_stare_weights(t: dict, share: float, w: float, m: float, variant: str = "O1", gate: bool = True) -> dict:
    keys = positions(t)  # row-major order
    surprisal = {(i, j): -t["logprobs"][i][j] for i, j in keys}
    weights = {key: 1.0 for key in keys}
    signs = [(1.0, w)] + ([(-1.0, m)] if variant == "C2" else [])
    for sign, value in signs:
        candidates = [(i, j) for i, j in keys if t["advantages"][i][j] * sign > 0]
        ranked = sorted(candidates, key=lambda key: -surprisal[key])  # stable: ties keep row-major order
        for key in ranked[: ref_subset(len(candidates), share)]:
            if gate:
                weights[key] = value
    return weights


def ref_stare_loss(t: dict, clip: dict = BASE_CLIP, **kwargs) -> float:
    weights = ref_stare_weights(t, **kwargs)
    total = sum(
        weights[(i, j)] * ref_ppo(t["logprobs"][i][j], t["old_logprobs"][i][j], t["advantages"][i][j], **clip)[0]
        for i, j in weights
    )
    return total / max(len(weights), 1)


STARE_ARGS = [
    dict(share=0.1, w=1.1, m=0.9, variant="O1"),
    dict(share=0.3, w=1.3, m=0.7, variant="C2"),
    dict(share=1.0, w=2.0, m=0.5, variant="C2"),
    dict(share=0.0, w=2.0, m=0.5, variant="C2"),
]


def make_stare(args: dict, **extra) -> SurprisalAdvantageReweighting:
    return SurprisalAdvantageReweighting(
        top_ratio=args["share"], positive_weight=args["w"], negative_weight=args["m"], variant=args["variant"], **extra
    )


def test_subset_size_follows_the_released_ceiling() -> None:
    from steer.algo.interventions.stare import subset_size

    for count in range(0, 40):
        for share in (0.0, 0.05, 0.1, 0.3, 1.0 / 3.0, 0.5, 1.0):
            assert subset_size(count, share) == ref_subset(count, share), (count, share)
    assert subset_size(30, 0.1) == 3  # 30 * 0.1 = 3.0000000000000004: the released ceiling gives 3, math.ceil 4


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("args", STARE_ARGS, ids=lambda a: f"{a['variant']}-{a['share']}")
def test_stare_matches_float64_reference(args: dict, case: str) -> None:
    for seed in (0, 1, 2):
        tokens = make_tokens(case, seed)
        stare = make_stare(args)
        ppo = ppo_token_loss(tokens.logprobs, tokens.old_logprobs, tokens.advantages, ClipConfig(**BASE_CLIP))
        metrics: dict = {}
        weights = stare.token_weights(tokens, ppo, metrics)
        t = as_lists(tokens)
        expected = ref_stare_weights(t, **args)
        for (i, j), value in expected.items():
            assert weights[i, j].item() == pytest.approx(value, abs=1e-7), (case, seed, i, j)
        assert torch.all(weights[~tokens.mask] == 1.0) and not weights.requires_grad
        loss, _ = policy_loss(tokens, ClipConfig(**BASE_CLIP), [make_stare(args)])
        assert loss.item() == pytest.approx(ref_stare_loss(t, **args), rel=1e-5, abs=1e-6), (case, seed)
        if expected:
            n = len(expected)
            plus = sum(1 for key, v in expected.items() if t["advantages"][key[0]][key[1]] > 0 and v != 1.0)
            assert metrics["intervention/stare/share_positive_selected"].item() == pytest.approx(plus / n)
            assert metrics["intervention/stare/gate_on"].item() == 1.0


def test_stare_ties_go_to_the_earliest_tokens() -> None:
    tokens = make_tokens("random", 3)
    tokens.logprobs = torch.full_like(tokens.logprobs, -1.0).requires_grad_()  # every surprisal equal
    stare = SurprisalAdvantageReweighting(top_ratio=0.5, positive_weight=2.0)
    ppo = ppo_token_loss(tokens.logprobs, tokens.old_logprobs, tokens.advantages, ClipConfig())
    weights = stare.token_weights(tokens, ppo, {})
    t = as_lists(tokens)
    assert {tuple(p) for p in (weights == 2.0).nonzero().tolist()} == {
        key for key, v in ref_stare_weights(t, share=0.5, w=2.0, m=1.0).items() if v == 2.0
    }


def test_stare_gradients_change_only_on_the_selected_tokens() -> None:
    tokens = make_tokens("random", seed=9)
    clip = ClipConfig(low=0.2, high=0.28, dual=10.0)
    _, plain, _, _ = grads(tokens, [], clip)
    args = dict(share=0.3, w=1.5, m=0.6, variant="C2")
    ppo = ppo_token_loss(tokens.logprobs, tokens.old_logprobs, tokens.advantages, clip)
    weights = make_stare(args).token_weights(tokens, ppo, {})
    _, weighted, entropy_grad, _ = grads(tokens, [make_stare(args)], clip)
    selected = (weights != 1.0) & tokens.mask
    assert (plain[selected] != 0).sum() >= 2  # some selected tokens are clipped (gradient 0 either way)
    assert torch.allclose(weighted[selected], weights[selected] * plain[selected], rtol=1e-6, atol=0)
    assert torch.equal(weighted[~selected], plain[~selected])
    assert entropy_grad is None or torch.all(entropy_grad == 0)


def test_stare_gate_off_is_exactly_the_base_loss() -> None:
    for case in CASES:
        tokens = make_tokens(case, seed=4)
        stare = make_stare(dict(share=0.5, w=3.0, m=0.2, variant="C2"), target_entropy=0.5)
        stare.after_rl_step({"actor/entropy": 0.5})  # not below the target: gate off
        assert not stare.gate_on
        loss_a, grad_a, _, _ = grads(tokens, [ClipHigher(0.2, 0.28)])
        loss_b, grad_b, _, metrics = grads(tokens, [ClipHigher(0.2, 0.28), stare])
        assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b), case
        if tokens.mask.any():
            assert metrics["intervention/stare/gate_on"].item() == 0.0
            assert metrics["intervention/stare/share_reweighted"].item() == 0.0


def ref_stare_controller(steps, target, w, m, adaptive, alpha, w_max, m_min):
    gate, history = True, []
    for entropy in steps:
        if math.isfinite(entropy):
            gate = entropy < target
            if adaptive and alpha != 0:
                sign = 1.0 if target > entropy else (-1.0 if target < entropy else 0.0)
                w = min(max(w + alpha * sign, 1.0), w_max)
                m = min(max(m - alpha * sign, m_min), 1.0)
        history.append((gate, w, m))
    return history


def test_stare_controller_gate_and_adaptive_weights() -> None:
    entropies = [0.1, 0.1, 0.5, math.nan, 0.2, 0.3, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9]
    stare = SurprisalAdvantageReweighting(positive_weight=1.1, negative_weight=0.9, target_entropy=0.3,
                                          variant="C2", adaptive=True, alpha=0.2, w_max=1.5, m_min=0.5)
    expected = ref_stare_controller(entropies, 0.3, 1.1, 0.9, True, 0.2, 1.5, 0.5)
    for entropy, (gate, w, m) in zip(entropies, expected):
        stare.after_rl_step({"actor/entropy": entropy})
        assert (stare.gate_on, stare.positive_weight, stare.negative_weight) == (gate, w, m)
    assert stare.positive_weight == 1.0 and stare.negative_weight == 1.0  # clamped at the bounds
    with pytest.raises(KeyError, match="actor/entropy"):
        stare.after_rl_step({})


def save_and_load(intervention: Intervention, fresh_copy: Intervention) -> Intervention:
    """Round-trip the state through torch.save / torch.load, as a Lightning checkpoint does."""
    buffer = io.BytesIO()
    torch.save({"interventions": [intervention.state_dict()]}, buffer)
    buffer.seek(0)
    fresh_copy.load_state_dict(torch.load(buffer, weights_only=False)["interventions"][0])
    return fresh_copy


def test_stare_state_survives_a_checkpoint_bit_exactly() -> None:
    def build() -> SurprisalAdvantageReweighting:
        return SurprisalAdvantageReweighting(top_ratio=0.3, variant="C2", adaptive=True, alpha=0.013, target_entropy=0.4)

    entropies = [0.1, 0.2, 0.55, 0.3, 0.1, 0.7, 0.05, 0.05]
    a, b = build(), build()
    for entropy in entropies[:4]:
        a.after_rl_step({"actor/entropy": entropy})
    b = save_and_load(a, b)
    assert b.state_dict() == a.state_dict()
    tokens = make_tokens("random", 5)
    for entropy in entropies[4:]:
        a.after_rl_step({"actor/entropy": entropy})
        b.after_rl_step({"actor/entropy": entropy})
        loss_a, grad_a, _, _ = grads(tokens, [a])
        loss_b, grad_b, _, _ = grads(tokens, [b])
        assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
        assert a.state_dict() == b.state_dict()


# ============================================================================ EntroPIC


def ref_entropic_loss(t: dict, splits, target, kp, ki, tau, limit=1.0, integral=0.0, clip: dict = BASE_CLIP):
    """Token-mean loss over micro-batches ``splits`` (row ranges) with the PI controller of the
    released code; returns (loss, integral, alphas)."""
    keys = positions(t)
    total_rows = sum(end - start for start, end in splits)
    loss, alphas = 0.0, []
    for start, end in splits:
        micro = [(i, j) for i, j in keys if start <= i < end]
        if not micro:
            continue
        entropy = sum(t["entropy"][i][j] for i, j in micro) / len(micro)
        error = entropy - target
        alpha = min(max(kp * error + ki * integral, -limit), limit)
        integral += error * (end - start) / total_rows
        alphas.append(alpha)
        high = [(i, j) for i, j in micro if t["logprobs"][i][j] > math.log(tau)]
        term = 0.0
        if high:
            values = []
            for i, j in high:
                r = math.exp(min(max(t["logprobs"][i][j] - t["old_logprobs"][i][j], -20.0), 20.0))
                values.append(-r * abs(t["advantages"][i][j]))
            term = alpha * sum(values) / len(high) * len(micro)  # the micro-batch's token share of the mean
        loss += ppo_sum(t, micro, clip=clip) + term
    return loss / max(len(keys), 1), integral, alphas


def entropic_tokens(seed: int, case: str = "random") -> PolicyTokens:
    """make_tokens with some probabilities above 0.95 (log pi > -0.0513)."""
    tokens = make_tokens(case, seed)
    logprobs = tokens.logprobs.detach().clone()
    logprobs[:, ::2] = -0.01 * (1 + torch.arange(logprobs[:, ::2].numel()).view_as(logprobs[:, ::2]) % 7)
    logprobs = torch.where(tokens.mask, logprobs, tokens.logprobs.detach())
    tokens.logprobs = logprobs.requires_grad_()
    return tokens


def minibatch_run(tokens, interventions, splits, clip=ClipConfig(**BASE_CLIP)):
    begin_minibatch(tokens, clip, interventions)
    total = tokens.mask.sum().item()
    losses = []
    for start, end in splits:
        loss, _ = policy_loss(rows(tokens, start, end), clip, interventions,
                              totals=LossTotals(total, float(tokens.mask.shape[0]), tokens.mask.shape[1]))
        losses.append(loss)
    return sum(losses)


@pytest.mark.parametrize("splits", [[(0, 4)], [(0, 2), (2, 4)], [(0, 1), (1, 2), (2, 3), (3, 4)]])
@pytest.mark.parametrize("gains", [(1.0, 0.01, 0.1), (3.0, 0.5, 1.5), (0.0, 2.0, 0.4)])
def test_entropic_matches_float64_reference(gains, splits) -> None:
    kp, ki, target = gains
    for seed in (0, 1):
        tokens = entropic_tokens(seed)
        control = EntropyPIControl(target_entropy=target, proportional_gain=kp, integral_gain=ki)
        control.integral = 0.3  # a non-zero starting integral
        t = as_lists(tokens)
        expected, integral, alphas = ref_entropic_loss(t, splits, target, kp, ki, 0.95, integral=0.3)
        loss = minibatch_run(tokens, [control], splits)
        assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6), (seed, splits)
        assert control.integral == pytest.approx(integral, rel=1e-12, abs=1e-12)
        assert control.alpha == pytest.approx(alphas[-1], rel=1e-12, abs=1e-12)
        assert any(t["logprobs"][i][j] > math.log(0.95) for i, j in positions(t))


def test_entropic_alpha_is_clipped_and_signs_follow_the_error() -> None:
    tokens = entropic_tokens(2)
    high = EntropyPIControl(target_entropy=0.0, proportional_gain=100.0)
    metrics: dict = {}
    policy_loss(tokens, ClipConfig(), [high])
    assert high.alpha == 1.0  # entropy far above the target: alpha at +1
    low = EntropyPIControl(target_entropy=50.0, proportional_gain=100.0)
    policy_loss(tokens, ClipConfig(), [low])
    assert low.alpha == -1.0
    _, metrics = policy_loss(tokens, ClipConfig(), [EntropyPIControl(alpha_limit=0.25, target_entropy=0.0, proportional_gain=9.0)])
    assert metrics["intervention/entropic/alpha"].item() == pytest.approx(0.25)
    share = metrics["intervention/entropic/share_high_probability"].item()
    t = as_lists(tokens)
    expected = sum(t["logprobs"][i][j] > math.log(0.95) for i, j in positions(t)) / len(positions(t))
    assert share == pytest.approx(expected)


def test_entropic_gradient_changes_only_on_high_probability_tokens() -> None:
    tokens = entropic_tokens(3)
    _, plain, _, _ = grads(tokens, [])
    control = EntropyPIControl(target_entropy=0.2, proportional_gain=0.7, integral_gain=0.1)
    _, controlled, entropy_grad, _ = grads(tokens, [control])
    t = as_lists(tokens)
    keys = positions(t)
    high = [(i, j) for i, j in keys if t["logprobs"][i][j] > math.log(0.95)]
    assert len(high) >= 2 and control.alpha != 0.0
    scale = len(keys) / len(high)
    for i, j in keys:
        if (i, j) in high:  # d/dlogpi of alpha * scale * (-r |A|) / N is alpha * scale * (-r |A|) / N
            r = math.exp(t["logprobs"][i][j] - t["old_logprobs"][i][j])
            extra = control.alpha * scale * (-r * abs(t["advantages"][i][j])) / len(keys)
            assert controlled[i, j].item() == pytest.approx(plain[i, j].item() + extra, rel=1e-5, abs=1e-7)
        else:
            assert controlled[i, j] == plain[i, j]
    assert entropy_grad is None or torch.all(entropy_grad == 0)  # the entropy only drives the controller


def test_entropic_state_survives_a_checkpoint_bit_exactly() -> None:
    def build() -> EntropyPIControl:
        return EntropyPIControl(target_entropy=0.6, proportional_gain=0.9, integral_gain=0.37)

    a, b = build(), build()
    for seed in range(3):
        minibatch_run(entropic_tokens(seed), [a], [(0, 2), (2, 4)])
    b = save_and_load(a, b)
    assert b.state_dict() == a.state_dict()
    for seed in range(3, 6):
        tokens = entropic_tokens(seed)
        loss_a = minibatch_run(fresh(tokens), [a], [(0, 2), (2, 4)])
        loss_b = minibatch_run(fresh(tokens), [b], [(0, 2), (2, 4)])
        assert torch.equal(loss_a, loss_b)
        assert a.state_dict() == b.state_dict()


def test_entropic_global_scope_is_one_update_per_minibatch() -> None:
    tokens = entropic_tokens(4)
    whole = EntropyPIControl(target_entropy=0.3, integral_gain=0.2)
    whole.integral = -0.4
    expected = minibatch_run(tokens, [whole], [(0, 4)])
    split = EntropyPIControl(target_entropy=0.3, integral_gain=0.2, scope="global")
    split.integral = -0.4
    got = minibatch_run(tokens, [split], [(0, 2), (2, 4)])
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert split.integral == pytest.approx(whole.integral, rel=1e-12) and split.alpha == pytest.approx(whole.alpha, rel=1e-12)
    with pytest.raises(RuntimeError, match="begin_minibatch"):
        policy_loss(tokens, ClipConfig(), [EntropyPIControl(scope="global")])


# ============================================================================ CE-GPPO


def ref_ce_gppo_token(lp, olp, a, beta_low, beta_high, low, high, dual):
    """(loss, d loss / d log pi) of one token, from Eq. 17-18 (general GPPO) with the released dual clip."""
    r = math.exp(lp - olp)
    if a < 0 and r < 1 - low:
        bound = beta_low * (1 - low)
        if dual is not None and bound > dual:
            return -dual * a, 0.0
        return -bound * a, -bound * a
    if a > 0 and r > 1 + high:
        bound = beta_high * (1 + high)
        return -bound * a, -bound * a
    loss, unclipped, ratio, cut = ref_ppo(lp, olp, a, low, high, dual)
    outside = abs(lp - olp) > 20.0  # the PPO log-ratio clamp (policy_loss.py) has no gradient there
    return loss, (0.0 if cut or outside else -a * ratio)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    "setting",
    [(0.5, 1.0, 0.2, 0.2, 3.0), (0.75, 1.0, 0.1, 0.28, 10.0), (0.0, 0.0, 0.05, 0.05, None), (5.0, 2.0, 0.2, 0.2, 3.0)],
)
def test_ce_gppo_matches_float64_reference_value_and_gradient(setting, case: str) -> None:
    beta_low, beta_high, low, high, dual = setting
    for seed in (0, 1, 2):
        tokens = make_tokens(case, seed)
        clip = ClipConfig(low=low, high=high, dual=dual)
        loss, grad, entropy_grad, metrics = grads(tokens, [GradientPreservingClip(beta_low, beta_high)], clip)
        t = as_lists(tokens)
        keys = positions(t)
        n = max(len(keys), 1)
        expected_loss = 0.0
        for i, j in keys:
            value, slope = ref_ce_gppo_token(t["logprobs"][i][j], t["old_logprobs"][i][j], t["advantages"][i][j],
                                             beta_low, beta_high, low, high, dual)
            expected_loss += value / n
            assert grad[i, j].item() == pytest.approx(slope / n, rel=1e-5, abs=1e-7), (case, seed, i, j)
        assert loss.item() == pytest.approx(expected_loss, rel=1e-5, abs=1e-6), (case, seed)
        assert torch.all(grad[~tokens.mask] == 0)
        assert entropy_grad is None or torch.all(entropy_grad == 0)


def test_ce_gppo_changes_exactly_the_clipped_tokens_gradients() -> None:
    tokens = make_tokens("random", seed=8)
    clip = ClipConfig(low=0.1, high=0.1, dual=3.0)
    _, plain, _, _ = grads(tokens, [], clip)
    _, preserved, _, metrics = grads(tokens, [GradientPreservingClip(0.5, 1.0)], clip)
    ppo = ppo_token_loss(tokens.logprobs, tokens.old_logprobs, tokens.advantages, clip)
    region = (ppo.clipped_low | ppo.clipped_high) & ~ppo.clipped_dual & tokens.mask
    assert (ppo.clipped_low & tokens.mask).any() and (ppo.clipped_high & tokens.mask).any()
    assert torch.all(plain[region] == 0) and torch.all(preserved[region] != 0)
    assert torch.equal(preserved[~region], plain[~region])
    valid = tokens.mask.sum().item()
    assert metrics["intervention/ce_gppo/share_low_preserved"].item() == pytest.approx((ppo.clipped_low & region).sum().item() / valid)
    assert metrics["intervention/ce_gppo/share_high_preserved"].item() == pytest.approx((ppo.clipped_high & region).sum().item() / valid)


def test_ce_gppo_is_inert_on_policy() -> None:
    tokens = make_tokens("random", seed=12)
    tokens.old_logprobs = tokens.logprobs.detach().clone()
    loss_a, grad_a, _, _ = grads(tokens, [])
    loss_b, grad_b, _, _ = grads(tokens, [GradientPreservingClip()])
    assert GradientPreservingClip().uses_ratio
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)


def test_ce_gppo_reads_the_clip_higher_bounds() -> None:
    tokens = make_tokens("random", seed=6)
    t = as_lists(tokens)
    loss, grad, _, _ = grads(tokens, [ClipHigher(0.05, 0.28), GradientPreservingClip(0.5, 1.0)])
    n = len(positions(t))
    for i, j in positions(t):
        _, slope = ref_ce_gppo_token(t["logprobs"][i][j], t["old_logprobs"][i][j], t["advantages"][i][j],
                                     0.5, 1.0, 0.05, 0.28, BASE_CLIP["dual"])
        assert grad[i, j].item() == pytest.approx(slope / n, rel=1e-5, abs=1e-7)


# ============================================================================ composition and scopes


def stack(scope: str = "microbatch") -> list[Intervention]:
    return [
        ClipHigher(0.1, 0.28),
        SurprisalAdvantageReweighting(top_ratio=0.4, positive_weight=1.3, negative_weight=0.8, variant="C2", scope=scope),
        EntropyPIControl(target_entropy=0.5, proportional_gain=0.8, integral_gain=0.1, high_probability=0.9, scope=scope),
        GradientPreservingClip(0.5, 1.0),
    ]


def reference_new_stack_loss(t: dict, specs: list[dict], clip: dict = BASE_CLIP) -> float:
    """Token-mean loss of one micro-batch under the interventions ``specs`` stacked in order, from the
    formulas above and the composition rule ``keep * weight * ppo_loss + penalty``: STARE weights
    (gate on, the initial state), EntroPIC's term on high-probability tokens (a penalty, integral 0),
    CE-GPPO's replacement of the clipped regions (their PPO term dropped, the bounded term added,
    unweighted)."""
    clip = dict(clip)
    for spec in specs:
        if spec["kind"] == "clip_higher":
            clip.update(low=spec["low"], high=spec["high"])
    valid = positions(t)
    weight = {key: 1.0 for key in valid}
    keep = {key: True for key in valid}
    penalty = {key: 0.0 for key in valid}
    for spec in specs:
        kind = spec["kind"]
        if kind == "stare":
            for key, value in ref_stare_weights(t, spec["share"], spec["w"], spec["m"], spec["variant"]).items():
                weight[key] *= value
        elif kind == "entropic":
            mean_entropy = sum(t["entropy"][i][j] for i, j in valid) / len(valid)
            alpha = min(max(spec["kp"] * (mean_entropy - spec["target"]), -spec["limit"]), spec["limit"])
            high = [(i, j) for i, j in valid if t["logprobs"][i][j] > math.log(spec["tau"])]
            for i, j in high:  # alpha * mean over the high tokens of -r |A|, as a share of the token mean
                r = math.exp(min(max(t["logprobs"][i][j] - t["old_logprobs"][i][j], -20.0), 20.0))
                penalty[(i, j)] += alpha * -r * abs(t["advantages"][i][j]) * len(valid) / len(high)
        elif kind == "ce_gppo":
            for i, j in valid:
                value, _ = ref_ce_gppo_token(t["logprobs"][i][j], t["old_logprobs"][i][j], t["advantages"][i][j],
                                             spec["beta_low"], spec["beta_high"], clip["low"], clip["high"], clip["dual"])
                r, a = math.exp(t["logprobs"][i][j] - t["old_logprobs"][i][j]), t["advantages"][i][j]
                if (a < 0 and r < 1 - clip["low"]) or (a > 0 and r > 1 + clip["high"]):
                    keep[(i, j)] = False
                    penalty[(i, j)] += value
        elif kind != "clip_higher":
            raise ValueError(kind)
    total = 0.0
    for i, j in valid:
        loss = ref_ppo(t["logprobs"][i][j], t["old_logprobs"][i][j], t["advantages"][i][j], **clip)[0]
        total += (weight[(i, j)] * loss if keep[(i, j)] else 0.0) + penalty[(i, j)]
    return total / max(len(valid), 1)


NEW_STACK = [
    (lambda: ClipHigher(0.1, 0.28), {"kind": "clip_higher", "low": 0.1, "high": 0.28}),
    (lambda: SurprisalAdvantageReweighting(top_ratio=0.4, positive_weight=1.3, negative_weight=0.8, variant="C2"),
     {"kind": "stare", "share": 0.4, "w": 1.3, "m": 0.8, "variant": "C2"}),
    (lambda: EntropyPIControl(target_entropy=0.5, proportional_gain=0.8, integral_gain=0.1, high_probability=0.9),
     {"kind": "entropic", "target": 0.5, "kp": 0.8, "tau": 0.9, "limit": 1.0}),
    (lambda: GradientPreservingClip(0.5, 1.0), {"kind": "ce_gppo", "beta_low": 0.5, "beta_high": 1.0}),
]


def new_preset_specs(name: str) -> list[dict]:
    """The reference specs of a preset's components, read from its YAML (not from the library)."""
    components = OmegaConf.load(PRESETS / f"{name}.yaml").components.values()
    specs = []
    for node in components:
        kind = node._target_.rsplit(".", 1)[1]
        if kind == "ClipHigher":
            specs.append({"kind": "clip_higher", "low": node.low, "high": node.high})
        elif kind == "SurprisalAdvantageReweighting":
            assert node.scope == "microbatch"
            specs.append({"kind": "stare", "share": node.top_ratio, "w": node.positive_weight, "m": node.negative_weight,
                          "variant": node.variant})
        elif kind == "EntropyPIControl":
            assert node.scope == "microbatch"
            specs.append({"kind": "entropic", "target": node.target_entropy, "kp": node.proportional_gain,
                          "tau": node.high_probability, "limit": node.alpha_limit})
        elif kind == "GradientPreservingClip":
            specs.append({"kind": "ce_gppo", "beta_low": node.beta_low, "beta_high": node.beta_high})
        else:
            raise ValueError(f"no reference for {kind}")
    return specs


@pytest.mark.parametrize("seed", [0, 6])
def test_new_interventions_stack_matches_float64_reference(seed: int) -> None:
    tokens = entropic_tokens(seed)
    t = as_lists(tokens)
    stacked, _ = policy_loss(tokens, ClipConfig(**BASE_CLIP), [factory() for factory, _ in NEW_STACK])
    specs = [spec for _, spec in NEW_STACK]
    expected = reference_new_stack_loss(t, specs)
    assert stacked.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for k in range(len(specs)):  # every component acts on these tokens, so the comparison can fail on any
        assert reference_new_stack_loss(t, specs[:k] + specs[k + 1:]) != pytest.approx(expected, rel=1e-4), specs[k]["kind"]
    for preset in NEW_PRESETS:
        stacked, _ = policy_loss(tokens, ClipConfig(**BASE_CLIP), load_preset(preset))
        expected = reference_new_stack_loss(t, new_preset_specs(preset))
        assert stacked.item() == pytest.approx(expected, rel=1e-5, abs=1e-6), preset


def test_global_scope_over_microbatches_equals_the_whole_batch() -> None:
    tokens = entropic_tokens(6)
    whole = stack("microbatch")
    expected = minibatch_run(tokens, whole, [(0, 4)])
    split = stack("global")
    got = minibatch_run(tokens, split, [(0, 1), (1, 3), (3, 4)])
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert split[2].integral == pytest.approx(whole[2].integral, rel=1e-12)
    assert all(i.needs_minibatch_pass for i in split[1:3])
    assert not stack()[1].needs_minibatch_pass and stack()[2].needs_minibatch_pass


def _distributed_worker(rank: int, world: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        tokens = entropic_tokens(7)
        local = rows(tokens, 2 * rank, 2 * rank + 2)
        interventions = stack("global")
        begin_minibatch(local, ClipConfig(**BASE_CLIP), interventions)
        totals = LossTotals(tokens.mask.sum().item(), 4.0, 6, data_parallel_size=world)
        loss = sum(policy_loss(rows(local, k, k + 1), ClipConfig(**BASE_CLIP), interventions, totals=totals)[0]
                   for k in range(2))
        total = loss.detach().clone() / world  # DDP averages the ranks' (data_parallel_size-scaled) losses
        dist.all_reduce(total)
        out = {"loss": total.item(), "integral": interventions[2].integral, "alpha": interventions[2].alpha}
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_global_scope_across_two_gloo_ranks(tmp_path: Path) -> None:
    """Two gloo ranks, two rows each: the global selections and controller equal the one-process whole batch."""
    mp.spawn(_distributed_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    whole = stack("microbatch")
    expected = minibatch_run(entropic_tokens(7), whole, [(0, 4)])
    for result in results:
        assert result["loss"] == pytest.approx(expected.item(), rel=1e-6)
        assert result["integral"] == pytest.approx(whole[2].integral, rel=1e-12)
        assert result["alpha"] == pytest.approx(whole[2].alpha, rel=1e-12)


# ============================================================================ arguments


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: SurprisalAdvantageReweighting(top_ratio=1.5), "top_ratio"),
        (lambda: SurprisalAdvantageReweighting(top_ratio=-0.1), "top_ratio"),
        (lambda: SurprisalAdvantageReweighting(positive_weight=0.0), "positive_weight"),
        (lambda: SurprisalAdvantageReweighting(negative_weight=-1.0), "negative_weight"),
        (lambda: SurprisalAdvantageReweighting(target_entropy=0.0), "target_entropy"),
        (lambda: SurprisalAdvantageReweighting(variant="O2"), "variant"),
        (lambda: SurprisalAdvantageReweighting(alpha=-0.1), "alpha"),
        (lambda: SurprisalAdvantageReweighting(w_max=0.9), "w_max"),
        (lambda: SurprisalAdvantageReweighting(m_min=0.0), "m_min"),
        (lambda: SurprisalAdvantageReweighting(adaptive=True, positive_weight=1.6), "positive_weight"),
        (lambda: SurprisalAdvantageReweighting(adaptive=True, negative_weight=0.4), "negative_weight"),
        (lambda: SurprisalAdvantageReweighting(scope="node"), "scope"),
        (lambda: EntropyPIControl(target_entropy=-1.0), "target_entropy"),
        (lambda: EntropyPIControl(proportional_gain=-1.0), "proportional_gain"),
        (lambda: EntropyPIControl(integral_gain=-0.1), "integral_gain"),
        (lambda: EntropyPIControl(high_probability=1.0), "high_probability"),
        (lambda: EntropyPIControl(high_probability=0.0), "high_probability"),
        (lambda: EntropyPIControl(alpha_limit=0.0), "alpha_limit"),
        (lambda: EntropyPIControl(scope="rank"), "scope"),
        (lambda: GradientPreservingClip(beta_low=-0.5), "beta_low"),
        (lambda: GradientPreservingClip(beta_high=-1.0), "beta_high"),
    ],
)
def test_bad_arguments_name_the_knob(factory, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


# ============================================================================ presets


def test_new_preset_numbers() -> None:
    clip_higher, stare = load_preset("stare")
    assert (clip_higher.low, clip_higher.high) == (0.2, 0.28)
    assert (stare.top_ratio, stare.positive_weight, stare.negative_weight, stare.target_entropy) == (0.1, 1.1, 0.9, 0.3)
    assert (stare.variant, stare.adaptive, stare.alpha, stare.w_max, stare.m_min, stare.scope) == ("O1", False, 0.01, 1.5, 0.5, "microbatch")
    (entropic,) = load_preset("entropic")
    assert (entropic.target_entropy, entropic.proportional_gain, entropic.integral_gain) == (0.1, 1.0, 0.01)
    assert (entropic.high_probability, entropic.alpha_limit, entropic.scope) == (0.95, 1.0, "microbatch")
    (ce_gppo,) = load_preset("ce_gppo")
    assert (ce_gppo.beta_low, ce_gppo.beta_high) == (0.5, 1.0)


@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_new_preset_composes_and_passes_check_config(preset: str, tmp_path: Path) -> None:
    from steer.app import build_interventions
    from steer.startup import check_config
    from tests.conftest import TINY_RUN, compose

    cfg = compose([*TINY_RUN, f"intervention={preset}"], tmp_path)
    check_config(cfg)
    assert cfg.intervention.name == preset
    assert all(isinstance(i, Intervention) for i in build_interventions(cfg))


def test_every_new_preset_cites_its_numbers() -> None:
    """Each number in a new preset carries a comment (its source) on its line."""
    presets = Path(__file__).resolve().parents[2] / "conf" / "intervention"
    for preset in NEW_PRESETS:
        for line in (presets / f"{preset}.yaml").read_text().splitlines():
            body = line.split("#")[0]
            if any(ch.isdigit() for ch in body.split(":", 1)[-1]) and ":" in body:
                assert "#" in line, f"{preset}: uncited number in {line!r}"


# ============================================================================ end to end

# The tiny policy barely warmed up earns no reward (all advantages 0), so an adaptive entropy bonus keeps
# gradients non-trivial (as tests/test_resume.py does); STARE's adaptive weights and EntroPIC's integral move.
CONTROLLERS = [
    "intervention=entropy_bonus_adaptive",
    "intervention.components.entropy_bonus.target_entropy=10",
    "intervention.components.entropy_bonus.initial_coefficient=0.001",
    "+intervention.components.stare={_target_: steer.algo.interventions.stare.SurprisalAdvantageReweighting,"
    " adaptive: true, alpha: 0.05, target_entropy: 10.0}",
    "+intervention.components.entropic={_target_: steer.algo.interventions.entropic.EntropyPIControl,"
    " target_entropy: 0.05, integral_gain: 0.3}",
    "+intervention.components.ce_gppo={_target_: steer.algo.interventions.ce_gppo.GradientPreservingClip}",
]


def test_controllers_resume_from_a_checkpoint_bit_exactly(tmp_path: Path) -> None:
    from steer.app import train
    from tests.conftest import TINY_RUN, compose

    base = [*TINY_RUN, *CONTROLLERS, "logger=none", "callbacks.checkpoint.every_n_steps=2"]
    whole = train(compose([*base, "algorithm.steps=3"], tmp_path / "whole"))
    part = tmp_path / "part"
    train(compose([*base, "algorithm.steps=2"], part))
    checkpoint = part / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["interventions"]
    stare_state, entropic_state = saved[1], saved[2]
    assert stare_state["positive_weight"] == pytest.approx(1.2) and stare_state["gate_on"]  # moved twice by 0.05
    assert entropic_state["integral"] != 0.0
    resumed = train(compose([*base, "algorithm.steps=3", f"resume={checkpoint}"], part))
    deterministic = lambda m: {k: v for k, v in m.items() if not k.startswith("time/")}  # noqa: E731
    assert deterministic(resumed) == deterministic(whole)
    assert resumed["intervention/entropic/integral"] == whole["intervention/entropic/integral"]
    expected = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    got = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert got["interventions"] == expected["interventions"]
    for key, value in expected["state_dict"].items():
        assert torch.equal(value, got["state_dict"][key]), key


# One combined Lightning DDP run (2 CPU processes, gloo) of every new method with scope: global stacked on
# clip-higher, against one process over the same global batch (tests/distributed/ddp_driver.py, case
# "steer": scripted rollouts, micro-batches of 4). Bounds wide enough that every method acts on these
# short batches: a tight clip so that CE-GPPO has clipped tokens, a low probability threshold for EntroPIC.
DDP_STACK = [
    "~intervention.components.steer",
    "intervention.components.clip_higher.low=0.002",
    "intervention.components.clip_higher.high=0.002",
    "+intervention.components.stare={_target_: steer.algo.interventions.stare.SurprisalAdvantageReweighting,"
    " top_ratio: 0.3, positive_weight: 1.5, negative_weight: 0.7, variant: C2, target_entropy: 100.0, scope: global}",
    "+intervention.components.entropic={_target_: steer.algo.interventions.entropic.EntropyPIControl,"
    " target_entropy: 1.0, integral_gain: 0.5, high_probability: 0.02, scope: global}",
    "+intervention.components.ce_gppo={_target_: steer.algo.interventions.ce_gppo.GradientPreservingClip}",
]


def test_new_interventions_under_two_ddp_processes_give_the_one_process_update(tmp_path: Path) -> None:
    from tests.conftest import REPO
    from tests.distributed import ddp_driver

    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "STEER_CACHE": str(tmp_path / "cache2"), "PYTHONHASHSEED": "0"}
    env.pop("WORLD_SIZE", None)
    overrides = [arg for o in DDP_STACK for arg in ("--override", o)]
    launch = subprocess.Popen([sys.executable, str(REPO / "tests/distributed/ddp_driver.py"), str(tmp_path / "two"), "2",
                               "steer", "--no-eval", *overrides], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("STEER_CACHE", str(tmp_path / "cache1"))
            ddp_driver.save_model(tmp_path / "one" / "model")
            one = ddp_driver.run_case("steer", 1, tmp_path / "one", extra=DDP_STACK, evaluate=False)
        output, _ = launch.communicate(timeout=600)
    finally:
        if launch.poll() is None:
            launch.kill()
    assert launch.returncode == 0, output[-4000:]
    two = torch.load(tmp_path / "two" / "steer.pt", weights_only=False)
    assert two["world_size"] == 2 and one["world_size"] == 1 and len(one["steps"]) == len(two["steps"]) == 3
    for step, (a, b) in enumerate(zip(one["steps"], two["steps"])):
        for name, grad in a["grads"].items():
            torch.testing.assert_close(b["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=f"step {step} grad {name}")
        for name, param in a["params"].items():
            torch.testing.assert_close(b["params"][name], param, rtol=1e-4, atol=1e-6, msg=f"step {step} param {name}")
        for key in ("intervention/entropic/integral", "intervention/entropic/alpha", "intervention/stare/weight_mean",
                    "intervention/stare/share_positive_selected", "intervention/stare/share_negative_selected",
                    "intervention/ce_gppo/share_low_preserved", "intervention/ce_gppo/share_high_preserved"):
            assert b["metrics"][key] == pytest.approx(a["metrics"][key], rel=1e-4, abs=1e-6), (step, key)
    metrics = [step["metrics"] for step in one["steps"]]
    assert all(m["intervention/stare/share_positive_selected"] > 0 for m in metrics)
    assert all(m["intervention/entropic/alpha"] != 0 for m in metrics)
    assert any(m["intervention/ce_gppo/share_low_preserved"] + m["intervention/ce_gppo/share_high_preserved"] > 0 for m in metrics)
