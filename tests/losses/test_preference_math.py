"""Math tests for the pure DPO-family losses: hand-derived values, identities, gradients, stability."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distalign.losses.kto import kto_loss
from distalign.losses.preference import (
    dpo_loss,
    hinge_loss,
    ipo_loss,
    robust_dpo_loss,
    sft_loss,
    simpo_loss,
    token_mean_logps,
)

PAIRED = {
    "dpo": lambda w, r: dpo_loss(w, r, beta=0.5),
    "cdpo": lambda w, r: dpo_loss(w, r, beta=0.5, label_smoothing=0.2),
    "robust_dpo": lambda w, r: robust_dpo_loss(w, r, beta=0.5, eps=0.2),
    "ipo": lambda w, r: ipo_loss(w, r, beta=0.5),
    "hinge": lambda w, r: hinge_loss(w, r, beta=0.5),
    "simpo": lambda w, r: simpo_loss(w, r, beta=2.0, gamma=0.5),
}

finite_floats = st.floats(min_value=-30, max_value=30, allow_nan=False)
betas = st.floats(min_value=0.01, max_value=5.0)
noise_rates = st.floats(min_value=0.0, max_value=0.45)


def t64(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------- DPO


def test_dpo_is_log2_at_zero_margin() -> None:
    # m = 0 -> -log sigmoid(0) = log 2, whatever beta and the common log-ratio are.
    for beta in (0.01, 0.1, 3.0):
        loss = dpo_loss(t64(-4.0, 0.0, 7.5), t64(-4.0, 0.0, 7.5), beta=beta)
        torch.testing.assert_close(loss, torch.full((3,), math.log(2), dtype=torch.float64))


def test_dpo_hand_value_and_gradient() -> None:
    # beta = 0.5, rho_w = 3, rho_l = 1 -> m = 2, loss = -log sigmoid(1) = softplus(-1) = log(1 + e^-1).
    chosen, rejected = t64(3.0, grad=True), t64(1.0, grad=True)
    loss = dpo_loss(chosen, rejected, beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-12)
    # DPO paper Sec. 4: d loss / d rho_w = -beta sigmoid(-beta m) = -0.5 / (1 + e); d/d rho_l is its negative.
    loss.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.5 / (1 + math.e), rel=1e-12)
    assert rejected.grad.item() == pytest.approx(0.5 / (1 + math.e), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(w=finite_floats, r=finite_floats, beta=betas)
def test_dpo_swap_changes_loss_by_beta_margin(w: float, r: float, beta: float) -> None:
    # softplus(-x) - softplus(x) = -x, so swapping chosen and rejected changes the loss by exactly beta m.
    forward, swapped = dpo_loss(t64(w), t64(r), beta=beta), dpo_loss(t64(r), t64(w), beta=beta)
    assert (forward - swapped).item() == pytest.approx(-beta * (w - r), abs=1e-9)


def test_cdpo_hand_value() -> None:
    # eps = 0.25, beta = 1, m = ln 3: sigmoid(m) = 3/4, sigmoid(-m) = 1/4
    # -> loss = -(3/4) ln(3/4) - (1/4) ln(1/4) = 0.2157615 + 0.3465736.
    loss = dpo_loss(t64(math.log(3)), t64(0.0), beta=1.0, label_smoothing=0.25)
    expected = -0.75 * math.log(0.75) - 0.25 * math.log(0.25)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.5623351, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(w=finite_floats, r=finite_floats, beta=betas)
def test_label_smoothing_zero_is_dpo(w: float, r: float, beta: float) -> None:
    plain = -math.log(sigmoid(beta * (w - r))) if beta * (w - r) > -30 else -beta * (w - r)
    assert dpo_loss(t64(w), t64(r), beta=beta, label_smoothing=0.0).item() == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.4])
def test_cdpo_minimum_is_at_logit_of_one_minus_eps(eps: float) -> None:
    # d/dm [-(1-eps) log s(bm) - eps log s(-bm)] = b (s(bm) - (1 - eps)) = 0  <=>  m* = logit(1 - eps) / b.
    beta = 0.5
    m_star = math.log((1 - eps) / eps) / beta
    chosen = t64(m_star, m_star - 1.0, m_star + 1.0, grad=True)
    loss = dpo_loss(chosen, torch.zeros(3, dtype=torch.float64), beta=beta, label_smoothing=eps)
    loss.sum().backward()
    assert abs(chosen.grad[0].item()) < 1e-12
    assert loss[0] < loss[1] and loss[0] < loss[2]


@pytest.mark.parametrize("fn", [dpo_loss, robust_dpo_loss])
@pytest.mark.parametrize("rate", [-0.1, 0.5, 0.7])
def test_noise_rate_out_of_range_raises(fn, rate: float) -> None:
    option = "label_smoothing" if fn is dpo_loss else "eps"
    with pytest.raises(ValueError, match=option):
        fn(t64(1.0), t64(0.0), **{option: rate})


@pytest.mark.parametrize("fn", [dpo_loss, robust_dpo_loss, ipo_loss, hinge_loss, simpo_loss])
def test_nonpositive_beta_raises(fn) -> None:
    with pytest.raises(ValueError, match="beta"):
        fn(t64(1.0), t64(0.0), beta=0.0)


# --------------------------------------------------------------------------------------------- rDPO


@settings(max_examples=40, deadline=None)
@given(w=finite_floats, r=finite_floats, beta=betas)
def test_robust_dpo_at_zero_noise_is_dpo(w: float, r: float, beta: float) -> None:
    robust = robust_dpo_loss(t64(w), t64(r), beta=beta, eps=0.0)
    torch.testing.assert_close(robust, dpo_loss(t64(w), t64(r), beta=beta))


def test_robust_dpo_hand_value() -> None:
    # eps = 1/4, beta = 1, m = ln 3: l(m) = -ln(3/4) = 0.2876821, l(-m) = -ln(1/4) = 1.3862944
    # -> [(3/4)(0.2876821) - (1/4)(1.3862944)] / (1/2) = -0.2616240.
    loss = robust_dpo_loss(t64(math.log(3)), t64(0.0), beta=1.0, eps=0.25)
    expected = (0.75 * -math.log(0.75) - 0.25 * -math.log(0.25)) / 0.5
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(-0.2616240, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(m=finite_floats, beta=betas, eps=noise_rates)
def test_robust_dpo_is_unbiased_under_label_flips(m: float, beta: float, eps: float) -> None:
    # The observed pair is (w, l) with probability 1 - eps and swapped (margin -m) with probability eps;
    # the exact expectation of the rDPO loss over the two outcomes is the clean DPO loss at m.
    kept = robust_dpo_loss(t64(m), t64(0.0), beta=beta, eps=eps)
    flipped = robust_dpo_loss(t64(0.0), t64(m), beta=beta, eps=eps)
    expectation = (1 - eps) * kept + eps * flipped
    clean = dpo_loss(t64(m), t64(0.0), beta=beta)
    assert expectation.item() == pytest.approx(clean.item(), rel=1e-7, abs=1e-7)


def test_robust_dpo_unbiased_monte_carlo() -> None:
    eps, beta, margin, n = 0.3, 0.5, 1.7, 200_000
    generator = torch.Generator().manual_seed(0)
    flips = torch.rand(n, generator=generator, dtype=torch.float64) < eps
    observed_margin = torch.where(flips, -margin, margin).to(torch.float64)
    losses = robust_dpo_loss(observed_margin, torch.zeros(n, dtype=torch.float64), beta=beta, eps=eps)
    clean = math.log1p(math.exp(-beta * margin))
    standard_error = losses.std().item() / math.sqrt(n)
    assert abs(losses.mean().item() - clean) < 5 * standard_error
    # Plain DPO on the same noisy labels is biased upwards by far more than the sampling error.
    noisy_dpo = dpo_loss(observed_margin, torch.zeros(n, dtype=torch.float64), beta=beta).mean().item()
    assert noisy_dpo - clean > 20 * standard_error


# -------------------------------------------------------------------------------------- IPO / hinge


def test_ipo_hand_values_and_minimum() -> None:
    # beta = 1/4 -> target margin 1 / (2 beta) = 2: m = 3 -> 1, m = 2 -> 0, m = -1 -> 9.
    chosen = t64(3.0, 2.0, -1.0, grad=True)
    loss = ipo_loss(chosen, torch.zeros(3, dtype=torch.float64), beta=0.25)
    torch.testing.assert_close(loss, t64(1.0, 0.0, 9.0))
    loss.sum().backward()
    # d/dm (m - 2)^2 = 2 (m - 2): 2, 0 (the minimum), -6.
    torch.testing.assert_close(chosen.grad, t64(2.0, 0.0, -6.0))


def test_hinge_hand_values_and_flat_beyond_margin() -> None:
    # beta = 1/2: m = 1 -> 1 - 0.5 = 0.5; m = -2 -> 2; m = 2 (exactly the margin) and m = 10 -> 0.
    chosen = t64(1.0, -2.0, 2.0, 10.0, grad=True)
    loss = hinge_loss(chosen, torch.zeros(4, dtype=torch.float64), beta=0.5)
    torch.testing.assert_close(loss, t64(0.5, 2.0, 0.0, 0.0))
    loss.sum().backward()
    torch.testing.assert_close(chosen.grad, t64(-0.5, -0.5, 0.0, 0.0))


@pytest.mark.parametrize("name", sorted(PAIRED))
@settings(max_examples=30, deadline=None)
@given(w=finite_floats, r=finite_floats, shift=finite_floats)
def test_paired_losses_depend_on_margin_only(name: str, w: float, r: float, shift: float) -> None:
    # A common shift of both log-ratios leaves the margin, hence the loss, unchanged; swapping the pair
    # is the same as presenting margin -m.
    fn = PAIRED[name]
    torch.testing.assert_close(fn(t64(w + shift), t64(r + shift)), fn(t64(w), t64(r)))
    torch.testing.assert_close(fn(t64(r), t64(w)), fn(t64(0.0), t64(w - r)))


# -------------------------------------------------------------------------------------------- SimPO


def test_simpo_hand_value() -> None:
    # beta = 2, gamma = 0.5, avg_w = -1, avg_l = -1.25 -> 2 * 0.25 - 0.5 = 0 -> log 2.
    loss = simpo_loss(t64(-1.0), t64(-1.25), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-12)
    # Without the margin: -log sigmoid(0.5) = log(1 + e^-0.5).
    assert simpo_loss(t64(-1.0), t64(-1.25), beta=2.0, gamma=0.0).item() == pytest.approx(
        math.log1p(math.exp(-0.5)), rel=1e-12
    )


@settings(max_examples=40, deadline=None)
@given(w=finite_floats, r=finite_floats, beta=betas)
def test_simpo_without_margin_is_dpo_shape(w: float, r: float, beta: float) -> None:
    torch.testing.assert_close(
        simpo_loss(t64(w), t64(r), beta=beta, gamma=0.0), dpo_loss(t64(w), t64(r), beta=beta)
    )


# ---------------------------------------------------------------------------------------------- KTO


def test_kto_hand_values() -> None:
    # beta = 1, z = 0.5. Desirable rho = 0.5 + ln 3: 1 - sigmoid(ln 3) = 1/4.
    # Undesirable rho = 0.5: 1 - sigmoid(0) = 1/2, times w_U = 2 -> 1.
    # Undesirable rho = 0.5 - ln 3: 1 - sigmoid(ln 3) = 1/4, times 2 -> 1/2.
    rho = t64(0.5 + math.log(3), 0.5, 0.5 - math.log(3))
    labels = torch.tensor([1.0, 0.0, 0.0])
    loss = kto_loss(rho, labels, 0.5, beta=1.0, desirable_weight=1.0, undesirable_weight=2.0)
    torch.testing.assert_close(loss, t64(0.25, 1.0, 0.5))


def test_kto_clamps_and_detaches_reference_point() -> None:
    # A negative KL estimate is clamped to 0: desirable rho = 0 -> 1 - sigmoid(0) = 1/2.
    z = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    rho = t64(0.0, grad=True)
    loss = kto_loss(rho, torch.tensor([1]), z, beta=1.0)
    assert loss.item() == pytest.approx(0.5)
    loss.sum().backward()
    assert z.grad is None
    # d/d rho sigmoid(z - rho) at 0 = -1/4.
    assert rho.grad.item() == pytest.approx(-0.25)


def test_kto_rejects_non_binary_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        kto_loss(t64(0.0, 1.0), torch.tensor([1.0, 0.5]), 0.0)


def test_kto_bounded_by_weights() -> None:
    rho = torch.linspace(-50, 50, 101, dtype=torch.float64)
    labels = (torch.arange(101) % 2).to(torch.float64)
    loss = kto_loss(rho, labels, 1.0, beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)
    assert (loss >= 0).all()
    assert (loss[labels == 1] <= 1.5).all() and (loss[labels == 0] <= 0.7).all()


# ------------------------------------------------------------------------------- SFT and reductions


def test_sft_hand_values() -> None:
    # -(-6) / 3 = 2, -(-2) / 4 = 0.5; a zero-length completion (logp 0) gives 0, not NaN.
    loss = sft_loss(t64(-6.0, -2.0, 0.0), torch.tensor([3, 4, 0]))
    torch.testing.assert_close(loss, t64(2.0, 0.5, 0.0))


def test_token_mean_logps() -> None:
    torch.testing.assert_close(token_mean_logps(t64(-6.0, -1.0), torch.tensor([3.0, 4.0])), t64(-2.0, -0.25))


def test_weighted_batch_mean_hand_values() -> None:
    from distalign.losses.base import weighted_mean as weighted_batch_mean

    losses = t64(1.0, 3.0)
    assert weighted_batch_mean(losses, t64(1.0, 1.0)).item() == pytest.approx(2.0)
    # (3 * 1 + 1 * 3) / (3 + 1) = 1.5
    assert weighted_batch_mean(losses, t64(3.0, 1.0)).item() == pytest.approx(1.5)
    # Scaling all weights changes nothing; all-zero weights give 0 rather than NaN.
    assert weighted_batch_mean(losses, t64(30.0, 10.0)).item() == pytest.approx(1.5)
    assert weighted_batch_mean(losses, t64(0.0, 0.0)).item() == 0.0


# -------------------------------------------------------------------------- gradients and stability

GRADCHECK_CASES = {
    "dpo": lambda w, r: dpo_loss(w, r, beta=0.7),
    "cdpo": lambda w, r: dpo_loss(w, r, beta=0.7, label_smoothing=0.15),
    "robust_dpo": lambda w, r: robust_dpo_loss(w, r, beta=0.7, eps=0.15),
    "ipo": lambda w, r: ipo_loss(w, r, beta=0.7),
    "hinge": lambda w, r: hinge_loss(w, r, beta=0.7),
    "simpo": lambda w, r: simpo_loss(w, r, beta=2.0, gamma=0.3),
    "kto": lambda w, r: kto_loss(w - r, torch.tensor([1.0, 0.0, 1.0]), 0.4, beta=0.7, undesirable_weight=1.3),
    "sft": lambda w, r: sft_loss(w, torch.tensor([2.0, 5.0, 1.0])) + 0 * r,
}


@pytest.mark.parametrize("name", sorted(GRADCHECK_CASES))
def test_gradcheck_float64(name: str) -> None:
    # Points chosen away from the hinge kink (beta m = 1 at m ~ 1.43).
    chosen = t64(-1.3, 0.4, 3.1, grad=True)
    rejected = t64(0.2, -0.9, -2.5, grad=True)
    assert torch.autograd.gradcheck(GRADCHECK_CASES[name], (chosen, rejected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(GRADCHECK_CASES))
def test_finite_value_and_gradient_at_huge_margins(name: str, dtype: torch.dtype) -> None:
    chosen = torch.tensor([1e4, -1e4, 0.0, 5e3], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-1e4, 1e4, 1e4, 0.0], dtype=dtype, requires_grad=True)
    fn = GRADCHECK_CASES[name]
    if name in ("kto", "sft"):  # these take four rows of labels / lengths
        labels, lengths = torch.tensor([1, 0, 1, 0]), torch.tensor([7, 1, 30, 2])
        fn = {
            "kto": lambda w, r: kto_loss(w - r, labels, 2.0, beta=0.1),
            "sft": lambda w, r: sft_loss(w, lengths) + sft_loss(r, lengths),
        }[name]
    loss = fn(chosen, rejected)
    assert loss.dtype == dtype and torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
