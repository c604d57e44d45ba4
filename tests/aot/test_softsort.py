"""Soft sort (Blondel et al. 2020): limits, the projection it is defined as, PAV, gradients."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distalign.losses.softsort import decreasing_isotonic_regression, soft_sort

values_1d = st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=20)


def test_converges_to_the_hard_sort():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(30, generator=generator, dtype=torch.float64) * 3
    hard = torch.sort(values).values
    strengths = (30.0, 10.0, 3.0, 1.0, 0.3, 0.1, 0.01)
    errors = [(soft_sort(values, strength=eps) - hard).abs().max().item() for eps in strengths]
    assert errors[0] > 1.0 and errors[-1] < 1e-12
    assert all(softer >= harder - 1e-12 for softer, harder in zip(errors, errors[1:]))
    # Exact once 1 / eps exceeds the largest gap between sorted neighbours.
    largest_gap = torch.diff(hard).max().item()
    torch.testing.assert_close(soft_sort(values, strength=0.99 / largest_gap), hard, rtol=0, atol=1e-12)
    torch.testing.assert_close(soft_sort(values, strength=0.99 / largest_gap, descending=True), hard.flip(0))


def test_strong_regularisation_tends_to_the_mean():
    values = torch.tensor([4.0, -2.0, 7.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(soft_sort(values, strength=1e9), torch.full((4,), 2.5, dtype=torch.float64))


def test_hand_computed_pooled_pair():
    # theta = (0, 3), eps = 1: rho/eps = (2, 1), w = (3, 0); rho/eps - w = (-1, 1) violates a decreasing
    # order, pools to (0, 0), so the descending soft sort is (2, 1) - 0 = (2, 1): step 1/eps about mean 1.5.
    values = torch.tensor([0.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(soft_sort(values, strength=1.0), torch.tensor([1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(
        soft_sort(values, strength=0.25), torch.tensor([0.0, 3.0], dtype=torch.float64)
    )


@settings(max_examples=80, deadline=None)
@given(values=values_1d, strength=st.floats(1e-3, 1e3))
def test_sorted_sum_preserving_and_in_the_permutahedron(values, strength):
    theta = torch.tensor(values, dtype=torch.float64)
    result = soft_sort(theta, strength=strength)
    assert (torch.diff(result) >= -1e-9).all()
    assert result.sum().item() == pytest.approx(theta.sum().item(), abs=1e-8 * (1 + theta.abs().sum().item()))
    # Majorisation: the k largest outputs never sum to more than the k largest inputs.
    top_out = torch.cumsum(result.flip(0), 0)
    top_in = torch.cumsum(torch.sort(theta, descending=True).values, 0)
    assert (top_out <= top_in + 1e-8 * (1 + theta.abs().sum())).all()


def test_equals_euclidean_projection_onto_the_permutahedron():
    """The definition: argmin_{y in conv(perms of theta)} ||y - rho/eps||, solved here as a QP over
    convex weights of the n! vertices with SciPy (independent of PAV)."""
    minimize = pytest.importorskip("scipy.optimize").minimize
    theta = np.array([0.3, -1.0, 2.5, 0.9])
    vertices = np.array(list(itertools.permutations(theta)))  # [24, 4]
    for eps in (0.3, 1.0, 3.0):
        anchor = np.arange(4, 0, -1) / eps

        def objective(weights: np.ndarray) -> float:
            return float(np.sum((weights @ vertices - anchor) ** 2))  # noqa: B023

        start = np.full(len(vertices), 1 / len(vertices))
        solution = minimize(
            objective,
            start,
            method="SLSQP",
            bounds=[(0, 1)] * len(vertices),
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
            options={"ftol": 1e-14, "maxiter": 500},
        )
        projection = solution.x @ vertices
        ours = soft_sort(torch.tensor(theta), strength=eps, descending=True).numpy()
        np.testing.assert_allclose(ours, projection, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=6))
def test_isotonic_regression_is_optimal_among_monotone_candidates(values):
    """PAV output is non-increasing and its squared error is KKT-optimal: each block is the mean of its
    targets, and every prefix of a block has mean <= the block mean (else splitting would help)."""
    targets = torch.tensor(values, dtype=torch.float64)
    fit = decreasing_isotonic_regression(targets)
    assert (torch.diff(fit) <= 1e-12).all()
    for value in torch.unique(fit):
        block = torch.nonzero(torch.isclose(fit, value, atol=1e-12, rtol=0)).flatten()
        block_targets = targets[block]
        assert block_targets.mean().item() == pytest.approx(value.item(), abs=1e-9)
        prefix_means = torch.cumsum(block_targets, 0) / torch.arange(1, len(block) + 1)
        assert (prefix_means <= value + 1e-9).all()


def test_isotonic_regression_hand_example():
    # (1, 3, 2, 0): 3 > 1 violates a decreasing fit -> pool (1, 3) to 2, then (2, 2, 2, 0) is fine.
    fit = decreasing_isotonic_regression(torch.tensor([1.0, 3.0, 2.0, 0.0]))
    torch.testing.assert_close(fit, torch.tensor([2.0, 2.0, 2.0, 0.0]))


@pytest.mark.parametrize("strength", [0.1, 1.0, 5.0])
def test_gradcheck(strength):
    generator = torch.Generator().manual_seed(1)
    values = (torch.randn(7, generator=generator, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: soft_sort(x, strength=strength), (values,))


def test_invalid_inputs():
    with pytest.raises(ValueError, match="strength must be > 0"):
        soft_sort(torch.ones(3), strength=0.0)
    with pytest.raises(ValueError, match="1-D"):
        soft_sort(torch.ones(2, 2))
    assert soft_sort(torch.ones(0)).numel() == 0


def test_small_strength_is_exact_in_float32():
    # rho / eps reaches n / eps = 5e8 here; the result must not inherit that magnitude's rounding error.
    values = torch.randn(500, generator=torch.Generator().manual_seed(2)) * 3
    torch.testing.assert_close(soft_sort(values, strength=1e-6), torch.sort(values).values, rtol=0, atol=0)
