"""Golden, gradient, composition and config tests of the entropy interventions.

Every reference below is written independently of the library: plain Python loops over float64
numbers, one token at a time, from the formulas in the papers and the issue.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from omegaconf import OmegaConf

from steer.algo.advantages import group_advantages
from steer.algo.interventions import (
    AdaptiveEntropyBonus,
    ClipCov,
    ClipHigher,
    EntropyAdvantage,
    EntropyBonus,
    ForkTokens,
    Intervention,
    KLCov,
    PolicyTokens,
    SteerReweighting,
    WReinforce,
)
from steer.algo.interventions.base import ClipConfig
from steer.algo.policy_loss import LossTotals, begin_minibatch, policy_loss, ppo_token_loss

torch.set_num_threads(1)

PRESETS = Path(__file__).resolve().parents[2] / "conf" / "intervention"
BASE_CLIP = dict(low=0.2, high=0.2, dual=3.0)


# --------------------------------------------------------------------------- data


def make_tokens(case: str = "random", seed: int = 0) -> PolicyTokens:
    """Random ``[4, 6]`` tokens with right padding (garbage in the padding) and edge cases."""
    g = torch.Generator().manual_seed(seed)
    batch, length = 4, 6
    lengths = torch.tensor([6, 4, 1, 3])
    if case == "single_token":
        lengths = torch.tensor([1, 0, 0, 0])
    mask = torch.arange(length)[None, :] < lengths[:, None]
    logprobs = -3.0 * torch.rand(batch, length, generator=g)
    old_logprobs = (logprobs + 0.5 * torch.randn(batch, length, generator=g)).clamp(max=0.0)
    entropy = 2.0 * torch.rand(batch, length, generator=g)
    old_entropy = entropy + 0.1 * torch.rand(batch, length, generator=g)
    advantages = torch.randn(batch, 1, generator=g).expand(batch, length).clone()
    if case == "zero_advantages":
        advantages.zero_()
    if case == "extreme_probs":  # pi near 0 and near 1, for the current and the old policy
        logprobs[0, :3] = torch.tensor([-30.0, -1e-9, -1e-3])
        old_logprobs[0, :3] = torch.tensor([-1e-9, -30.0, -1e-3])
        logprobs[1, 0], old_logprobs[1, 0] = -25.0, -25.0
    if case == "non_finite":  # STEER must treat a non-finite Omega as 0
        old_entropy[0, 1], old_entropy[0, 2], old_entropy[1, 0] = math.nan, math.inf, -math.inf
    # Padding holds garbage that must never leak into the loss.
    logprobs = torch.where(mask, logprobs, torch.full_like(logprobs, 7.0))
    old_logprobs = torch.where(mask, old_logprobs, torch.full_like(logprobs, -5.0))
    advantages = torch.where(mask, advantages, torch.full_like(logprobs, 3.0))
    entropy = torch.where(mask, entropy, torch.full_like(logprobs, math.nan))
    old_entropy = torch.where(mask, old_entropy, torch.full_like(logprobs, math.nan))
    return PolicyTokens(
        logprobs=logprobs.requires_grad_(),
        entropy=entropy.requires_grad_(),
        old_logprobs=old_logprobs,
        old_entropy=old_entropy,
        advantages=advantages,
        mask=mask,
    )


def fresh(tokens: PolicyTokens) -> PolicyTokens:
    """The same tokens with new leaf tensors for the gradient."""
    return PolicyTokens(
        logprobs=tokens.logprobs.detach().clone().requires_grad_(),
        entropy=tokens.entropy.detach().clone().requires_grad_(),
        old_logprobs=tokens.old_logprobs,
        old_entropy=tokens.old_entropy,
        advantages=tokens.advantages,
        mask=tokens.mask,
    )


def rows(tokens: PolicyTokens, start: int, end: int) -> PolicyTokens:
    names = ("logprobs", "entropy", "old_logprobs", "old_entropy", "advantages", "mask")
    return PolicyTokens(**{name: getattr(tokens, name)[start:end] for name in names})


def as_lists(tokens: PolicyTokens) -> dict[str, list]:
    return {
        name: getattr(tokens, name).detach().double().tolist()
        for name in ("logprobs", "entropy", "old_logprobs", "old_entropy", "advantages")
    } | {"mask": tokens.mask.tolist()}


def positions(t: dict) -> list[tuple[int, int]]:
    """Valid token positions in row-major order."""
    return [(i, j) for i, row in enumerate(t["mask"]) for j, valid in enumerate(row) if valid]


# ---------------------------------------------------------------- float64 references


def ref_ppo(lp: float, olp: float, a: float, low: float, high: float, dual: float | None):
    """One token's dual-clipped PPO loss: (loss, unclipped, ratio, gradient cut by a clip)."""
    r = math.exp(min(max(lp - olp, -20.0), 20.0))
    unclipped = -a * r
    clipped = -a * min(max(r, 1.0 - low), 1.0 + high)
    loss, cut = max(unclipped, clipped), clipped > unclipped
    if dual is not None and a < 0 and loss > -a * dual:
        loss, cut = -a * dual, True
    return loss, unclipped, r, cut


def ref_probability(logprob: float) -> float:
    return min(max(math.exp(logprob), 1e-8), 1.0 - 1e-8)


def ref_omega(t: dict, i: int, j: int, a: float, form: str, clip: dict) -> float:
    pi = ref_probability(t["logprobs"][i][j])
    if form == "released":
        pi_old = ref_probability(t["old_logprobs"][i][j])
        omega = a / pi_old * pi * (1 - pi) * (math.log(pi) + t["old_entropy"][i][j])
    else:
        _, _, r, cut = ref_ppo(t["logprobs"][i][j], t["old_logprobs"][i][j], a, **clip)
        omega = 0.0 if cut else a * r * pi * (1 - pi) * (math.log(pi) + t["entropy"][i][j])
    return abs(omega) if math.isfinite(omega) else 0.0


