"""AOT losses: optimal transport identities, exact toys, invariances, gradients."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distalign.losses.aot import (
    aot_paired_loss,
    aot_unpaired_loss,
    cost_values,
    identity_coupling_cost,
    quantile_grid,
)

ALL_COSTS = ["logistic", "squared_hinge", "least_squares"]
COST_SETTINGS = [(cost, beta, ls) for cost in ALL_COSTS for beta in (0.3, 1.5) for ls in (0.0, 0.2)]


def _distinct(generator: torch.Generator, size: int, scale: float = 2.0) -> torch.Tensor:
    """float64 samples without ties (ties make the sorted coupling non-unique)."""
    return torch.randn(size, generator=generator, dtype=torch.float64) * scale


# ---------------------------------------------------------------------------- optimal transport


@pytest.mark.parametrize(("cost", "beta", "label_smoothing"), COST_SETTINGS)
def test_sorted_loss_equals_brute_force_assignment(cost, beta, label_smoothing):
    generator = torch.Generator().manual_seed(1)
    for n in (1, 2, 3, 5, 7):
        permutations = torch.tensor(list(itertools.permutations(range(n))))  # [n!, n]
        for _ in range(3):
            u, v = _distinct(generator, n), _distinct(generator, n)
            options = dict(cost=cost, beta=beta, label_smoothing=label_smoothing)
            every_assignment = cost_values(u[None, :] - v[permutations], **options).mean(dim=1)
            best = every_assignment.min()
            torch.testing.assert_close(aot_unpaired_loss(u, v, **options), best)
            torch.testing.assert_close(aot_paired_loss(u, v, **options), best)


def _transport_lp(
    u: np.ndarray, v: np.ndarray, a: np.ndarray, b: np.ndarray, cost_matrix: np.ndarray
) -> float:
    """min <P, C> over couplings P >= 0 with row sums a and column sums b (exact LP)."""
    linprog = pytest.importorskip("scipy.optimize").linprog
    n, m = len(u), len(v)
    rows = np.kron(np.eye(n), np.ones((1, m)))
    cols = np.kron(np.ones((1, n)), np.eye(m))
    result = linprog(
        cost_matrix.reshape(-1), A_eq=np.vstack([rows, cols]), b_eq=np.concatenate([a, b]), method="highs"
    )
    assert result.status == 0
    return float(result.fun)


@pytest.mark.parametrize(("cost", "beta", "label_smoothing"), COST_SETTINGS)
def test_unequal_sizes_equal_linear_program_optimum(cost, beta, label_smoothing):
    """n != m: the quantile-grid integral equals the OT cost between the uniform empirical measures."""
    generator = torch.Generator().manual_seed(2)
    options = dict(cost=cost, beta=beta, label_smoothing=label_smoothing)
    for n, m in [(1, 4), (2, 3), (3, 5), (6, 4), (4, 6)]:
        u, v = _distinct(generator, n), _distinct(generator, m)
        cost_matrix = cost_values(u[:, None] - v[None, :], **options).numpy()
        expected = _transport_lp(u.numpy(), v.numpy(), np.full(n, 1 / n), np.full(m, 1 / m), cost_matrix)
        assert aot_unpaired_loss(u, v, **options).item() == pytest.approx(expected, rel=1e-7, abs=1e-10)


@pytest.mark.parametrize("cost", ALL_COSTS)
def test_weighted_grid_equals_linear_program_optimum(cost):
    pytest.importorskip("scipy")
    generator = torch.Generator().manual_seed(3)
    for n, m in [(3, 4), (5, 2)]:
        u, v = _distinct(generator, n), _distinct(generator, m)
        u_weights = torch.rand(n, generator=generator, dtype=torch.float64) + 0.1
        v_weights = torch.rand(m, generator=generator, dtype=torch.float64) + 0.1
        cost_matrix = cost_values(u[:, None] - v[None, :], cost=cost, beta=0.7).numpy()
        a, b = (u_weights / u_weights.sum()).numpy(), (v_weights / v_weights.sum()).numpy()
        expected = _transport_lp(u.numpy(), v.numpy(), a, b, cost_matrix)
        loss = aot_unpaired_loss(
            u, v, cost=cost, beta=0.7, positive_weights=u_weights, negative_weights=v_weights
        )
        assert loss.item() == pytest.approx(expected, rel=1e-7, abs=1e-10)


def test_integer_weights_equal_duplicated_rows():
    u = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    v = torch.tensor([1.0, -0.5], dtype=torch.float64)
    u_weights, v_weights = torch.tensor([2.0, 1.0, 3.0]), torch.tensor([1.0, 4.0])
    weighted = aot_unpaired_loss(
        u, v, cost="squared_hinge", beta=1.0, positive_weights=u_weights, negative_weights=v_weights
    )
    duplicated = aot_unpaired_loss(
        u.repeat_interleave(u_weights.long()),
        v.repeat_interleave(v_weights.long()),
        cost="squared_hinge",
        beta=1.0,
    )
    torch.testing.assert_close(weighted, duplicated)


def test_zero_weight_rows_are_ignored():
    u = torch.tensor([0.3, 50.0, 2.0], dtype=torch.float64)
    v = torch.tensor([1.0, -0.5], dtype=torch.float64)
    dropped = aot_unpaired_loss(u[[0, 2]], v, cost="least_squares", beta=0.0)
    weighted = aot_unpaired_loss(
        u, v, cost="least_squares", beta=0.0, positive_weights=torch.tensor([1.0, 0.0, 1.0])
    )
    torch.testing.assert_close(weighted, dropped)


# ---------------------------------------------------------------------------- the quantile grid


def test_hand_computed_two_by_three_example():
    # Breakpoints {1/2} U {1/3, 2/3, 1}: intervals of mass 1/3, 1/6, 1/6, 1/3 pairing
    # (u1,v1), (u1,v2), (u2,v2), (u2,v3). With h(z) = z^2 (least squares, beta = 0) and u = (0, 1),
    # v = (0, 3, 6): 0/3 + 9/6 + 4/6 + 25/3 = 10.5.
    u = torch.tensor([1.0, 0.0])
    v = torch.tensor([6.0, 0.0, 3.0])
    assert aot_unpaired_loss(u, v, cost="least_squares", beta=0.0).item() == pytest.approx(10.5)
    grid = quantile_grid(u, v)
    torch.testing.assert_close(grid.mass, torch.tensor([1 / 3, 1 / 6, 1 / 6, 1 / 3]))
    torch.testing.assert_close(grid.t, torch.tensor([1 / 3, 1 / 2, 2 / 3, 1.0]))
    torch.testing.assert_close(grid.positive_quantiles, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(grid.negative_quantiles, torch.tensor([0.0, 3.0, 3.0, 6.0]))


@pytest.mark.parametrize(("cost", "beta", "label_smoothing"), COST_SETTINGS)
def test_equal_sizes_give_the_sorted_mean(cost, beta, label_smoothing):
    generator = torch.Generator().manual_seed(4)
    for n in (1, 4, 9, 32):
        u, v = _distinct(generator, n), _distinct(generator, n)
        options = dict(cost=cost, beta=beta, label_smoothing=label_smoothing)
        sorted_mean = (
            sum(
                cost_values(torch.tensor([a - b], dtype=torch.float64), **options).item()
                for a, b in zip(sorted(u.tolist()), sorted(v.tolist()))
            )
            / n
        )
        assert aot_unpaired_loss(u, v, **options).item() == pytest.approx(sorted_mean, rel=1e-12)


@pytest.mark.parametrize(("n", "m"), [(1, 1), (4, 6), (6, 4), (7, 7), (12, 18), (5, 13)])
def test_grid_shape_and_mass(n, m):
    grid = quantile_grid(torch.randn(n), torch.randn(m))
    assert grid.mass.sum().item() == pytest.approx(1.0)
    assert (grid.mass > 0).all() and grid.t[-1].item() == pytest.approx(1.0)
    assert len(grid.mass) == n + m - math.gcd(n, m)  # shared breakpoints i/n = j/m merge


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="at least one sample on each side"):
        aot_unpaired_loss(torch.ones(3), torch.ones(0))
    with pytest.raises(ValueError, match="at least one sample on each side"):
        aot_unpaired_loss(torch.ones(0), torch.ones(2))
    with pytest.raises(ValueError, match="1-D"):
        aot_unpaired_loss(torch.ones(2, 2), torch.ones(2))
    with pytest.raises(ValueError, match="same shape"):
        aot_paired_loss(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="non-negative"):
        aot_unpaired_loss(torch.ones(2), torch.ones(2), positive_weights=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="shape"):
        aot_unpaired_loss(torch.ones(2), torch.ones(2), negative_weights=torch.ones(3))
    with pytest.raises(ValueError, match="soft sorting with per-sample weights"):
        aot_unpaired_loss(torch.ones(2), torch.ones(2), soft_sort=True, positive_weights=torch.ones(2))


# ------------------------------------------------------------------------ invariances and bounds


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 12),
    m=st.integers(1, 12),
    cost=st.sampled_from(ALL_COSTS),
    soft=st.booleans(),
)
def test_permutation_invariance(data, n, m, cost, soft):
    floats = st.floats(-50, 50, allow_nan=False)
    u = torch.tensor(data.draw(st.lists(floats, min_size=n, max_size=n)), dtype=torch.float64)
    v = torch.tensor(data.draw(st.lists(floats, min_size=m, max_size=m)), dtype=torch.float64)
    pu = torch.tensor(data.draw(st.permutations(range(n))))
    pv = torch.tensor(data.draw(st.permutations(range(m))))
    options = dict(cost=cost, beta=0.4, soft_sort=soft, soft_sort_strength=0.5)
    torch.testing.assert_close(aot_unpaired_loss(u[pu], v[pv], **options), aot_unpaired_loss(u, v, **options))
    if n == m:  # paired: permuting the pairs, and the two margins independently, changes nothing
        torch.testing.assert_close(aot_paired_loss(u[pu], v[pv], **options), aot_paired_loss(u, v, **options))


@pytest.mark.parametrize("cost", ALL_COSTS)
def test_sorted_coupling_never_costs_more_than_identity(cost):
    generator = torch.Generator().manual_seed(5)
    worse = 0
    for trial in range(1500):
        n = 1 + trial % 16
        scale = 10.0 ** (trial % 3 - 1)  # gaps around, below and above the margin / temperature
        u, v = _distinct(generator, n, scale), _distinct(generator, n, scale)
        options = dict(cost=cost, beta=0.5, label_smoothing=0.1 * (trial % 2))
        aot, identity = aot_paired_loss(u, v, **options), identity_coupling_cost(u, v, **options)
        worse += int(aot > identity + 1e-12)
        if trial % 2 == 0:  # the same bound for the unpaired form with equal sizes
            worse += int(aot_unpaired_loss(u, v, **options) > identity + 1e-12)
    assert worse == 0


def test_identity_coupling_with_logistic_cost_is_dpo():
    generator = torch.Generator().manual_seed(6)
    beta = 0.1
    chosen, rejected = _distinct(generator, 8, 20), _distinct(generator, 8, 20)
    ref_chosen, ref_rejected = _distinct(generator, 8, 20), _distinct(generator, 8, 20)
    policy_margins, reference_margins = chosen - rejected, ref_chosen - ref_rejected
    dpo = (
        sum(
            -math.log(1.0 / (1.0 + math.exp(-beta * (z - z_ref))))
            for z, z_ref in zip(policy_margins.tolist(), reference_margins.tolist())
        )
        / 8
    )
    identity = identity_coupling_cost(policy_margins, reference_margins, cost="logistic", beta=beta)
    assert identity.item() == pytest.approx(dpo, rel=1e-12)
    # When both margins already share one order, sorting is the identity and AOT is DPO.
    order = torch.argsort(policy_margins)
    comonotone_reference = torch.sort(reference_margins).values[torch.argsort(order)]
    assert aot_paired_loss(policy_margins, comonotone_reference, beta=beta).item() == pytest.approx(
        identity_coupling_cost(policy_margins, comonotone_reference, beta=beta).item(), rel=1e-12
    )


# -------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(("cost", "beta", "label_smoothing"), COST_SETTINGS)
@pytest.mark.parametrize(("n", "m"), [(5, 5), (4, 7)])
def test_gradcheck_unpaired(cost, beta, label_smoothing, n, m):
    generator = torch.Generator().manual_seed(7)
    u = _distinct(generator, n).requires_grad_()
    v = _distinct(generator, m).requires_grad_()

    def loss(u, v):
        return aot_unpaired_loss(u, v, cost=cost, beta=beta, label_smoothing=label_smoothing)

    assert torch.autograd.gradcheck(loss, (u, v))


@pytest.mark.parametrize("cost", ALL_COSTS)
def test_gradcheck_paired_and_reference_is_constant(cost):
    generator = torch.Generator().manual_seed(8)
    z, z_ref = _distinct(generator, 6).requires_grad_(), _distinct(generator, 6).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: aot_paired_loss(z, z_ref, cost=cost, beta=0.9), (z,))
    aot_paired_loss(z, z_ref, cost=cost, beta=0.9).backward()
    assert z_ref.grad is None and z.grad is not None


def test_gradcheck_soft_sorted_loss():
    generator = torch.Generator().manual_seed(9)
    u, v = _distinct(generator, 6).requires_grad_(), _distinct(generator, 4).requires_grad_()

    def loss(u, v):
        return aot_unpaired_loss(u, v, cost="logistic", beta=1.0, soft_sort=True, soft_sort_strength=1.0)

    assert torch.autograd.gradcheck(loss, (u, v))


def test_gradient_is_the_envelope_formula():
    """dL/du_j = h'(u_j - v_{rank(j)}) / n and dL/dv_k = -h'(u_{rank(k)} - v_k) / n, h' by hand."""
    beta = 0.7
    u = torch.tensor([0.5, -1.0, 2.0, 0.1], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([1.5, 0.0, -3.0, 0.2], dtype=torch.float64, requires_grad=True)
    aot_unpaired_loss(u, v, cost="logistic", beta=beta).backward()

    def h_prime(z: float) -> float:  # d/dz log(1 + exp(-beta z))
        return -beta / (1.0 + math.exp(beta * z))

    # ranks: u sorted = [-1.0, 0.1, 0.5, 2.0], v sorted = [-3.0, 0.0, 0.2, 1.5]
    partner_of_u = {0.5: 0.2, -1.0: -3.0, 2.0: 1.5, 0.1: 0.0}
    partner_of_v = {b: a for a, b in partner_of_u.items()}
    expected_u = [h_prime(a - partner_of_u[a]) / 4 for a in u.tolist()]
    expected_v = [-h_prime(partner_of_v[b] - b) / 4 for b in v.tolist()]
    torch.testing.assert_close(u.grad, torch.tensor(expected_u, dtype=torch.float64))
    torch.testing.assert_close(v.grad, torch.tensor(expected_v, dtype=torch.float64))


def test_micro_batch_surrogates_reproduce_the_global_gradient():
    """The spec's exactness argument: matching fixed on gathered detached rewards, each micro-batch's
    surrogate h(u_j - sg[partner]) summed over micro-batches has the full-batch gradient."""
    generator = torch.Generator().manual_seed(10)
    weight = torch.randn(3, dtype=torch.float64, generator=generator, requires_grad=True)
    pos_features = torch.randn(8, 3, dtype=torch.float64, generator=generator)
    neg_features = torch.randn(8, 3, dtype=torch.float64, generator=generator)
    options = dict(cost="squared_hinge", beta=0.5)
    (full_grad,) = torch.autograd.grad(
        aot_unpaired_loss(pos_features @ weight, neg_features @ weight, **options), weight
    )

    with torch.no_grad():  # "gather": every reward of the global batch, detached
        u_all, v_all = pos_features @ weight, neg_features @ weight
        partner_of_u = torch.sort(v_all).values[torch.argsort(torch.argsort(u_all))]
        partner_of_v = torch.sort(u_all).values[torch.argsort(torch.argsort(v_all))]
    surrogate_grad = torch.zeros_like(weight)
    for rows in (slice(0, 3), slice(3, 8)):  # two micro-batches of unequal size
        u, v = pos_features[rows] @ weight, neg_features[rows] @ weight
        surrogate = cost_values(u - partner_of_u[rows], **options).sum() / 8
        surrogate = surrogate + cost_values(partner_of_v[rows] - v, **options).sum() / 8
        surrogate_grad += torch.autograd.grad(surrogate, weight)[0]
    torch.testing.assert_close(surrogate_grad, full_grad)


def test_soft_sort_with_small_strength_is_the_hard_loss():
    generator = torch.Generator().manual_seed(11)
    u, v = _distinct(generator, 9), _distinct(generator, 5)
    hard = aot_unpaired_loss(u, v, beta=1.0)
    soft = aot_unpaired_loss(u, v, beta=1.0, soft_sort=True, soft_sort_strength=1e-3)
    torch.testing.assert_close(soft, hard)
    softer = aot_unpaired_loss(u, v, beta=1.0, soft_sort=True, soft_sort_strength=10.0)
    assert not torch.isclose(softer, hard)
