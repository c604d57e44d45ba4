"""The DoRA density-ratio formula h = [alpha + sum_i beta_i (1 - c_i) / (gamma_i c_i)]^-1 and the
mixture proportions (methods/dora.md, Step 1)."""

from __future__ import annotations

import numpy as np
import pytest

from distalign.errors import SetupError
from distalign.shift.ratio import density_ratio, parse_proportions, resolve_proportions


def _equal(n: int, c: np.ndarray, gamma: float) -> np.ndarray:
    k = n - 1
    return density_ratio(np.repeat(c[:, None], k, axis=1), alpha=1 / n, betas=[1 / n] * k, gammas=[gamma] * k)


C_GRID = np.linspace(0.01, 1.0, 100)


def test_two_equal_sources_balanced_classifier_give_h_equal_2c():
    np.testing.assert_allclose(_equal(2, C_GRID, gamma=1.0), 2 * C_GRID, rtol=1e-12)


@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_equal_proportions_give_h_equal_n_c_when_gamma_is_the_class_ratio_n_minus_1(n):
    # The released DoRA configuration: n = 4 candidates, alpha = 1/4, a golden-vs-rest classifier
    # that sees n - 1 synthetic responses per golden one (gamma = 3): h = 4c, linear in c.
    np.testing.assert_allclose(_equal(n, C_GRID, gamma=n - 1.0), n * C_GRID, rtol=1e-12)


@pytest.mark.parametrize("n", [3, 4])
def test_balanced_per_source_classifiers_are_not_linear_for_more_than_two_sources(n):
    # gamma_i = 1 and all c_i = c: h = n c / ((n - 1) - (n - 2) c), which equals n c only at c = 1;
    # at c = 1/2 every classifier is indifferent (Q_0 = Q_i), so h must be 1, not n / 2.
    h = _equal(n, C_GRID, gamma=1.0)
    np.testing.assert_allclose(h, n * C_GRID / ((n - 1) - (n - 2) * C_GRID), rtol=1e-12)
    assert _equal(n, np.array([0.5]), gamma=1.0)[0] == pytest.approx(1.0)


def test_indifferent_classifiers_give_h_equal_1():
    gammas = np.array([0.5, 2.0, 3.0])
    prior = 1 / (1 + gammas)  # c_i at the class prior: the classifier learned nothing
    h = density_ratio(prior[None, :], alpha=0.4, betas=[0.1, 0.3, 0.2], gammas=gammas)
    assert h[0] == pytest.approx(1.0)


def test_h_is_bounded_by_one_over_alpha_and_nonnegative():
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(1, 6))
        mix = rng.dirichlet(np.ones(k + 1))
        c = rng.uniform(0, 1, size=(50, k)) ** rng.uniform(0.1, 5)
        c[rng.uniform(size=c.shape) < 0.05] = 1.0
        c[rng.uniform(size=c.shape) < 0.05] = 0.0
        h = density_ratio(c, alpha=mix[0], betas=mix[1:], gammas=rng.uniform(0.1, 10, size=k))
        assert (h >= 0).all() and (h <= 1 / mix[0] * (1 + 1e-12)).all()
    all_golden = density_ratio(np.ones((1, 3)), alpha=0.2, betas=[0.3, 0.3, 0.2], gammas=[1, 1, 1])
    assert all_golden[0] == pytest.approx(5.0)
    assert density_ratio(np.array([[0.0, 0.9]]), alpha=0.5, betas=[0.25, 0.25], gammas=[1, 1])[0] == 0.0


def test_exact_posteriors_give_the_exact_ratio_and_unit_mean_under_the_mixture():
    # A discrete world: 3 sources over 5 outcomes. With exact classifier posteriors under class sizes
    # n_0 and n_i, h equals Q_0 / P outcome by outcome and E_P[h] = 1.
    rng = np.random.default_rng(1)
    q = rng.dirichlet(np.ones(5), size=3)  # q[s, z]
    mix = np.array([0.2, 0.5, 0.3])
    sizes = np.array([100.0, 300.0, 60.0])  # training class sizes of the probes
    c = np.stack([sizes[0] * q[0] / (sizes[0] * q[0] + sizes[i] * q[i]) for i in (1, 2)], axis=1)
    h = density_ratio(c, alpha=mix[0], betas=mix[1:], gammas=sizes[1:] / sizes[0])
    p = mix @ q
    np.testing.assert_allclose(h, q[0] / p, rtol=1e-12)
    assert (p * h).sum() == pytest.approx(1.0)


def test_formula_rejects_inconsistent_inputs():
    with pytest.raises(ValueError, match="sum"):
        density_ratio(np.full((1, 1), 0.5), alpha=0.5, betas=[0.4], gammas=[1])
    with pytest.raises(ValueError, match="one per source"):
        density_ratio(np.full((1, 2), 0.5), alpha=0.5, betas=[0.5], gammas=[1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        density_ratio(np.full((1, 1), 1.5), alpha=0.5, betas=[0.5], gammas=[1])


def test_proportions_from_counts_and_given():
    assert resolve_proportions({"gpt": 30, "golden": 10}) == {"golden": 0.25, "gpt": 0.75}
    given = parse_proportions("golden=0.25, gpt=0.75")
    assert resolve_proportions({"gpt": 30, "golden": 30}, given) == {"golden": 0.25, "gpt": 0.75}
    thirds = resolve_proportions({"a": 1, "b": 1, "c": 1}, parse_proportions("a=0.333,b=0.333,c=0.334"))
    assert sum(thirds.values()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("golden=0.5,gpt=0.6", "sum to 1.1"),
        ("golden=1.0", "missing sources present in the data: gpt"),
        ("golden=0.5,gpt=0.25,other=0.25", "sources not in the data: other"),
        ("golden=0,gpt=1", "must be in (0, 1]"),
        ("golden=half,gpt=0.5", "is not a number"),
        ("golden0.5", "NAME=FRACTION"),
        ("golden=0.5,golden=0.5", "given twice"),
    ],
)
def test_bad_proportions_are_setup_errors(text, message):
    with pytest.raises(SetupError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_proportions({"golden": 10, "gpt": 10}, parse_proportions(text))