def ref_steer_weights(
    t, advantages, clip, lambda_min=0.8, form="released", mapping="exponential", w_min=0.8, w_max=1.2
):
    omegas = {(i, j): ref_omega(t, i, j, advantages[i][j], form, clip) for i, j in positions(t)}
    if not omegas:
        return {}
    low, high = min(omegas.values()), max(omegas.values())
    weights = {}
    for key, omega in omegas.items():
        if mapping == "exponential":
            k = -math.log(lambda_min) / max(high, 0.02)
            weights[key] = min(max(math.exp(-k * omega), lambda_min), 1.0)
        elif high > low:
            weights[key] = min(max(w_max - (omega - low) * (w_max - w_min) / (high - low), w_min), w_max)
        else:
            weights[key] = (w_min + w_max) / 2
    return weights


def ref_cov_scores(t: dict, advantages) -> dict[tuple[int, int], float]:
    valid = positions(t)
    mean_a = sum(advantages[i][j] for i, j in valid) / len(valid)
    mean_lp = sum(t["logprobs"][i][j] for i, j in valid) / len(valid)
    return {(i, j): (advantages[i][j] - mean_a) * (t["logprobs"][i][j] - mean_lp) for i, j in valid}


def ref_clip_cov_selection(t, advantages, clip, ratio, low, high, seed) -> set:
    scores = ref_cov_scores(t, advantages)
    candidates = [
        (i, j)
        for (i, j), score in scores.items()
        if low < score < high and not ref_ppo(t["logprobs"][i][j], t["old_logprobs"][i][j], advantages[i][j], **clip)[3]
    ]
    count = max(1, int(ratio * len(scores)))
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed)).tolist()
    return {candidates[n] for n in order[:count]}


def ref_kl_cov_selection(t, advantages, ratio) -> set:
    scores = ref_cov_scores(t, advantages)
    count = max(1, int(ratio * len(scores)))
    return set(sorted(scores, key=lambda key: -scores[key])[:count])


def ref_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    below = int(math.floor(position))
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def reference_loss(t: dict, spec: dict, clip: dict = BASE_CLIP) -> float:
    """Token-mean loss of one intervention given by ``spec`` (a dict), from the formulas."""
    kind = spec["kind"]
    clip = dict(clip)
    if kind in ("clip_higher", "steer_on_clip_higher"):
        clip.update(low=spec.get("low", 0.2), high=spec.get("high", 0.28))
    advantages = [row[:] for row in t["advantages"]]
    valid = positions(t)
    if kind == "entropy_adv":
        for i, j in valid:
            a = advantages[i][j]
            advantages[i][j] = a + min(spec["alpha"] * t["entropy"][i][j], abs(a) / spec["kappa"])
    weights = {key: 1.0 for key in valid}
    keep = {key: True for key in valid}
    penalty = {key: 0.0 for key in valid}
    if kind in ("steer", "steer_on_clip_higher"):
        weights = ref_steer_weights(t, advantages, clip, **spec["args"])
    if kind == "w_reinforce":
        weights = {(i, j): spec["lambda"] if advantages[i][j] > 0 else 1.0 for i, j in valid}
    if kind == "entropy_bonus":
        penalty = {(i, j): -spec["beta"] * t["entropy"][i][j] for i, j in valid}
    if kind == "clip_cov":
        chosen = ref_clip_cov_selection(t, advantages, clip, spec["ratio"], spec["low"], spec["high"], spec["seed"])
        keep = {key: key not in chosen for key in valid}
    if kind == "fork_tokens":
        entropies = [t["entropy"][i][j] for i, j in valid]
        threshold = ref_quantile(entropies, 1 - spec["top"])
        keep = {(i, j): t["entropy"][i][j] >= threshold for i, j in valid}
    penalised = ref_kl_cov_selection(t, advantages, spec["ratio"]) if kind == "kl_cov" else set()
    total = 0.0
    for i, j in valid:
        lp, olp, a = t["logprobs"][i][j], t["old_logprobs"][i][j], advantages[i][j]
        loss, unclipped, _, _ = ref_ppo(lp, olp, a, **clip)
        if (i, j) in penalised:  # KL-Cov replaces the clipped loss of the selected tokens
            total += unclipped + spec["beta"] * abs(lp - olp)
            continue
        total += (weights[(i, j)] * loss if keep[(i, j)] else 0.0) + penalty[(i, j)]
    return total / max(len(valid), 1)


# ------------------------------------------------------------------------ golden tests

