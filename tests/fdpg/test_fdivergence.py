"""f-divergence generators and pseudo-rewards: hand-derived values, derivatives, limits, numerics."""

from __future__ import annotations

import math

import pytest
import torch
from distalign_testing.toy import reference_f_divergence
from hypothesis import given, settings
from hypothesis import strategies as st

from distalign.losses.fdivergence import (
    F_DIVERGENCES,
    f_divergence,
    f_perspective,
    f_value,
    fdpg_policy_gradient_loss,
    fdpg_pseudo_rewards,
    pseudo_reward,
)
from distalign.registry import UnknownNameError

# (name, params): every registered generator, the alpha family at several orders.
CASES = [(name, {}) for name in F_DIVERGENCES.names() if name != "alpha"] + [
    ("alpha", {"alpha": a}) for a in (-1.0, 0.0, 0.3, 0.5, 1.0, 2.0, 3.5)
]
IDS = [f"{n}{p.get('alpha', '')}" for n, p in CASES]


def hand_f(name: str, t: float, alpha: float | None = None) -> float:
    """f(t) written in t, straight from the table in fdpg.md / the module docstring."""
    if name == "forward_kl":
        return -math.log(t)
    if name == "reverse_kl":
        return t * math.log(t)
    if name == "total_variation":
        return 0.5 * abs(t - 1)
    if name == "jensen_shannon":
        return t * math.log(2 * t / (1 + t)) + math.log(2 / (1 + t))
    if name == "pearson_chi2":
        return (1 - t) ** 2 / t
    if name == "neyman_chi2":
        return (t - 1) ** 2
    if alpha == 0:
        return t - 1 - math.log(t)
    if alpha == 1:
        return t * math.log(t) - t + 1
    return (t**alpha - alpha * t - (1 - alpha)) / (alpha * (alpha - 1))


def hand_reward(name: str, t: float, alpha: float | None = None) -> float:
    """-f'(t) derived by hand in t."""
    if name == "forward_kl":
        return 1 / t
    if name == "reverse_kl":
        return -(math.log(t) + 1)
    if name == "total_variation":
        return -0.5 * (1 if t > 1 else -1 if t < 1 else 0)
    if name == "jensen_shannon":
        return -math.log(2 * t / (1 + t))
    if name == "pearson_chi2":
        return 1 / t**2 - 1
    if name == "neyman_chi2":
        return -2 * (t - 1)
    if alpha == 1:
        return -math.log(t)
    return -(t ** (alpha - 1) - 1) / (alpha - 1)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_values_match_hand_formulas(name, params):
    log_ratios = torch.tensor([-3.0, -0.7, -1e-3, 0.0, 1e-3, 0.4, 2.5], dtype=torch.float64)
    alpha = params.get("alpha")
    expected_f = torch.tensor(
        [hand_f(name, math.exp(v), alpha) for v in log_ratios.tolist()], dtype=torch.float64
    )
    expected_r = torch.tensor(
        [hand_reward(name, math.exp(v), alpha) for v in log_ratios.tolist()], dtype=torch.float64
    )
    torch.testing.assert_close(f_value(name, log_ratios, **params), expected_f, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pseudo_reward(name, log_ratios, **params), expected_r, rtol=1e-9, atol=1e-12)
    assert f_value(name, torch.zeros(1, dtype=torch.float64), **params).item() == 0.0  # f(1) = 0


