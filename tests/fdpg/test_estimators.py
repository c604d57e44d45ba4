"""log Z, baselines, importance weights and monitors against hand values and the exact toy."""

from __future__ import annotations

import math

import pytest
import torch
from distalign_testing.toy import TabularPolicy, ToySpace, ToyTarget

from distalign.losses.fdivergence import f_divergence
from distalign.targets.estimators import (
    LogZEstimator,
    ProposalRefreshRule,
    WindowedMeanBaseline,
    clipped_importance_weights,
    effective_sample_size,
    estimate_alignment,
    estimate_divergence,
    estimate_kl_to_base,
    estimate_policy_moments,
    importance_weighted_mean,
    leave_one_out_baseline,
)

SPACE = ToySpace(num_symbols=3, max_length=3)


def toy_setup():
    base = TabularPolicy.random(SPACE, seed=1)
    target = ToyTarget(base.log_probs().detach() + 0.8 * SPACE.count("a"))
    policy = TabularPolicy.random(SPACE, seed=2, scale=0.7)
    proposal = TabularPolicy.random(SPACE, seed=3, scale=0.5)
    return base, target, policy, proposal


def test_effective_sample_size_hand_values():
    assert effective_sample_size(torch.zeros(10)) == pytest.approx(10.0)
    assert effective_sample_size(torch.log(torch.tensor([1.0, 1.0, 2.0]))) == pytest.approx(16 / 6)
    assert effective_sample_size(torch.tensor([0.0, -1000.0, -1000.0])) == pytest.approx(1.0)
    assert effective_sample_size(torch.full((3,), -math.inf)) == 0.0


def test_log_z_estimate_converges_across_changing_proposals():
    """Weights P/q from two different proposals pool into one unbiased running estimate."""
    _, target, policy, proposal = toy_setup()
    estimator = LogZEstimator()
    generator = torch.Generator().manual_seed(0)
    for q in (policy, proposal):
        for _ in range(10):
            index = q.sample(2000, generator)
            estimator.update(target.log_unnormalized[index], q.log_probs().detach()[index])
    error = abs(estimator.log_z() - target.log_z.item())
    assert estimator.num_samples() == 40_000
    assert error < 4 * math.sqrt(estimator.log_z_variance()) and error < 0.02
    assert 1 < estimator.ess() < 40_000


def test_log_z_variance_matches_spread_over_repetitions():
    _, target, policy, _ = toy_setup()
    generator = torch.Generator().manual_seed(1)
    estimates, variances = [], []
    for _ in range(200):
        estimator = LogZEstimator()
        index = policy.sample(200, generator)
        estimator.update(target.log_unnormalized[index], policy.log_probs().detach()[index])
        estimates.append(estimator.log_z())
        variances.append(estimator.log_z_variance())
    empirical = torch.tensor(estimates).var().item()
    assert empirical == pytest.approx(sum(variances) / len(variances), rel=0.3)


def test_per_context_log_z():
    """A conditional target: each context keeps its own Z_c."""
    _, target, policy, _ = toy_setup()
    shifted = target.log_unnormalized - 2.0  # context "b" has Z_b = Z_a * e^-2
    estimator = LogZEstimator()
    index = policy.sample(30_000, torch.Generator().manual_seed(2))
    half = len(index) // 2
    log_q = policy.log_probs().detach()[index]
    log_target = torch.cat([target.log_unnormalized[index[:half]], shifted[index[half:]]])
    estimator.update(log_target, log_q, ["a"] * half + ["b"] * half)
    assert estimator.log_z("a") == pytest.approx(target.log_z.item(), abs=0.03)
    assert estimator.log_z("b") - estimator.log_z("a") == pytest.approx(-2.0, abs=0.05)
    assert estimator.log_z_for(["b", "a"]).tolist() == [estimator.log_z("b"), estimator.log_z("a")]
    restored = LogZEstimator()
    restored.load_state_dict(estimator.state_dict())
    assert restored.log_z("b") == estimator.log_z("b")
    with pytest.raises(KeyError):
        estimator.log_z("c")


def test_leave_one_out_baseline_hand_values():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 7.0], dtype=torch.float64)
    context = torch.tensor([5, 5, 5, 9, 9, 2])
    expected = [2.5, 2.0, 1.5, 20.0, 10.0, 0.0]
    assert leave_one_out_baseline(rewards, context).tolist() == expected