SPECS = {
    "grpo": (lambda: [], {"kind": "none"}),
    "clip_higher": (lambda: [ClipHigher(0.2, 0.28)], {"kind": "clip_higher", "low": 0.2, "high": 0.28}),
    "clip_higher_extreme": (lambda: [ClipHigher(0.99, 5.0)], {"kind": "clip_higher", "low": 0.99, "high": 5.0}),
    "entropy_bonus": (lambda: [EntropyBonus(0.01)], {"kind": "entropy_bonus", "beta": 0.01}),
    "clip_cov_default": (
        lambda: [ClipCov(seed=3)],
        {"kind": "clip_cov", "ratio": 2e-4, "low": 1.0, "high": 5.0, "seed": 3},
    ),
    "clip_cov_wide": (
        lambda: [ClipCov(ratio=0.3, omega_low=-0.5, omega_high=5.0, seed=7)],
        {"kind": "clip_cov", "ratio": 0.3, "low": -0.5, "high": 5.0, "seed": 7},
    ),
    "kl_cov": (lambda: [KLCov(ratio=0.25, coefficient=1.0)], {"kind": "kl_cov", "ratio": 0.25, "beta": 1.0}),
    "kl_cov_default": (lambda: [KLCov()], {"kind": "kl_cov", "ratio": 2e-3, "beta": 1.0}),
    "steer": (lambda: [SteerReweighting()], {"kind": "steer", "args": {}}),
    "steer_lambda_0.5": (lambda: [SteerReweighting(lambda_min=0.5)], {"kind": "steer", "args": {"lambda_min": 0.5}}),
    "steer_first_order": (
        lambda: [SteerReweighting(omega="first_order")],
        {"kind": "steer", "args": {"form": "first_order"}},
    ),
    "steer_linear": (
        lambda: [SteerReweighting(mapping="linear", w_min=0.8, w_max=1.2)],
        {"kind": "steer", "args": {"mapping": "linear"}},
    ),
    "steer_on_clip_higher": (
        lambda: [ClipHigher(0.2, 0.28), SteerReweighting(omega="first_order")],
        {"kind": "steer_on_clip_higher", "args": {"form": "first_order"}},
    ),
    "fork_tokens": (lambda: [ForkTokens(0.2)], {"kind": "fork_tokens", "top": 0.2}),
    "entropy_adv": (lambda: [EntropyAdvantage(0.4, 2.0)], {"kind": "entropy_adv", "alpha": 0.4, "kappa": 2.0}),
    "w_reinforce": (lambda: [WReinforce(0.1)], {"kind": "w_reinforce", "lambda": 0.1}),
}
CASES = ["random", "zero_advantages", "single_token", "extreme_probs", "non_finite"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_loss_matches_float64_reference(name: str, case: str) -> None:
    factory, spec = SPECS[name]
    for seed in (0, 1):
        tokens = make_tokens(case, seed)
        loss, _ = policy_loss(tokens, ClipConfig(**BASE_CLIP), factory())
        expected = reference_loss(as_lists(tokens), spec)
        assert math.isfinite(loss.item()), (name, case)
        assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6), (name, case, seed)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    "args",
    [
        {},
        {"lambda_min": 0.3},
        {"form": "first_order"},
        {"mapping": "linear"},
        {"mapping": "linear", "w_min": 0.9, "w_max": 1.0},
    ],
)
def test_steer_weights_match_reference(args: dict, case: str) -> None:
    tokens = make_tokens(case, seed=2)
    kwargs = {("omega" if k == "form" else k): v for k, v in args.items()}
    steer = SteerReweighting(**kwargs)
    clip = ClipConfig(**BASE_CLIP)
    ppo = ppo_token_loss(tokens.logprobs, tokens.old_logprobs, tokens.advantages, clip)
    metrics: dict = {}
    weights = steer.token_weights(tokens, ppo, metrics)
    t = as_lists(tokens)
    expected = ref_steer_weights(t, t["advantages"], BASE_CLIP, **args)
    for (i, j), w in expected.items():
        assert weights[i, j].item() == pytest.approx(w, abs=1e-6), (i, j)
    assert torch.all(weights[~tokens.mask] == 1.0)
    assert not weights.requires_grad
    values = torch.tensor(list(expected.values()))
    assert metrics["intervention/steer/weight_mean"].item() == pytest.approx(values.mean().item(), abs=1e-6)
    assert metrics["intervention/steer/weight_min"].item() == pytest.approx(values.min().item(), abs=1e-6)
    assert metrics["intervention/steer/weight_max"].item() == pytest.approx(values.max().item(), abs=1e-6)
    floor = args.get("w_min", 0.8) if args.get("mapping") == "linear" else args.get("lambda_min", 0.8)
    share = sum(w <= floor + 1e-6 for w in expected.values()) / len(expected)
    assert metrics["intervention/steer/share_at_min"].item() == pytest.approx(share)


def test_steer_weight_edge_values() -> None:
    # Every Omega is 0 when all advantages are 0: the floor 0.02 keeps k finite, all weights 1.
    tokens = make_tokens("zero_advantages")
    ppo = ppo_token_loss(tokens.logprobs, tokens.old_logprobs, tokens.advantages, ClipConfig())
    assert torch.all(SteerReweighting().token_weights(tokens, ppo, {}) == 1.0)
    # Linear mapping with max = min: the midpoint of the band for every token.
    weights = SteerReweighting(mapping="linear", w_min=0.8, w_max=1.2).token_weights(tokens, ppo, {})
    assert torch.allclose(weights[tokens.mask], torch.tensor(1.0))
    # The token with the largest |Omega| gets exactly lambda_min when max |Omega| >= 0.02.
    tokens = make_tokens("random", seed=4)
    ppo = ppo_token_loss(tokens.logprobs, tokens.old_logprobs, tokens.advantages, ClipConfig())
    steer = SteerReweighting(lambda_min=0.7)
    omega = steer.omega_abs(tokens, ppo)
    weights = steer.token_weights(tokens, ppo, {})
    top = torch.where(tokens.mask, omega, torch.zeros_like(omega)).argmax()
    assert omega.flatten()[top] > 0.02
    assert weights.flatten()[top].item() == pytest.approx(0.7)


