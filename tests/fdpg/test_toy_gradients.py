"""On the exact toy: the f-DPG REINFORCE estimator is unbiased for grad D_f, and training lowers D_f.

The exact gradient is autograd through the *textbook* D_f of the enumerated distributions
(distalign_testing.toy.reference_f_divergence), independent of the log-space code under test.
Monte Carlo tolerance: every coordinate within 5 standard errors (computed from the same samples; a
false alarm has probability ~1e-6 per coordinate) - and the same seed gives the same samples.
"""

from __future__ import annotations

import pytest
import torch
from distalign_testing.toy import TabularPolicy, ToySpace, ToyTarget, reference_f_divergence

from distalign.losses.fdivergence import f_divergence, fdpg_policy_gradient_loss, fdpg_pseudo_rewards
from distalign.targets.estimators import LogZEstimator, leave_one_out_baseline

CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("total_variation", {}),
    ("jensen_shannon", {}),
    ("pearson_chi2", {}),
    ("neyman_chi2", {}),
    ("alpha", {"alpha": 0.5}),
    ("alpha", {"alpha": -0.5}),
]
IDS = [f"{n}{p.get('alpha', '')}" for n, p in CASES]

SPACE = ToySpace(num_symbols=3, max_length=3)


def tilted_target(base: TabularPolicy, tilt: float = 0.8) -> ToyTarget:
    """P = a * exp(tilt * #a): full support, so every D_f is finite."""
    return ToyTarget(base.log_probs().detach() + tilt * SPACE.count("a"))


def constrained_target(base: TabularPolicy) -> ToyTarget:
    """P = a * 1[x contains "a"] (GDC pointwise constraint)."""
    return ToyTarget(base.log_probs().detach() + torch.log((SPACE.count("a") > 0).double()))


def reference_divergence(name, params, policy: TabularPolicy, target: ToyTarget) -> torch.Tensor:
    return reference_f_divergence(name, policy.log_probs().exp(), target.p, params.get("alpha"))


def exact_gradient(name, params, policy, target) -> torch.Tensor:
    policy.zero_grad()
    reference_divergence(name, params, policy, target).backward()
    return policy.logits.grad.detach().clone().flatten()


def _jacobian(policy: TabularPolicy) -> torch.Tensor:
    """J[x] = grad log pi(x) for every sequence: [S, num_params]."""
    jac = torch.autograd.functional.jacobian(policy.log_probs_of, policy.logits.detach())
    return jac.reshape(len(SPACE), -1)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_estimator_expectation_equals_exact_gradient(name, params):
    """sum_x q(x) w(x) (-R(x)) grad log pi(x) == grad D_f, on-policy and off-policy (q = a)."""
    base, policy = TabularPolicy.random(SPACE, seed=1), TabularPolicy.random(SPACE, seed=2)
    target = tilted_target(base)
    expected = exact_gradient(name, params, policy, target)
    log_pi = policy.log_probs().detach()
    rewards = fdpg_pseudo_rewards(log_pi, target.log_unnormalized, target.log_z, name, **params)
    jac = _jacobian(policy)
    on_policy = -(log_pi.exp() * rewards) @ jac
    torch.testing.assert_close(on_policy, expected, rtol=1e-8, atol=1e-10)
    constant = 0.37  # any constant baseline leaves the expectation unchanged
    torch.testing.assert_close(-(log_pi.exp() * (rewards - constant)) @ jac, expected, rtol=1e-8, atol=1e-10)
    proposal = base.log_probs().detach()
    weights = torch.exp(log_pi - proposal)
    off_policy = -(proposal.exp() * weights * rewards) @ jac
    torch.testing.assert_close(off_policy, expected, rtol=1e-8, atol=1e-10)