def test_windowed_mean_baseline():
    baseline = WindowedMeanBaseline(window=3)
    assert baseline.value() == 0.0
    baseline.update(torch.tensor([1.0, 2.0]))
    assert baseline.value() == pytest.approx(1.5)
    baseline.update(torch.tensor([3.0, 10.0]))
    assert baseline.value() == pytest.approx(5.0)  # last three: 2, 3, 10


def test_clipped_importance_weights_and_ess():
    policy = torch.log(torch.tensor([0.5, 0.2, 0.2, 0.1]))
    proposal = torch.log(torch.tensor([0.1, 0.2, 0.4, 0.3]))
    result = clipped_importance_weights(policy, proposal, max_weight=2.0)
    raw = torch.tensor([5.0, 1.0, 0.5, 1 / 3], dtype=torch.float64)
    torch.testing.assert_close(result.weights, raw.clamp(max=2.0))
    assert result.clipped_fraction == 0.25
    assert result.ess == pytest.approx((raw.sum() ** 2 / (raw**2).sum()).item())
    assert result.ess_fraction == pytest.approx(result.ess / 4)
    unclipped = clipped_importance_weights(policy, proposal)
    torch.testing.assert_close(unclipped.weights, raw)
    on_policy = clipped_importance_weights(policy, policy, max_weight=2.0)
    assert on_policy.weights.tolist() == [1.0] * 4 and on_policy.ess_fraction == pytest.approx(1.0)


def test_clipped_weights_trade_bias_for_variance():
    """Clipped off-policy means are biased towards q; a clip above every ratio changes nothing."""
    _, _, policy, proposal = toy_setup()
    log_pi, log_q = policy.log_probs().detach(), proposal.log_probs().detach()
    values = SPACE.count("a")
    exact_pi, exact_q = (log_pi.exp() @ values).item(), (log_q.exp() @ values).item()
    index = proposal.sample(50_000, torch.Generator().manual_seed(3))
    max_ratio = torch.exp(log_pi - log_q).max().item()
    full = clipped_importance_weights(log_pi[index], log_q[index], max_weight=max_ratio + 1)
    clipped = clipped_importance_weights(log_pi[index], log_q[index], max_weight=1.0)
    unbiased = (full.weights * values[index]).mean().item()
    biased = (clipped.weights * values[index]).sum().item() / clipped.weights.sum().item()
    assert unbiased == pytest.approx(exact_pi, abs=0.03)
    assert abs(biased - exact_pi) > 0.05 and abs(biased - exact_q) < abs(exact_pi - exact_q)
    assert clipped.weights.var() < full.weights.var()


NAMES = ["forward_kl", "reverse_kl", "total_variation", "jensen_shannon"]


@pytest.mark.parametrize("name", NAMES)
def test_divergence_monitor_with_known_log_z(name):
    _, target, policy, proposal = toy_setup()
    exact = f_divergence(name, policy.log_probs().detach(), target.log_p).item()
    index = proposal.sample(20_000, torch.Generator().manual_seed(4))
    log_q = proposal.log_probs().detach()[index]
    estimate = estimate_divergence(
        name, policy.log_probs().detach()[index], target.log_unnormalized[index], log_q, log_z=target.log_z
    )
    assert abs(estimate.value - exact) < 4 * estimate.stderr
    assert estimate.ci_low < estimate.value < estimate.ci_high and estimate.num_samples == 20_000


@pytest.mark.parametrize("name", NAMES)
def test_self_normalised_divergence_bootstrap_coverage(name):
    """Z estimated from the same samples: the 90% bootstrap interval covers the exact value ~90% of runs."""
    _, target, policy, proposal = toy_setup()
    exact = f_divergence(name, policy.log_probs().detach(), target.log_p).item()
    log_pi, log_q = policy.log_probs().detach(), proposal.log_probs().detach()
    generator = torch.Generator().manual_seed(5)
    covered = 0
    for _ in range(40):
        index = proposal.sample(500, generator)
        estimate = estimate_divergence(
            name,
            log_pi[index],
            target.log_unnormalized[index],
            log_q[index],
            confidence=0.9,
            num_bootstrap=200,
            generator=generator,
        )
        covered += estimate.ci_low <= exact <= estimate.ci_high
    # Nominal 90%; a percentile bootstrap of a ratio estimator under-covers a little (~86% here).
    assert covered >= 28