def test_clip_cov_selects_inside_band_and_not_clipped() -> None:
    tokens = make_tokens("random", seed=5)
    clip = ClipConfig(**BASE_CLIP)
    ppo = ppo_token_loss(tokens.logprobs, tokens.old_logprobs, tokens.advantages, clip)
    clip_cov = ClipCov(ratio=0.5, omega_low=-0.2, omega_high=0.3, seed=0)
    metrics: dict = {}
    keep = clip_cov.token_mask(tokens, ppo, metrics)
    t = as_lists(tokens)
    expected = ref_clip_cov_selection(t, t["advantages"], BASE_CLIP, 0.5, -0.2, 0.3, seed=0)
    assert {tuple(p) for p in (~keep & tokens.mask).nonzero().tolist()} == expected
    assert metrics["intervention/clip_cov/selected_count"].item() == len(expected)
    assert not torch.any(~keep & ppo.clipped)


def test_clip_cov_is_seeded_and_checkpointed() -> None:
    tokens = make_tokens("random", seed=6)
    ppo = ppo_token_loss(tokens.logprobs, tokens.old_logprobs, tokens.advantages, ClipConfig())

    def draws(intervention: ClipCov, n: int = 3) -> list[torch.Tensor]:
        return [intervention.token_mask(tokens, ppo, {}) for _ in range(n)]

    a = ClipCov(ratio=0.3, omega_low=-5, omega_high=5, seed=11)
    b = ClipCov(ratio=0.3, omega_low=-5, omega_high=5, seed=11)
    assert all(torch.equal(x, y) for x, y in zip(draws(a), draws(b)))
    different = ClipCov(ratio=0.3, omega_low=-5, omega_high=5, seed=12)
    assert any(not torch.equal(x, y) for x, y in zip(draws(a, 5), draws(different, 5)))
    state = a.state_dict()
    resumed = ClipCov(ratio=0.3, omega_low=-5, omega_high=5, seed=999)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(draws(a), draws(resumed)))


def test_fork_tokens_keeps_top_share() -> None:
    tokens = make_tokens("random", seed=3)
    ppo = ppo_token_loss(tokens.logprobs, tokens.old_logprobs, tokens.advantages, ClipConfig())
    keep = ForkTokens(0.2).token_mask(tokens, ppo, {})
    kept = (keep & tokens.mask).sum().item()
    assert 1 <= kept <= math.ceil(0.2 * tokens.mask.sum().item())
    assert tokens.entropy[keep & tokens.mask].min() >= tokens.entropy[~keep & tokens.mask].max()


def test_opo_advantage_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (3, 4), generator=g).float()
    lengths = torch.randint(1, 50, (3, 4), generator=g)
    out = group_advantages(rewards, "opo", lengths)
    for p in range(3):
        weighted = sum(float(lengths[p, j]) * float(rewards[p, j]) for j in range(4))
        baseline = weighted / sum(float(lengths[p, j]) for j in range(4))
        for j in range(4):
            assert out[p, j].item() == pytest.approx(float(rewards[p, j]) - baseline, abs=1e-6)


# ------------------------------------------------------------------------ gradients


def grads(tokens: PolicyTokens, interventions: list[Intervention], clip: ClipConfig | None = None):
    tokens = fresh(tokens)
    loss, metrics = policy_loss(tokens, clip or ClipConfig(**BASE_CLIP), interventions)
    loss.backward()
    return loss, tokens.logprobs.grad, tokens.entropy.grad, metrics


def test_clip_cov_zeroes_exactly_the_selected_gradients() -> None:
    tokens = make_tokens("random", seed=8)
    _, plain, _, _ = grads(tokens, [])
    clip_cov = ClipCov(ratio=0.3, omega_low=-5.0, omega_high=5.0, seed=1)
    ppo = ppo_token_loss(tokens.logprobs, tokens.old_logprobs, tokens.advantages, ClipConfig(**BASE_CLIP))
    selected = ~ClipCov(ratio=0.3, omega_low=-5.0, omega_high=5.0, seed=1).token_mask(tokens, ppo, {}) & tokens.mask
    _, with_clip_cov, _, _ = grads(tokens, [clip_cov])
    assert selected.sum() >= 2
    assert torch.all(plain[selected] != 0)
    assert torch.all(with_clip_cov[selected] == 0)
    assert torch.equal(with_clip_cov[~selected], plain[~selected])


def test_entropy_bonus_gradient_flows_through_entropy() -> None:
    tokens = make_tokens("random", seed=1)
    _, lp_plain, entropy_plain, _ = grads(tokens, [])
    _, lp_bonus, entropy_bonus, metrics = grads(tokens, [EntropyBonus(0.05)])
    assert entropy_plain is None or torch.all(entropy_plain == 0)
    n = tokens.mask.sum()
    assert torch.allclose(entropy_bonus[tokens.mask], torch.tensor(-0.05) / n)
    assert torch.all(entropy_bonus[~tokens.mask] == 0)
    assert torch.equal(lp_plain, lp_bonus)
    assert metrics["intervention/entropy_bonus/coefficient"].item() == pytest.approx(0.05)


@pytest.mark.parametrize("kwargs", [{}, {"omega": "first_order"}, {"mapping": "linear"}, {"lambda_min": 0.5}])
def test_steer_scales_each_gradient_by_its_weight(kwargs: dict) -> None:
    tokens = make_tokens("random", seed=9)
    clip = ClipConfig(low=0.2, high=0.28, dual=10.0)
    _, plain, _, _ = grads(tokens, [], clip)
    steer = SteerReweighting(**kwargs)
    ppo = ppo_token_loss(tokens.logprobs, tokens.old_logprobs, tokens.advantages, clip)
    weights = steer.token_weights(tokens, ppo, {})
    _, weighted, _, _ = grads(tokens, [steer], clip)
    assert torch.any(weights[tokens.mask] < 1.0)
    assert torch.allclose(weighted, weights * plain, rtol=1e-6, atol=1e-9)


