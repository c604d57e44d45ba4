"""AOT costs h: hand-derived values, validation, label smoothing, numerical range."""

from __future__ import annotations

import math

import pytest
import torch

from distalign.losses.aot import COSTS, aot_paired_loss, aot_unpaired_loss, cost_values, resolve_cost
from distalign.registry import UnknownNameError

ALL_COSTS = ["logistic", "squared_hinge", "least_squares"]


def test_registry_lists_the_three_costs():
    assert COSTS.names() == sorted(ALL_COSTS)


def test_unknown_cost_lists_valid_names():
    with pytest.raises(UnknownNameError, match="least_squares.*logistic.*squared_hinge"):
        cost_values(torch.zeros(2), cost="hinge")


@pytest.mark.parametrize(
    ("cost", "beta", "gap", "expected"),
    [
        ("logistic", 0.5, 0.0, math.log(2.0)),
        ("logistic", 0.5, 2.0, math.log(1.0 + math.exp(-1.0))),
        ("logistic", 2.0, -1.5, math.log(1.0 + math.exp(3.0))),
        ("squared_hinge", 1.0, -1.0, 4.0),
        ("squared_hinge", 1.0, 0.25, 0.5625),
        ("squared_hinge", 1.0, 3.0, 0.0),  # beyond the margin: no cost
        ("squared_hinge", 0.0, -2.0, 4.0),
        ("least_squares", 1.0, 3.0, 4.0),  # pulled back to the margin from above too
        ("least_squares", 1.0, -1.0, 4.0),
        ("least_squares", 0.5, 0.5, 0.0),
    ],
)
def test_cost_hand_values(cost, beta, gap, expected):
    value = cost_values(torch.tensor([gap], dtype=torch.float64), cost=cost, beta=beta)
    assert value.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("cost", ALL_COSTS)
def test_label_smoothing_is_a_label_flip_mixture(cost):
    gaps = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0], dtype=torch.float64)
    eps = 0.2
    plain = cost_values(gaps, cost=cost, beta=0.5)
    flipped = cost_values(-gaps, cost=cost, beta=0.5)
    smoothed = cost_values(gaps, cost=cost, beta=0.5, label_smoothing=eps)
    torch.testing.assert_close(smoothed, 0.8 * plain + 0.2 * flipped)


def test_least_squares_smoothing_equals_shrunk_margin_plus_constant():
    # (1-e)(b - z)^2 + e(b + z)^2 = (b(1 - 2e) - z)^2 + b^2 (1 - (1 - 2e)^2), expanded by hand.
    gaps = torch.linspace(-3, 3, 13, dtype=torch.float64)
    beta, eps = 0.8, 0.15
    smoothed = cost_values(gaps, cost="least_squares", beta=beta, label_smoothing=eps)
    shrunk = (beta * (1 - 2 * eps) - gaps) ** 2 + beta**2 * (1 - (1 - 2 * eps) ** 2)
    torch.testing.assert_close(smoothed, shrunk)


@pytest.mark.parametrize(
    ("cost", "beta", "label_smoothing", "message"),
    [
        ("logistic", 0.0, 0.0, "beta > 0"),
        ("logistic", -1.0, 0.0, "beta > 0"),
        ("squared_hinge", -0.1, 0.0, "beta >= 0"),
        ("least_squares", float("nan"), 0.0, "beta >= 0"),
        ("logistic", 0.1, 0.5, "label_smoothing"),
        ("logistic", 0.1, -0.1, "label_smoothing"),
    ],
)
def test_invalid_options_raise(cost, beta, label_smoothing, message):
    with pytest.raises(ValueError, match=message):
        resolve_cost(cost, beta, label_smoothing)
    with pytest.raises(ValueError, match=message):
        aot_unpaired_loss(
            torch.ones(2), torch.zeros(2), cost=cost, beta=beta, label_smoothing=label_smoothing
        )


def test_beta_meaning_is_documented_for_every_cost():
    for name in COSTS:
        assert COSTS.get(name).beta_meaning


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cost", ALL_COSTS)
@pytest.mark.parametrize("beta", [0.01, 1.0])
def test_costs_finite_at_large_gaps(dtype, cost, beta):
    gaps = torch.tensor([-1e4, -1.0, 0.0, 1.0, 1e4], dtype=dtype, requires_grad=True)
    values = cost_values(gaps, cost=cost, beta=beta, label_smoothing=0.1)
    values.sum().backward()
    assert values.dtype == dtype
    assert torch.isfinite(values).all() and torch.isfinite(gaps.grad).all()


def test_logistic_is_linear_not_overflowing_for_very_negative_gaps():
    # log(1 + e^{1e4}) = 1e4 + log(1 + e^{-1e4}) = 1e4 in any float; a naive log(1 + exp) is inf.
    value = cost_values(torch.tensor([-1e4]), cost="logistic", beta=1.0)
    assert value.item() == pytest.approx(1e4)
    assert cost_values(torch.tensor([1e4]), cost="logistic", beta=1.0).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cost", ALL_COSTS)
def test_losses_finite_at_large_rewards(dtype, cost):
    positive = torch.tensor([1e4, -1e4, 3.0], dtype=dtype, requires_grad=True)
    negative = torch.tensor([-1e4, 1e4, 0.0, 2.0], dtype=dtype, requires_grad=True)
    reference = torch.tensor([1e4, 0.0, -1e4], dtype=dtype)
    for loss in (
        aot_unpaired_loss(positive, negative, cost=cost, beta=1.0, label_smoothing=0.1),
        aot_paired_loss(positive, reference, cost=cost, beta=1.0),
    ):
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, positive)
        assert grad.dtype == dtype and torch.isfinite(grad).all()