@settings(max_examples=40, deadline=None)
@given(log_ratio=st.floats(-15, 15), case=st.sampled_from(CASES))
def test_pseudo_reward_is_minus_derivative_of_f(log_ratio, case):
    """-f'(t) = -(df/dl) / t with df/dl from autograd through the log-space f."""
    name, params = case
    log_r = torch.tensor([log_ratio], dtype=torch.float64, requires_grad=True)
    (df_dl,) = torch.autograd.grad(f_value(name, log_r, **params).sum(), log_r)
    expected = -df_dl / torch.exp(log_r.detach())
    if name == "total_variation" and abs(log_ratio) < 1e-12:
        return  # kink at t = 1: any subgradient is valid
    torch.testing.assert_close(pseudo_reward(name, log_r.detach(), **params), expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_gradcheck_float64(name, params):
    log_r = torch.tensor([-2.3, -0.4, 0.3, 1.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: f_value(name, x, **params), (log_r,))
    if name != "total_variation":  # piecewise constant
        assert torch.autograd.gradcheck(lambda x: pseudo_reward(name, x, **params), (log_r,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_extreme_log_ratios_never_nan(name, params, dtype):
    log_r = torch.tensor([-math.inf, -1e4, -50.0, 0.0, 50.0, 1e4, math.inf], dtype=dtype)
    for fn in (f_value, pseudo_reward):
        out = fn(name, log_r, **params)
        assert not torch.isnan(out).any(), (fn.__name__, out)
        assert out.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_where_the_true_value_is(dtype):
    log_r = torch.tensor([-1e4, -80.0, 80.0, 1e4], dtype=dtype)
    assert torch.isfinite(pseudo_reward("jensen_shannon", log_r)).all()  # bounded by log 2 above, |l| below
    assert torch.isfinite(pseudo_reward("total_variation", log_r)).all()
    assert torch.isfinite(pseudo_reward("reverse_kl", log_r)).all()
    torch.testing.assert_close(f_value("forward_kl", log_r), -log_r)
    low = torch.tensor([-1e4], dtype=dtype)
    # f(0+) limits: JS log 2, TV 1/2, Neyman 1, reverse KL 0, alpha 1/alpha.
    limits = [
        ("jensen_shannon", {}, math.log(2)),
        ("total_variation", {}, 0.5),
        ("neyman_chi2", {}, 1.0),
        ("reverse_kl", {}, 0.0),
        ("alpha", {"alpha": 0.5}, 2.0),
        ("alpha", {"alpha": 2.0}, 0.5),
    ]
    for name, params, limit in limits:
        assert f_value(name, low, **params).item() == pytest.approx(limit, abs=1e-6), name
    assert pseudo_reward("pearson_chi2", torch.tensor([1e4], dtype=dtype)).item() == -1.0
    assert pseudo_reward("forward_kl", torch.tensor([-1e4], dtype=dtype)).item() == math.inf  # true value


def test_alpha_family_recovers_named_divergences():
    log_r = torch.linspace(-4, 4, 17, dtype=torch.float64)
    t = torch.exp(log_r)
    torch.testing.assert_close(f_value("alpha", log_r, alpha=0.5), 2 * (t.sqrt() - 1) ** 2)
    torch.testing.assert_close(f_value("alpha", log_r, alpha=2.0), f_value("neyman_chi2", log_r) / 2)
    torch.testing.assert_close(f_value("alpha", log_r, alpha=-1.0), f_value("pearson_chi2", log_r) / 2)
    for eps in (1e-5, -1e-5):  # continuity at the KL limits; pseudo-rewards differ by the constant 1
        torch.testing.assert_close(
            f_value("alpha", log_r, alpha=1 + eps), f_value("alpha", log_r, alpha=1.0), rtol=1e-3, atol=1e-4
        )
        torch.testing.assert_close(
            f_value("alpha", log_r, alpha=eps), f_value("alpha", log_r, alpha=0.0), rtol=1e-3, atol=1e-4
        )
        torch.testing.assert_close(
            pseudo_reward("alpha", log_r, alpha=1 + eps),
            pseudo_reward("reverse_kl", log_r) + 1,
            rtol=1e-3,
            atol=1e-3,
        )
        torch.testing.assert_close(
            pseudo_reward("alpha", log_r, alpha=eps),
            pseudo_reward("forward_kl", log_r) - 1,
            rtol=1e-3,
            atol=1e-3,
        )


def _random_distribution(seed: int, size: int, zeros: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(size, generator=g, dtype=torch.float64)
    logits[:zeros] = -math.inf
    return torch.log_softmax(logits, dim=0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), case=st.sampled_from(CASES))
def test_exact_divergence_matches_textbook_formula(seed, case):
    name, params = case
    log_pi, log_p = _random_distribution(seed, 12), _random_distribution(seed + 1, 12)
    ours = f_divergence(name, log_pi, log_p, **params)
    if name == "alpha" and params["alpha"] in (0.0, 1.0):
        reference = reference_f_divergence(
            "forward_kl" if params["alpha"] == 0 else "reverse_kl", log_pi.exp(), log_p.exp()
        )
    else:
        reference = reference_f_divergence(name, log_pi.exp(), log_p.exp(), params.get("alpha"))
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-12)
    assert ours > 0
    assert abs(f_divergence(name, log_p, log_p, **params).item()) < 1e-12


def test_perspective_limits_at_disjoint_support():
    log_pi = _random_distribution(0, 6)  # full support
    log_p = _random_distribution(1, 6, zeros=2)  # p = 0 on two outcomes
    pi, p = log_pi.exp(), log_p.exp()
    assert f_divergence("forward_kl", log_pi, log_p).item() == pytest.approx(
        reference_f_divergence("forward_kl", pi, p).item()
    )
    assert f_divergence("reverse_kl", log_pi, log_p).item() == math.inf  # pi has mass where p has none
    assert f_divergence("neyman_chi2", log_pi, log_p).item() == math.inf
    for name in ("total_variation", "jensen_shannon", "pearson_chi2"):
        assert f_divergence(name, log_pi, log_p).item() == pytest.approx(
            reference_f_divergence(name, pi, p).item()
        )
    assert f_divergence("forward_kl", log_p, log_pi).item() == math.inf  # swapped: policy misses target mass
    both_zero = torch.tensor([-math.inf]), torch.tensor([-math.inf])
    for name, params in CASES:
        assert f_perspective(name, *both_zero, **params).item() == 0.0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), shift=st.floats(-300, 300), case=st.sampled_from(CASES))
def test_perspective_is_one_homogeneous(seed, shift, case):
    """q-scaled inputs give the importance-sampling integrand: g(pi/q, p/q) = g(pi, p) / q."""
    name, params = case
    log_pi, log_p = _random_distribution(seed, 8), _random_distribution(seed + 7, 8)
    scaled = f_perspective(name, log_pi - shift, log_p - shift, **params)
    torch.testing.assert_close(
        scaled, f_perspective(name, log_pi, log_p, **params) * math.exp(-shift), rtol=1e-9, atol=0.0
    )


def test_registry_errors_name_valid_choices():
    with pytest.raises(UnknownNameError, match="jensen_shannon"):
        pseudo_reward("jensen-shannon", torch.zeros(1))
    with pytest.raises(TypeError, match="alpha"):
        pseudo_reward("alpha", torch.zeros(1))
    with pytest.raises(TypeError, match="unknown"):
        pseudo_reward("forward_kl", torch.zeros(1), alpha=0.5)


def test_pseudo_rewards_use_normalised_log_ratio():
    policy = torch.tensor([-2.0, -1.0])
    target = torch.tensor([-5.0, -3.0])  # log P
    rewards = fdpg_pseudo_rewards(policy, target, log_z=-2.5, divergence="reverse_kl")
    # l = log pi - log P + log Z = [0.5, -0.5]; reverse KL: -l - 1
    torch.testing.assert_close(rewards, torch.tensor([-1.5, -0.5], dtype=torch.float64))
    per_sample = fdpg_pseudo_rewards(policy, target, torch.tensor([-2.5, -1.5]), "forward_kl")
    torch.testing.assert_close(per_sample, torch.exp(-torch.tensor([0.5, 0.5], dtype=torch.float64)))


def test_policy_gradient_loss_gradient_and_refusal():
    logps = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    advantages = torch.tensor([0.5, -1.0, 2.0])
    weights = torch.tensor([1.0, 0.5, 2.0])
    result = fdpg_policy_gradient_loss(logps, advantages, weights)
    result.loss.backward()
    torch.testing.assert_close(logps.grad, -weights * advantages / 3)  # d/d lp of -mean(w A lp)
    with pytest.raises(ValueError, match="divergence is infinite"):
        fdpg_policy_gradient_loss(logps, torch.tensor([0.0, -math.inf, 1.0]))