def test_steer_lambda_min_one_is_exactly_clip_higher() -> None:
    for case in CASES:
        tokens = make_tokens(case, seed=3)
        loss_a, grad_a, _, _ = grads(tokens, [ClipHigher(0.2, 0.28)])
        loss_b, grad_b, _, metrics = grads(tokens, [ClipHigher(0.2, 0.28), SteerReweighting(lambda_min=1.0)])
        assert torch.equal(loss_a, loss_b), case
        assert torch.equal(grad_a, grad_b), case
        assert metrics["intervention/steer/share_reweighted"].item() == 0.0


def test_kl_cov_gradient_only_changes_on_selected_tokens() -> None:
    tokens = make_tokens("random", seed=10)
    _, plain, _, _ = grads(tokens, [])
    _, penalised, _, metrics = grads(tokens, [KLCov(ratio=0.25, coefficient=0.5)])
    t = as_lists(tokens)
    chosen = ref_kl_cov_selection(t, t["advantages"], 0.25)
    n = tokens.mask.sum().item()
    assert metrics["intervention/kl_cov/selected_count"].item() == len(chosen)
    for i, j in positions(t):
        if (i, j) in chosen:
            lp, olp, a = t["logprobs"][i][j], t["old_logprobs"][i][j], t["advantages"][i][j]
            expected = (-a * math.exp(lp - olp) + 0.5 * math.copysign(1.0, lp - olp)) / n
            assert penalised[i, j].item() == pytest.approx(expected, rel=1e-5)
        else:
            assert penalised[i, j] == plain[i, j]


def test_fork_tokens_and_w_reinforce_gradients() -> None:
    tokens = make_tokens("random", seed=11)
    _, plain, _, _ = grads(tokens, [])
    _, forked, _, metrics = grads(tokens, [ForkTokens(0.2)])
    ppo = ppo_token_loss(tokens.logprobs, tokens.old_logprobs, tokens.advantages, ClipConfig(**BASE_CLIP))
    kept = ForkTokens(0.2).token_mask(tokens, ppo, {})
    masked = tokens.mask & ~kept
    assert masked.any() and (kept & tokens.mask).any()
    assert torch.all(forked[masked] == 0) and torch.any(plain[masked] != 0)
    assert torch.equal(forked[kept], plain[kept])
    share = masked.sum() / tokens.mask.sum()
    assert metrics["intervention/fork_tokens/share_masked"].item() == pytest.approx(share.item())
    _, weighted, _, _ = grads(tokens, [WReinforce(0.1)])
    positive = tokens.advantages > 0
    assert torch.allclose(weighted[positive], 0.1 * plain[positive])
    assert torch.equal(weighted[~positive], plain[~positive])


@pytest.mark.parametrize("intervention", [ClipHigher(0.2, 0.28), KLCov(ratio=0.3)])
def test_ratio_based_interventions_are_inert_on_policy(intervention: Intervention) -> None:
    tokens = make_tokens("random", seed=12)
    tokens.old_logprobs = tokens.logprobs.detach().clone()  # one mini-batch, one epoch: ratio = 1
    loss_a, grad_a, _, _ = grads(tokens, [])
    loss_b, grad_b, _, _ = grads(tokens, [intervention])
    assert intervention.uses_ratio
    assert torch.allclose(loss_a, loss_b) and torch.allclose(grad_a, grad_b)


def test_uses_ratio_flags() -> None:
    assert ClipHigher().uses_ratio and KLCov().uses_ratio
    for intervention in (EntropyBonus(), ClipCov(), SteerReweighting(), ForkTokens(), EntropyAdvantage(), WReinforce()):
        assert not intervention.uses_ratio, intervention.name


# ------------------------------------------------------------------------ composition


def reference_stacked_loss(t: dict, specs: list[dict], clip: dict = BASE_CLIP) -> float:
    """Token-mean loss of the interventions ``specs`` stacked in order, from the formulas above and the
    composition rule of ``steer.algo.interventions.base``: per valid token

        keep * weight * ppo_loss(A', clip') + penalty

    with ``clip'`` the bounds of the last clip-higher, ``A'`` the advantages after every entropy-aware
    shaping in order, ``weight`` the product of the weights (STEER, W-REINFORCE), ``keep`` the
    conjunction of the masks (Clip-Cov, fork tokens, KL-Cov) and ``penalty`` the sum of the penalties
    (entropy bonus; KL-Cov's replacement of the tokens it selects, which no weight multiplies)."""
    clip = dict(clip)
    for spec in specs:
        if spec["kind"] == "clip_higher":
            clip.update(low=spec["low"], high=spec["high"])
    valid = positions(t)
    advantages = [row[:] for row in t["advantages"]]
    for spec in specs:
        if spec["kind"] == "entropy_adv":
            for i, j in valid:
                a = advantages[i][j]
                advantages[i][j] = a + min(spec["alpha"] * t["entropy"][i][j], abs(a) / spec["kappa"])
    weight = {key: 1.0 for key in valid}
    keep = {key: True for key in valid}
    penalty = {key: 0.0 for key in valid}
    for spec in specs:
        kind = spec["kind"]
        if kind == "steer":
            for key, value in ref_steer_weights(t, advantages, clip, **spec["args"]).items():
                weight[key] *= value
        elif kind == "w_reinforce":
            for i, j in valid:
                if advantages[i][j] > 0:
                    weight[(i, j)] *= spec["lambda"]
        elif kind == "entropy_bonus":
            for i, j in valid:
                penalty[(i, j)] -= spec["beta"] * t["entropy"][i][j]
        elif kind == "clip_cov":
            for key in ref_clip_cov_selection(t, advantages, clip, spec["ratio"], spec["low"], spec["high"], spec["seed"]):
                keep[key] = False
        elif kind == "fork_tokens":
            threshold = ref_quantile([t["entropy"][i][j] for i, j in valid], 1 - spec["top"])
            for i, j in valid:
                keep[(i, j)] = keep[(i, j)] and t["entropy"][i][j] >= threshold
        elif kind == "kl_cov":
            for i, j in ref_kl_cov_selection(t, advantages, spec["ratio"]):
                lp, olp = t["logprobs"][i][j], t["old_logprobs"][i][j]
                _, unclipped, _, _ = ref_ppo(lp, olp, advantages[i][j], **clip)
                keep[(i, j)] = False
                penalty[(i, j)] += unclipped + spec["beta"] * abs(lp - olp)
        elif kind != "clip_higher" and kind != "entropy_adv":
            raise ValueError(kind)
    total = 0.0
    for i, j in valid:
        loss = ref_ppo(t["logprobs"][i][j], t["old_logprobs"][i][j], advantages[i][j], **clip)[0]
        total += (weight[(i, j)] * loss if keep[(i, j)] else 0.0) + penalty[(i, j)]
    return total / max(len(valid), 1)