def _mc_gradient(policy, target, name, params, index, baseline: str, group_size: int):
    """Gradient of the library surrogate on samples ``index``, and its per-group contributions."""
    policy.zero_grad()
    logps = policy.log_probs()[index]
    rewards = fdpg_pseudo_rewards(logps, target.log_unnormalized[index], target.log_z, name, **params)
    groups = torch.arange(len(index)) // group_size
    if baseline == "none":
        advantages = rewards
    elif baseline == "constant":
        advantages = rewards - 0.5
    else:
        advantages = rewards - leave_one_out_baseline(rewards, groups)
    fdpg_policy_gradient_loss(logps, advantages).loss.backward()
    contributions = -advantages[:, None] * _jacobian(policy)[index]  # per-sample gradient of -A log pi
    per_group = torch.zeros(int(groups.max()) + 1, contributions.shape[1], dtype=torch.float64)
    per_group = per_group.index_add(0, groups, contributions) / group_size
    return policy.logits.grad.flatten().clone(), per_group


@pytest.mark.parametrize("baseline", ["none", "constant", "leave_one_out"])
@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_monte_carlo_gradient_is_unbiased(name, params, baseline):
    base, policy = TabularPolicy.random(SPACE, seed=3), TabularPolicy.random(SPACE, seed=4, scale=0.7)
    target = tilted_target(base)
    expected = exact_gradient(name, params, policy, target)
    generator = torch.Generator().manual_seed(5)
    index = policy.sample(40_000, generator)
    estimate, per_group = _mc_gradient(policy, target, name, params, index, baseline, group_size=8)
    torch.testing.assert_close(estimate, per_group.mean(0), rtol=1e-9, atol=1e-12)  # same estimator, two ways
    stderr = per_group.std(0) / per_group.shape[0] ** 0.5
    assert ((estimate - expected).abs() <= 5 * stderr + 1e-9).all(), (estimate - expected).abs() / stderr


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_training_with_the_estimator_lowers_the_exact_divergence(name, params):
    """pi <- a, target a * exp(0.8 #a); Adam on the MC surrogate with a running log Z and LOO baseline."""
    base = TabularPolicy.random(SPACE, seed=6)
    target = tilted_target(base)
    policy = TabularPolicy(SPACE, base.logits.detach())
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.05)
    log_z = LogZEstimator()
    generator = torch.Generator().manual_seed(7)

    def exact() -> float:
        return f_divergence(name, policy.log_probs().detach(), target.log_p, **params).item()

    initial = exact()
    for _ in range(150):
        index = policy.sample(64, generator)
        logps = policy.log_probs()[index]
        log_z.update(target.log_unnormalized[index], logps.detach())  # on-policy: q = pi
        rewards = fdpg_pseudo_rewards(logps, target.log_unnormalized[index], log_z.log_z(), name, **params)
        advantages = rewards - leave_one_out_baseline(rewards, torch.zeros(64, dtype=torch.long))
        optimizer.zero_grad()
        fdpg_policy_gradient_loss(logps, advantages).loss.backward()
        optimizer.step()
    assert exact() < 0.2 * initial, (initial, exact())


@pytest.mark.parametrize("name", ["forward_kl", "total_variation", "jensen_shannon", "pearson_chi2"])
def test_training_towards_a_pointwise_constraint(name):
    """Divergences that stay finite when pi has mass outside p's support also learn b(x) = 1[#a > 0]."""
    base = TabularPolicy.random(SPACE, seed=8)
    target = constrained_target(base)
    policy = TabularPolicy(SPACE, base.logits.detach())
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.05)
    log_z = LogZEstimator()
    generator = torch.Generator().manual_seed(9)
    satisfied = SPACE.count("a") > 0

    def exact() -> float:
        return f_divergence(name, policy.log_probs().detach(), target.log_p).item()

    initial, initial_alignment = exact(), policy.log_probs().exp()[satisfied].sum().item()
    for _ in range(150):
        index = policy.sample(64, generator)
        logps = policy.log_probs()[index]
        log_z.update(target.log_unnormalized[index], logps.detach())
        rewards = fdpg_pseudo_rewards(logps, target.log_unnormalized[index], log_z.log_z(), name)
        advantages = rewards - leave_one_out_baseline(rewards, torch.zeros(64, dtype=torch.long))
        optimizer.zero_grad()
        fdpg_policy_gradient_loss(logps, advantages).loss.backward()
        optimizer.step()
    assert exact() < 0.2 * initial, (initial, exact())
    assert policy.log_probs().exp()[satisfied].sum().item() > initial_alignment