def test_self_normalised_divergence_per_context():
    """Two contexts with different Z_c and the same p: the per-context estimate matches exact D_f."""
    _, target, policy, _ = toy_setup()
    exact = f_divergence("jensen_shannon", policy.log_probs().detach(), target.log_p).item()
    index = policy.sample(20_000, torch.Generator().manual_seed(6))
    context = torch.arange(20_000) % 2
    log_target = target.log_unnormalized[index] + 5.0 * context  # context 1: Z scaled by e^5
    log_pi = policy.log_probs().detach()[index]
    per_context = estimate_divergence("jensen_shannon", log_pi, log_target, log_pi, context_index=context)
    pooled = estimate_divergence("jensen_shannon", log_pi, log_target, log_pi)
    assert per_context.value == pytest.approx(exact, abs=4 * per_context.stderr)
    assert abs(pooled.value - exact) > 10 * per_context.stderr  # ignoring contexts is wrong


def test_policy_expectations_on_and_off_policy():
    base, target, policy, proposal = toy_setup()
    log_a, log_pi, log_q = (m.log_probs().detach() for m in (base, policy, proposal))
    features = torch.stack([SPACE.count("a"), SPACE.lengths()], dim=1)
    exact_moments = log_pi.exp() @ features
    exact_kl = (log_pi.exp() * (log_pi - log_a)).sum().item()
    satisfied = (SPACE.count("b") > 0).double()
    exact_alignment = (log_pi.exp() @ satisfied).item()
    generator = torch.Generator().manual_seed(7)
    on = policy.sample(20_000, generator)
    off = proposal.sample(20_000, generator)
    for index, args in ((on, ()), (off, (log_pi[off], log_q[off]))):
        moments = estimate_policy_moments(features[index], *args)
        for estimate, exact in zip(moments, exact_moments.tolist()):
            assert abs(estimate.value - exact) < 4 * estimate.stderr
        kl = estimate_kl_to_base(log_pi[index], log_a[index], *(args[1:] if args else ()))
        assert abs(kl.value - exact_kl) < 4 * kl.stderr
        alignment = estimate_alignment(satisfied[index], *args)
        assert abs(alignment.value - exact_alignment) < 4 * alignment.stderr
    on_policy_mean = importance_weighted_mean(features[on, 0])
    assert on_policy_mean.ess == pytest.approx(20_000)
    assert on_policy_mean.stderr == pytest.approx(features[on, 0].std().item() / math.sqrt(20_000), rel=1e-6)
    with pytest.raises(ValueError, match="both"):
        importance_weighted_mean(features[on, 0], log_pi[on])


def test_proposal_refresh_rule():
    rule = ProposalRefreshRule(min_ess_fraction=0.2)
    assert rule.should_refresh(0.5, 0.8, ess_fraction=0.9) == (True, "closer_to_target")
    assert rule.should_refresh(0.9, 0.8, ess_fraction=0.1) == (True, "ess_collapsed")
    assert rule.should_refresh(0.9, 0.8, ess_fraction=0.5) == (False, "")


def test_refresh_rule_on_toy_estimates():
    """A policy at the target is estimated closer than a base-model proposal: refresh."""
    base, target, _, _ = toy_setup()
    log_a = base.log_probs().detach()
    index = base.sample(5000, torch.Generator().manual_seed(8))
    log_q = log_a[index]
    good = target.log_p[index]  # pi = p exactly
    d_pi = estimate_divergence("forward_kl", good, target.log_unnormalized[index], log_q, log_z=target.log_z)
    d_q = estimate_divergence("forward_kl", log_q, target.log_unnormalized[index], log_q, log_z=target.log_z)
    weights = clipped_importance_weights(good, log_q)
    assert d_pi.value == pytest.approx(0.0, abs=1e-12)
    assert ProposalRefreshRule().should_refresh(d_pi.value, d_q.value, weights.ess_fraction) == (
        True,
        "closer_to_target",
    )