STACK = [  # every hook kind, in the order the library applies them
    (lambda: ClipHigher(0.1, 0.15), {"kind": "clip_higher", "low": 0.1, "high": 0.15}),
    (lambda: EntropyAdvantage(0.4, 2.0), {"kind": "entropy_adv", "alpha": 0.4, "kappa": 2.0}),
    (lambda: SteerReweighting(), {"kind": "steer", "args": {}}),
    (lambda: WReinforce(0.5), {"kind": "w_reinforce", "lambda": 0.5}),
    (lambda: ClipCov(ratio=0.2, omega_low=-5, omega_high=5, seed=4), {"kind": "clip_cov", "ratio": 0.2, "low": -5, "high": 5, "seed": 4}),
    (lambda: KLCov(ratio=0.1, coefficient=1.0), {"kind": "kl_cov", "ratio": 0.1, "beta": 1.0}),
    (lambda: ForkTokens(0.6), {"kind": "fork_tokens", "top": 0.6}),
    (lambda: EntropyBonus(0.01), {"kind": "entropy_bonus", "beta": 0.01}),
]


@pytest.mark.parametrize("case", CASES)
def test_stacked_interventions_match_float64_reference(case: str) -> None:
    for seed in (0, 13):
        tokens = make_tokens(case, seed)
        stacked, _ = policy_loss(tokens, ClipConfig(**BASE_CLIP), [factory() for factory, _ in STACK])
        expected = reference_stacked_loss(as_lists(tokens), [spec for _, spec in STACK])
        assert stacked.item() == pytest.approx(expected, rel=1e-5, abs=1e-6), (case, seed)


def test_every_component_of_the_stack_changes_the_reference() -> None:
    """The stack's data exercise every component, so the comparison above can fail on any of them."""
    t = as_lists(make_tokens("random", seed=13))
    specs = [spec for _, spec in STACK]
    full = reference_stacked_loss(t, specs)
    for k in range(len(specs)):
        assert reference_stacked_loss(t, specs[:k] + specs[k + 1:]) != pytest.approx(full, rel=1e-4), specs[k]["kind"]


def preset_specs(name: str) -> list[dict]:
    """The reference specs of a preset's components, read from its YAML (not from the library)."""
    preset = OmegaConf.merge(OmegaConf.create({"seed": 0}), {"intervention": OmegaConf.load(PRESETS / f"{name}.yaml")})
    specs = []
    for node in preset.intervention.components.values():
        kind = node._target_.rsplit(".", 1)[1]
        if kind == "ClipHigher":
            specs.append({"kind": "clip_higher", "low": node.low, "high": node.high})
        elif kind == "SteerReweighting":
            assert node.scope == "microbatch" and node.omega_floor == 0.02  # what ref_steer_weights assumes
            specs.append({"kind": "steer", "args": {"lambda_min": node.lambda_min, "form": node.omega, "mapping": node.mapping}})
        elif kind == "ClipCov":
            assert node.scope == "microbatch"
            specs.append({"kind": "clip_cov", "ratio": node.ratio, "low": node.omega_low, "high": node.omega_high, "seed": node.seed})
        elif kind == "EntropyBonus":
            specs.append({"kind": "entropy_bonus", "beta": node.coefficient})
        else:
            raise ValueError(f"no reference for {kind}")
    return specs


@pytest.mark.parametrize("preset", ["steer", "steer_extreme", "clip_cov_extreme", "entropy_bonus_extreme"])
def test_stacked_presets_match_float64_reference(preset: str) -> None:
    for seed in (0, 14):
        tokens = make_tokens("random", seed)
        stacked, _ = policy_loss(tokens, ClipConfig(**BASE_CLIP), load_preset(preset))
        expected = reference_stacked_loss(as_lists(tokens), preset_specs(preset))
        assert stacked.item() == pytest.approx(expected, rel=1e-5, abs=1e-6), (preset, seed)


# ------------------------------------------------------------------------ global scope


