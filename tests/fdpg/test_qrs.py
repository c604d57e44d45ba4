"""Quasi-rejection sampling on the exact toy: accepted samples follow min(P, beta q) / Z_beta."""

from __future__ import annotations

import math

import pytest
import torch
from distalign_testing.toy import TabularPolicy, ToySpace, ToyTarget
from scipy.stats import chisquare

from distalign.targets.qrs import (
    log_beta_for_acceptance_rate,
    qrs_acceptance_probabilities,
    qrs_diagnostics,
    qrs_sample,
)

SPACE = ToySpace(num_symbols=3, max_length=3)


def setup():
    base = TabularPolicy.random(SPACE, seed=11)
    target = ToyTarget(base.log_probs().detach() + 0.7 * SPACE.count("a"))
    noise = TabularPolicy.random(SPACE, seed=12, scale=0.5).logits.detach()
    proposal = TabularPolicy(SPACE, base.logits.detach() + noise)  # near the base model, as in practice
    return target, proposal


def proposer(target: ToyTarget, proposal: TabularPolicy, generator: torch.Generator):
    log_q = proposal.log_probs().detach()

    def propose(n: int):
        index = proposal.sample(n, generator)
        return index.tolist(), target.log_unnormalized[index], log_q[index]

    return propose


def chi_square_p_value(samples: list[int], probabilities: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(samples), minlength=len(SPACE)).double()
    expected = probabilities * counts.sum()
    return float(chisquare(counts.numpy(), expected.numpy()).pvalue)


def test_hand_acceptance_probabilities():
    probabilities = qrs_acceptance_probabilities(
        torch.log(torch.tensor([1.0, 4.0, 0.0])), torch.zeros(3), math.log(2.0)
    )
    assert probabilities.tolist() == [0.5, 1.0, 0.0]


def test_large_beta_samples_the_exact_target():
    target, proposal = setup()
    log_ratio = target.log_unnormalized - proposal.log_probs().detach()
    generator = torch.Generator().manual_seed(0)
    result = qrs_sample(
        proposer(target, proposal, generator),
        log_beta=log_ratio.max().item(),
        num_samples=6000,
        batch_size=2000,
        generator=generator,
    )
    assert len(result.samples) == 6000
    assert chi_square_p_value(result.samples, target.p) > 1e-3
    exact_rate = math.exp(target.log_z.item() - log_ratio.max().item())  # Z / beta
    stderr = math.sqrt(exact_rate * (1 - exact_rate) / result.num_proposals)
    assert abs(result.acceptance_rate - exact_rate) < 4 * stderr


def test_small_beta_samples_the_capped_distribution_not_the_target():
    target, proposal = setup()
    log_q = proposal.log_probs().detach()
    log_beta = torch.quantile(target.log_unnormalized - log_q, 0.5).item()
    capped = torch.softmax(torch.minimum(target.log_unnormalized, log_beta + log_q), dim=0)
    generator = torch.Generator().manual_seed(1)
    result = qrs_sample(
        proposer(target, proposal, generator), log_beta=log_beta, num_samples=6000, generator=generator
    )
    assert chi_square_p_value(result.samples, capped) > 1e-3
    assert chi_square_p_value(result.samples, target.p) < 1e-6
    exact_rate = (
        (log_q.exp() * qrs_acceptance_probabilities(target.log_unnormalized, log_q, log_beta)).sum().item()
    )
    assert result.acceptance_rate == pytest.approx(
        exact_rate, abs=4 * math.sqrt(exact_rate / result.num_proposals)
    )


def test_max_proposals_stops_early():
    target, proposal = setup()
    generator = torch.Generator().manual_seed(2)
    result = qrs_sample(
        proposer(target, proposal, generator),
        log_beta=50.0,
        num_samples=100,
        batch_size=64,
        max_proposals=200,
        generator=generator,
    )
    assert result.num_proposals == 200 and len(result.samples) < 100


def test_diagnostics_match_exact_rate_and_tv():
    target, proposal = setup()
    log_q = proposal.log_probs().detach()
    log_ratio = target.log_unnormalized - log_q
    log_betas = torch.tensor(
        [log_ratio.min().item() - 1, log_ratio.median().item(), log_ratio.max().item() + 0.1]
    )
    q, p = log_q.exp(), target.p
    exact_rate, exact_tv = [], []
    for log_beta in log_betas.tolist():
        capped = torch.minimum(target.log_unnormalized, log_beta + log_q)
        exact_rate.append((q * torch.exp(capped - log_beta - log_q)).sum().item())
        exact_tv.append(0.5 * (torch.softmax(capped, 0) - p).abs().sum().item())
    index = proposal.sample(100_000, torch.Generator().manual_seed(3))
    diagnostics = qrs_diagnostics(target.log_unnormalized[index], log_q[index], log_betas)
    torch.testing.assert_close(
        diagnostics["acceptance_rate"], torch.tensor(exact_rate, dtype=torch.float64), atol=0.01, rtol=0
    )
    torch.testing.assert_close(
        diagnostics["tv_to_target"], torch.tensor(exact_tv, dtype=torch.float64), atol=0.01, rtol=0
    )
    assert diagnostics["acceptance_rate"][0] == 1.0  # beta below every ratio: always accept, p_beta = q
    assert diagnostics["tv_to_target"][-1] == pytest.approx(0.0, abs=1e-12)  # beta above every ratio
    assert (diagnostics["acceptance_rate"].diff() < 0).all() and (
        diagnostics["tv_to_target"].diff() < 0
    ).all()


def test_log_beta_for_a_requested_acceptance_rate():
    target, proposal = setup()
    index = proposal.sample(5000, torch.Generator().manual_seed(4))
    log_p, log_q = target.log_unnormalized[index], proposal.log_probs().detach()[index]
    for rate in (0.9, 0.5, 0.05):
        log_beta = log_beta_for_acceptance_rate(log_p, log_q, rate)
        achieved = qrs_diagnostics(log_p, log_q, [log_beta])["acceptance_rate"].item()
        assert achieved == pytest.approx(rate, abs=1e-6)