def minibatch_loss(tokens: PolicyTokens, interventions: list[Intervention], splits: list[tuple[int, int]]):
    """Loss summed over micro-batches with begin_minibatch first, as the trainer does."""
    clip = ClipConfig(**BASE_CLIP)
    begin_minibatch(tokens, clip, interventions)
    total = tokens.mask.sum().item()
    losses, metrics = [], []
    for start, end in splits:
        loss, m = policy_loss(rows(tokens, start, end), clip, interventions, totals=LossTotals(total, 4.0, 6))
        losses.append(loss)
        metrics.append(m)
    return sum(losses), metrics


@pytest.mark.parametrize("name", ["steer", "steer_linear", "steer_first_order", "clip_cov", "kl_cov", "fork_tokens"])
def test_global_scope_matches_whole_batch(name: str) -> None:
    factories = {
        "steer": lambda scope: SteerReweighting(scope=scope),
        "steer_linear": lambda scope: SteerReweighting(mapping="linear", scope=scope),
        "steer_first_order": lambda scope: SteerReweighting(omega="first_order", scope=scope),
        "clip_cov": lambda scope: ClipCov(ratio=0.3, omega_low=-5, omega_high=5, seed=2, scope=scope),
        "kl_cov": lambda scope: KLCov(ratio=0.3, scope=scope),
        "fork_tokens": lambda scope: ForkTokens(0.3, scope=scope),
    }
    tokens = make_tokens("random", seed=15)
    whole, _ = policy_loss(tokens, ClipConfig(**BASE_CLIP), [factories[name]("microbatch")])
    global_split, _ = minibatch_loss(tokens, [factories[name]("global")], [(0, 2), (2, 4)])
    assert global_split.item() == pytest.approx(whole.item(), rel=1e-6)
    assert factories[name]("global").needs_minibatch_pass
    assert not factories[name]("microbatch").needs_minibatch_pass


def test_microbatch_scope_uses_each_microbatch_max() -> None:
    tokens = make_tokens("random", seed=16)
    steer = SteerReweighting()
    split, _ = minibatch_loss(tokens, [steer], [(0, 2), (2, 4)])
    expected = 0.0
    for start, end in ((0, 2), (2, 4)):
        part = as_lists(rows(tokens, start, end))
        weights = ref_steer_weights(part, part["advantages"], BASE_CLIP)
        for i, j in positions(part):
            loss = ref_ppo(part["logprobs"][i][j], part["old_logprobs"][i][j], part["advantages"][i][j], **BASE_CLIP)[0]
            expected += weights[(i, j)] * loss
    assert split.item() == pytest.approx(expected / tokens.mask.sum().item(), rel=1e-5)


def test_global_scope_errors_are_clear() -> None:
    tokens = make_tokens("random")
    ppo = ppo_token_loss(tokens.logprobs, tokens.old_logprobs, tokens.advantages, ClipConfig())
    with pytest.raises(RuntimeError, match="begin_minibatch"):
        ClipCov(scope="global").token_mask(tokens, ppo, {})
    clip_cov = ClipCov(scope="global")
    begin_minibatch(rows(tokens, 0, 2), ClipConfig(), [clip_cov])
    clip_cov.token_mask(rows(tokens, 0, 2), ppo, {})
    with pytest.raises(RuntimeError, match="consecutive row slices"):
        clip_cov.token_mask(rows(tokens, 2, 4), ppo, {})


def _distributed_worker(rank: int, world: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        tokens = make_tokens("random", seed=17)
        local = rows(tokens, 2 * rank, 2 * rank + 2)
        out = {}
        for name, factory in {
            "steer": lambda: SteerReweighting(scope="global"),
            "clip_cov": lambda: ClipCov(ratio=0.3, omega_low=-5, omega_high=5, seed=5, scope="global"),
            "kl_cov": lambda: KLCov(ratio=0.3, scope="global"),
            "fork_tokens": lambda: ForkTokens(0.3, scope="global"),
        }.items():
            intervention = factory()
            begin_minibatch(local, ClipConfig(**BASE_CLIP), [intervention])
            totals = LossTotals(tokens.mask.sum().item(), 4.0, 6)
            loss, _ = policy_loss(local, ClipConfig(**BASE_CLIP), [intervention], totals=totals)
            total = loss.detach().clone()
            dist.all_reduce(total)
            out[name] = total.item()
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_global_scope_across_two_ranks(tmp_path: Path) -> None:
    """Two gloo ranks, two rows each: the global selection equals the single-process one."""
    mp.spawn(_distributed_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    tokens = make_tokens("random", seed=17)
    expected = {
        "steer": SteerReweighting(),
        "clip_cov": ClipCov(ratio=0.3, omega_low=-5, omega_high=5, seed=5),
        "kl_cov": KLCov(ratio=0.3),
        "fork_tokens": ForkTokens(0.3),
    }
    for name, intervention in expected.items():
        whole, _ = policy_loss(tokens, ClipConfig(**BASE_CLIP), [intervention])
        assert results[0][name] == pytest.approx(whole.item(), rel=1e-6), name
        assert results[1][name] == pytest.approx(whole.item(), rel=1e-6), name


# ------------------------------------------------------------------------ controller state


def test_adaptive_entropy_bonus_controller_and_state() -> None:
    bonus = AdaptiveEntropyBonus(target_entropy=0.5, initial_coefficient=0.001, step=0.001, max_coefficient=0.0025)
    bonus.after_rl_step({"actor/entropy": 0.1})
    assert bonus.coefficient == pytest.approx(0.002)
    bonus.after_rl_step({"actor/entropy": 0.2})
    assert bonus.coefficient == pytest.approx(0.0025)  # clamped at the upper bound
    for _ in range(5):
        bonus.after_rl_step({"actor/entropy": 0.9})
    assert bonus.coefficient == 0.0  # clamped at the lower bound
    bonus.after_rl_step({"actor/entropy": 0.3})
    state = bonus.state_dict()
    resumed = AdaptiveEntropyBonus(target_entropy=0.5, step=0.001, max_coefficient=0.0025)
    resumed.load_state_dict(state)
    assert resumed.coefficient == bonus.coefficient == pytest.approx(0.001)
    tokens = make_tokens("random")
    metrics: dict = {}
    penalty = resumed.token_penalty(tokens, None, metrics)
    assert torch.allclose(penalty[tokens.mask], -0.001 * tokens.entropy[tokens.mask])
    assert metrics["intervention/entropy_bonus/coefficient"].item() == pytest.approx(0.001)
    with pytest.raises(KeyError, match="actor/entropy"):
        resumed.after_rl_step({})


# ------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: SteerReweighting(lambda_min=0.0), "lambda_min"),
        (lambda: SteerReweighting(lambda_min=1.2), "lambda_min"),
        (lambda: SteerReweighting(omega="exact"), "omega"),
        (lambda: SteerReweighting(mapping="cubic"), "mapping"),
        (lambda: SteerReweighting(w_min=1.3, w_max=1.2), "w_min"),
        (lambda: SteerReweighting(scope="node"), "scope"),
        (lambda: ClipHigher(low=-0.1), "low"),
        (lambda: ClipHigher(high=-0.2), "high"),
        (lambda: ClipHigher(low=1.5), "low"),
        (lambda: ClipCov(omega_low=5, omega_high=1), "omega_low"),
        (lambda: ClipCov(omega_low=2, omega_high=2), "omega_low"),
        (lambda: ClipCov(ratio=0.0), "ratio"),
        (lambda: KLCov(ratio=0.2 * 100), "ratio"),
        (lambda: KLCov(coefficient=-1), "coefficient"),
        (lambda: EntropyBonus(-0.1), "coefficient"),
        (lambda: AdaptiveEntropyBonus(min_coefficient=0.1, max_coefficient=0.01), "min_coefficient"),
        (lambda: AdaptiveEntropyBonus(initial_coefficient=1.0), "initial_coefficient"),
        (lambda: AdaptiveEntropyBonus(target_entropy=0.0), "target_entropy"),
        (lambda: ForkTokens(0.0), "top_fraction"),
        (lambda: EntropyAdvantage(kappa=0.0), "kappa"),
        (lambda: EntropyAdvantage(alpha=-1.0), "alpha"),
        (lambda: WReinforce(-0.1), "positive_weight"),
    ],
)
def test_bad_arguments_raise(factory, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


# ------------------------------------------------------------------------ presets


def load_preset(name: str) -> list[Intervention]:
    preset = OmegaConf.load(PRESETS / f"{name}.yaml")
    config = OmegaConf.merge(OmegaConf.create({"seed": 0}), {"intervention": preset})
    return [instantiate(node) for node in config.intervention.components.values()]


EXPECTED_PRESETS = {
    "grpo", "clip_higher", "entropy_bonus", "entropy_bonus_adaptive", "clip_cov", "kl_cov", "steer",
    "steer_linear", "fork_tokens", "entropy_adv", "w_reinforce", "grpo_extreme", "entropy_bonus_extreme",
    "clip_cov_extreme", "steer_extreme",
}


def test_every_required_preset_exists() -> None:
    assert EXPECTED_PRESETS <= {path.stem for path in PRESETS.glob("*.yaml")}


@pytest.mark.parametrize("path", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_preset_instantiates(path: Path) -> None:
    raw = OmegaConf.load(path)
    assert raw.name == path.stem
    interventions = load_preset(path.stem)
    assert all(isinstance(intervention, Intervention) for intervention in interventions)
    tokens = make_tokens("random")
    loss, metrics = policy_loss(tokens, ClipConfig(**BASE_CLIP), interventions)
    assert math.isfinite(loss.item())
    assert all("@" not in key and "(" not in key for key in metrics)


def test_preset_numbers() -> None:
    clip_higher, steer = load_preset("steer")
    assert (clip_higher.low, clip_higher.high) == (0.2, 0.28)
    assert (steer.lambda_min, steer.omega, steer.mapping, steer.scope) == (0.8, "released", "exponential", "microbatch")
    _, linear = load_preset("steer_linear")
    assert (linear.mapping, linear.w_min, linear.w_max) == ("linear", 0.8, 1.2)
    for name in ("grpo_extreme", "entropy_bonus_extreme", "clip_cov_extreme", "steer_extreme"):
        extreme = load_preset(name)[0]
        assert (extreme.low, extreme.high) == (0.99, 5.0), name
    (clip_cov,) = load_preset("clip_cov")
    assert (clip_cov.ratio, clip_cov.omega_low, clip_cov.omega_high) == (2e-4, 1.0, 5.0)
    (kl_cov,) = load_preset("kl_cov")
    assert (kl_cov.ratio, kl_cov.coefficient) == (2e-3, 1.0)
    (fork,) = load_preset("fork_tokens")
    assert fork.top_fraction == 0.2
    (shaping,) = load_preset("entropy_adv")
    assert (shaping.alpha, shaping.kappa) == (0.4, 2.0)
    (weighting,) = load_preset("w_reinforce")
    assert weighting.positive_weight == 0.1
    assert load_preset("grpo") == []


def test_clip_cov_preset_seed_follows_the_run_seed() -> None:
    preset = OmegaConf.load(PRESETS / "clip_cov.yaml")
    config = OmegaConf.merge(OmegaConf.create({"seed": 123}), {"intervention": preset})
    assert config.intervention.components.clip_cov.seed == 123
