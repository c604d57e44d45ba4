"""The DRO family of aggregators: limits, hand values, the direction they move weights, exactness of the
gather-then-weight evaluation, and robust DPO's unbiasedness."""

from __future__ import annotations

import math

import pytest
import torch

from distalign.losses import AGGREGATORS, get_aggregator
from distalign.losses.base import PairedStats
from distalign.losses.preference import dpo_loss, robust_dpo_loss
from distalign.train.coupling import coupling_coefficients, linear_surrogate, slice_stats
from distalign.train.objective import BatchObjective


def t64(*values):
    return torch.tensor(values, dtype=torch.float64)


def aggregate(name, losses, weights=None, signals=None, state=None, **options):
    return get_aggregator(name)(losses, weights=weights, signals=signals, state=state, **options)


def effective_weights(name, losses, **kwargs):
    leaf = losses.clone().requires_grad_(True)
    aggregate(name, leaf, **kwargs).loss.backward()
    return leaf.grad


LOSSES = t64(0.2, 1.5, 0.7, 3.0, 0.1)
RATIO = {"density_ratio": t64(2.0, 0.5, 1.0, 0.25, 1.25)}


def test_dora_large_temperature_is_the_importance_weighted_mean():
    iw = aggregate("importance_weighted", LOSSES, signals=RATIO).loss
    assert iw.item() == pytest.approx(float((RATIO["density_ratio"] * LOSSES).mean()))
    dora = aggregate("dora", LOSSES, signals=RATIO, temperature=1e6).loss
    assert dora.item() == pytest.approx(iw.item(), rel=1e-6)


def test_dora_hand_value_and_kl_dro_is_dora_without_ratio():
    h = RATIO["density_ratio"]
    expected = 0.5 * math.log(float(torch.exp(h * LOSSES / 0.5).mean()))
    assert aggregate("dora", LOSSES, signals=RATIO, temperature=0.5).loss.item() == pytest.approx(expected)
    ones = {"density_ratio": torch.ones(5, dtype=torch.float64)}
    assert aggregate("kl_dro", LOSSES, temperature=0.5).loss.item() == pytest.approx(
        aggregate("dora", LOSSES, signals=ones, temperature=0.5).loss.item()
    )
    # Row weights are probability masses: an integer weight equals repeating the row.
    weighted = aggregate("kl_dro", t64(1.0, 2.0), weights=t64(2.0, 1.0)).loss
    assert weighted.item() == pytest.approx(aggregate("kl_dro", t64(1.0, 1.0, 2.0)).loss.item())


def test_kl_dro_up_weights_and_dr_dpo_down_weights_high_losses():
    up = effective_weights("kl_dro", LOSSES, temperature=0.5)
    down = effective_weights("dr_dpo", LOSSES, beta_prime=0.5)
    order = torch.argsort(LOSSES)
    assert bool((up[order].diff() > 0).all()) and bool((down[order].diff() < 0).all())
    assert up.sum().item() == pytest.approx(1.0) and down.sum().item() == pytest.approx(1.0)
    # Limits: a large beta' is the mean, a small one the minimum.
    assert aggregate("dr_dpo", LOSSES, beta_prime=1e6).loss.item() == pytest.approx(
        float(LOSSES.mean()), rel=1e-6
    )
    assert aggregate("dr_dpo", LOSSES, beta_prime=1e-3).loss.item() == pytest.approx(0.1, abs=5e-3)


def test_dr_dpo_down_weights_injected_flipped_pairs():
    """Pairs whose labels were flipped have negative margins under a model that learned the true
    preference, hence high DPO losses: Dr.DPO gives them less weight than the mean does."""
    torch.manual_seed(0)
    margins = torch.rand(40, dtype=torch.float64) * 4 + 1  # a model that agrees with the true labels
    flipped = torch.zeros(40, dtype=torch.bool)
    flipped[::4] = True
    observed = torch.where(flipped, -margins, margins)
    losses = dpo_loss(observed, torch.zeros(40, dtype=torch.float64), beta=1.0)
    q = effective_weights("dr_dpo", losses, beta_prime=1.0) * 40  # mean weight 1
    assert q[flipped].mean() < 0.5 < 1.0 < q[~flipped].mean()


def test_kldpo_weights_hand_values_and_clamp():
    losses = t64(0.0, 0.1, 0.2)
    result = aggregate("kldpo", losses, tau=0.1, max_weight=2.0)
    # (l - mean) / tau = -1, 0, 1 -> exp = e^-1, 1, e -> clamped at 2: weights e^-1, 1, 2 (constants)
    expected = (math.exp(-1) * 0.0 + 1 * 0.1 + 2 * 0.2) / 3
    assert result.loss.item() == pytest.approx(expected)
    assert result.metrics["weights/clipped"].item() == pytest.approx(1 / 3)
    grad = effective_weights("kldpo", losses, tau=0.1, max_weight=2.0)
    torch.testing.assert_close(grad, t64(math.exp(-1), 1.0, 2.0) / 3)


def test_chi2_dro_equals_its_primal_on_a_small_radius():
    """For a radius small enough that no weight hits 0, sup_{chi2 <= rho} E_Q[l] = E[l] + sqrt(2 rho Var(l))."""
    losses = t64(1.0, 1.2, 0.9, 1.1, 1.05)
    radius = 0.02
    variance = float(((losses - losses.mean()) ** 2).mean())
    primal = float(losses.mean()) + math.sqrt(2 * radius * variance)
    assert aggregate("chi2_dro", losses, radius=radius).loss.item() == pytest.approx(primal, rel=1e-9)


def test_chi2_dro_dual_is_minimised():
    radius = 1.0
    loss = aggregate("chi2_dro", LOSSES, radius=radius).loss.item()
    grid = torch.linspace(-5, 3, 20001, dtype=torch.float64)
    dual = [
        e + math.sqrt(1 + 2 * radius) * math.sqrt(float(((LOSSES - e).clamp(min=0) ** 2).mean()))
        for e in grid
    ]
    assert loss == pytest.approx(float(min(dual)), abs=1e-6)
    assert float(LOSSES.mean()) < loss <= float(LOSSES.max())


def chi2_primal_by_enumeration(losses: torch.Tensor, p: torch.Tensor, radius: float):
    """Brute force: max E_Q[l] over the ball {q >= 0, sum q = 1, sum p (q/p - 1)^2 / 2 <= rho}, by
    trying every support S. With S fixed and q = p r, Cauchy-Schwarz gives the best r in closed form:
    r = 1 / P_S + k (l - mean_S) with k = sqrt((1 + 2 rho - 1 / P_S) / (P_S var_S)), worth
    mean_S + sqrt(((1 + 2 rho) P_S - 1) var_S); a support counts where that r >= 0. The best of all
    supports is the supremum (it uses neither the dual nor any ordering of the losses). Where several
    rows tie at the top and their point mass is strictly inside the ball, every distribution over them
    is a maximiser: the largest support (p over the tied rows) is kept, as chi2_dro returns."""
    import itertools

    live = [i for i in range(len(losses)) if p[i] > 0]
    best_value, best_q = -math.inf, None
    for size in range(len(live), 0, -1):
        for support in itertools.combinations(live, size):
            rows = torch.tensor(support)
            mass = float(p[rows].sum())
            slack = 2 * radius * mass - float(p.sum() - p[rows].sum())  # (1 + 2 rho) P_S - 1
            if slack < -1e-15:
                continue
            mean = float((p[rows] * losses[rows]).sum()) / mass
            centred = losses[rows] - mean
            variance = float((p[rows] * centred**2).sum()) / mass
            k = math.sqrt(max(slack, 0.0) / mass / (mass * variance)) if variance > 0 else 0.0
            ratio = 1 / mass + k * centred
            if bool((ratio < -1e-12).any()):
                continue
            value = mean + math.sqrt(max(slack, 0.0) * variance)
            if best_q is None or value > best_value + 1e-12 * max(1.0, abs(best_value)):
                best_value = value
                best_q = torch.zeros_like(p)
                best_q[rows] = p[rows] * ratio.clamp(min=0)
    return best_value, best_q


def chi2_distance(q: torch.Tensor, p: torch.Tensor) -> float:
    live = p > 0
    return float((p[live] * (q[live] / p[live] - 1) ** 2).sum()) / 2


RADII = [1e-12, 1e-8, 1e-4, 1e-2, 0.3, 1.0, 3.0, 10.0]


@pytest.mark.parametrize("radius", RADII)
@pytest.mark.parametrize("seed", range(6))
def test_chi2_dro_value_and_gradient_equal_the_brute_force_primal(seed, radius):
    """Random batches of 1-7 rows (some rows of weight 0, some tied losses, some near 1e3): the value is
    the supremum, the gradient its maximiser, a distribution inside the ball."""
    generator = torch.Generator().manual_seed(seed)
    n = 1 + seed
    losses = torch.rand(n, generator=generator, dtype=torch.float64) * 3
    if seed % 2:
        losses = losses + 1000.0
    if n > 2:
        losses[1] = losses[2]  # a tie
    weights = torch.rand(n, generator=generator, dtype=torch.float64) + 0.1
    if n > 3:
        weights[0] = 0.0
    p = weights / weights.sum()
    value, q = chi2_primal_by_enumeration(losses, p, radius)
    leaf = losses.clone().requires_grad_(True)
    result = aggregate("chi2_dro", leaf, weights=weights, radius=radius)
    result.loss.backward()
    assert result.loss.item() == pytest.approx(value, rel=1e-12, abs=1e-9)
    torch.testing.assert_close(leaf.grad, q, rtol=1e-7, atol=1e-9)
    assert leaf.grad.min() >= 0 and leaf.grad.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert chi2_distance(leaf.grad, p) <= radius * (1 + 1e-6) + 1e-15


@pytest.mark.parametrize(
    ("losses", "weights", "radius", "value", "gradient"),
    [
        # the point mass on 1.9 has chi2 = (1 / P(top) - 1) / 2 = 0.5 <= 1: the worst case is the max
        ((0.4, 1.9), None, 1.0, 1.9, (0.0, 1.0)),
        # one row: every radius holds the point mass; the gradient is 1, not sqrt(1 + 2 rho)
        ((0.7,), None, 1.0, 0.7, (1.0,)),
        ((0.7,), None, 1e-12, 0.7, (1.0,)),
        ((0.3,), (1.0,), 1.0, 0.3, (1.0,)),  # was sqrt(3): a bisection ending a rounding below the loss
        # three rows tied at the top hold all the mass: each gets 1/3
        ((3.0, 3.0, 3.0), None, 5.0, 3.0, (1 / 3, 1 / 3, 1 / 3)),
        # ... and with two lower rows, (1 + 2 rho) P(top) = 11 x 3/5 >= 1: still the top rows, p-weighted
        ((1.0, 2.0, 3.0, 3.0, 3.0), None, 5.0, 3.0, (0, 0, 1 / 3, 1 / 3, 1 / 3)),
        ((1.0, 3.0, 3.0), (1.0, 1.0, 3.0), 5.0, 3.0, (0, 0.25, 0.75)),
        # a zero-weight row with the largest loss is not part of the batch
        ((0.4, 1.9, 9.0), (1.0, 1.0, 0.0), 1.0, 1.9, (0.0, 1.0, 0.0)),
    ],
)
def test_chi2_dro_where_the_worst_case_is_a_point_mass(losses, weights, radius, value, gradient):
    leaf = t64(*losses).requires_grad_(True)
    result = aggregate("chi2_dro", leaf, weights=None if weights is None else t64(*weights), radius=radius)
    result.loss.backward()
    assert result.loss.item() == pytest.approx(value, rel=1e-15)
    torch.testing.assert_close(leaf.grad, t64(*gradient))


def test_chi2_dro_small_radius_is_mean_plus_root_two_rho_variance():
    """Below the point-mass regime and with no weight at 0, the supremum is E[l] + sqrt(2 rho Var(l)),
    and the optimal dual variable lies near mean - std / sqrt(2 rho): ~70 std below the losses at
    rho = 1e-4, far outside any fixed search bracket."""
    losses = t64(0.4, 1.9, 1.2, 0.8)
    variance = float(losses.var(unbiased=False))
    for radius in (1e-4, 1e-8, 1e-12):
        leaf = losses.clone().requires_grad_(True)
        result = aggregate("chi2_dro", leaf, radius=radius)
        result.loss.backward()
        expected = float(losses.mean()) + math.sqrt(2 * radius * variance)
        assert result.loss.item() == pytest.approx(expected, rel=1e-14)
        assert leaf.grad.sum().item() == pytest.approx(1.0, abs=1e-14)
        assert chi2_distance(leaf.grad, torch.full((4,), 0.25, dtype=torch.float64)) == pytest.approx(
            radius, rel=1e-6
        )


def test_group_dro_weights_move_to_the_worst_group_and_are_state():
    losses = t64(0.1, 0.2, 2.0, 1.8, 0.3)
    groups = {"group": torch.tensor([0, 0, 1, 1, 2])}
    state = None
    for _ in range(50):
        result = aggregate("group_dro", losses, signals=groups, state=state, step_size=0.1)
        state = result.state
    alpha = state["alpha"]
    assert alpha.sum().item() == pytest.approx(1.0)
    assert int(alpha.argmax()) == 1 and alpha[1] > 0.9
    # The objective weighs the group means by alpha (group 1's mean is 1.9).
    assert result.loss.item() == pytest.approx(float((alpha * t64(0.15, 1.9, 0.3)).sum()), rel=1e-9)


def test_group_dro_adjusts_by_the_training_set_size_of_each_group():
    """Sagawa et al. 2020 §5: alpha_g <- alpha_g exp(eta (L_g + C / sqrt(n_g))) with n_g the group's size
    in the training set (the group_size signal), not its row count in this batch. Here group 0 has 1
    row in the batch but 100 in the data, group 1 has 3 and 4."""
    losses = t64(0.5, 1.0, 1.2, 0.8)
    signals = {"group": torch.tensor([0, 1, 1, 1]), "group_size": t64(100.0, 4.0, 4.0, 4.0)}
    step_size, adjustment = 0.5, 2.0
    result = aggregate("group_dro", losses, signals=signals, step_size=step_size, adjustment=adjustment)
    exponents = t64(0.5 + adjustment / 10.0, 1.0 + adjustment / 2.0)  # L_g + C / sqrt(n_g)
    expected = torch.softmax(step_size * exponents, 0)
    torch.testing.assert_close(result.state["alpha"], expected)
    batch_counts = torch.softmax(step_size * t64(0.5 + adjustment / 1.0, 1.0 + adjustment / 3**0.5), 0)
    assert not torch.allclose(result.state["alpha"], batch_counts)  # what the batch counts gave


def test_group_dro_adjustment_needs_the_group_sizes():
    with pytest.raises(ValueError, match="group_size"):
        aggregate("group_dro", LOSSES, signals={"group": torch.tensor([0, 0, 1, 1, 1])}, adjustment=1.0)
    # Without an adjustment the sizes are not read.
    aggregate("group_dro", LOSSES, signals={"group": torch.tensor([0, 0, 1, 1, 1])})


def test_the_data_carries_each_rows_group_size_in_the_whole_data_set():
    from distalign.data.signals import signal_table

    table, vocabulary = signal_table([{"group": "b"}, {"group": "a"}, {}, {"group": "b"}, {"group": "b"}])
    assert vocabulary["group"] == ["a", "b"]
    torch.testing.assert_close(table["group_size"][[0, 1, 3, 4]], t64(3.0, 1.0, 3.0, 3.0))
    assert table["group_size"][2].isnan()


def test_group_dro_refuses_rows_without_a_group():
    with pytest.raises(ValueError, match="group"):
        aggregate("group_dro", LOSSES, signals={"group": torch.tensor([0, -1, 0, 1, 1])})


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("kl_dro", {"temperature": 0}),
        ("dora", {"temperature": -1}),
        ("kldpo", {"tau": 0}),
        ("dr_dpo", {"beta_prime": 0}),
        ("chi2_dro", {"radius": 0}),
        ("group_dro", {"step_size": 0}),
    ],
)
def test_bad_options_are_refused(name, options):
    signals = {"density_ratio": torch.ones(5, dtype=torch.float64), "group": torch.zeros(5, dtype=torch.long)}
    with pytest.raises(ValueError, match="must be > 0"):
        aggregate(name, LOSSES, signals=signals, **options)


def _stats(theta, features, signals):
    chosen, rejected = features[:, 0] @ theta, features[:, 1] @ theta
    ones = torch.ones(features.shape[0], dtype=theta.dtype)
    return PairedStats(
        chosen,
        rejected,
        ones,
        ones,
        0 * chosen.detach(),
        0 * chosen.detach(),
        weights=signals["w"],
        signals={k: v for k, v in signals.items() if k != "w"},
    )


@pytest.mark.parametrize("name", sorted(set(AGGREGATORS) - {"mean"}))
def test_every_aggregator_is_exact_when_gathered_from_micro_batches(name):
    """Global value and gradient of DPO x aggregator equal those assembled from micro-batches through
    the gather-then-linearise path (the loop's; two processes add a gather of the same tensors)."""
    torch.manual_seed(1)
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    features = torch.randn(12, 2, 4, dtype=torch.float64)
    signals = {
        "w": torch.rand(12, dtype=torch.float64) + 0.5,
        "density_ratio": torch.rand(12, dtype=torch.float64) * 2,
        "group": torch.tensor([0, 1, 2] * 4),
        "source": torch.tensor([0, 1] * 6),
    }
    from distalign.losses import get_loss

    objective = BatchObjective(get_loss("dpo"), get_aggregator(name), loss_options={"beta": 0.5})
    full = objective(_stats(theta, features, signals))
    (expected,) = torch.autograd.grad(full.loss, theta)
    with torch.no_grad():
        detached = _stats(theta, features, signals)
    coefficients, result = coupling_coefficients(objective, detached)
    assert result.loss.item() == pytest.approx(full.loss.item(), rel=1e-12)
    total = torch.zeros_like(theta)
    for start in (0, 5, 9):
        stop = {0: 5, 5: 9, 9: 12}[start]
        part = slice_stats(_stats(theta, features, signals), start, stop)
        (grad,) = torch.autograd.grad(linear_surrogate(part, coefficients, start), theta)
        total += grad
    torch.testing.assert_close(total, expected, rtol=1e-10, atol=1e-12)
    assert "weights/ess" in result.metrics or name == "group_dro"


def test_robust_dpo_is_unbiased_under_a_known_flip_rate():
    """E over label flips (rate eps) of the rDPO loss of the observed pair = the clean DPO loss."""
    margins = t64(-2.0, -0.3, 0.0, 0.8, 3.0)
    eps, beta = 0.2, 0.7
    clean = dpo_loss(margins, torch.zeros(5, dtype=torch.float64), beta=beta)
    zeros = torch.zeros(5, dtype=torch.float64)
    exact = (1 - eps) * robust_dpo_loss(margins, zeros, beta=beta, eps=eps) + eps * robust_dpo_loss(
        -margins, zeros, beta=beta, eps=eps
    )
    torch.testing.assert_close(exact, clean)
    generator = torch.Generator().manual_seed(0)
    flips = torch.rand(200_000, 5, generator=generator, dtype=torch.float64) < eps
    observed = torch.where(flips, -margins, margins)
    monte_carlo = robust_dpo_loss(
        observed.flatten(), torch.zeros_like(observed.flatten()), beta=beta, eps=eps
    )
    torch.testing.assert_close(monte_carlo.view(-1, 5).mean(0), clean, atol=0.02, rtol=0)


def test_weight_diagnostics():
    equal = aggregate("kl_dro", t64(0.5, 0.5, 0.5, 0.5))
    assert equal.metrics["weights/ess"].item() == pytest.approx(1.0)
    assert equal.metrics["weights/max"].item() == pytest.approx(1.0)
    # CVaR at alpha = 1/2 on four rows: two rows at weight 2, two at 0 -> ESS 1/2, max 2.
    tail = aggregate("cvar", t64(0.1, 0.9, 0.2, 0.8), alpha=0.5)
    assert tail.metrics["weights/ess"].item() == pytest.approx(0.5)
    assert tail.metrics["weights/max"].item() == pytest.approx(2.0)
    # DoRA on two sources: the target-like source (high h) carries more weight than the synthetic one.
    signals = {"density_ratio": t64(1.8, 1.6, 0.2, 0.4), "source": torch.tensor([0, 0, 1, 1])}
    dora = aggregate("dora", t64(1.0, 1.0, 1.0, 1.0), signals=signals)
    assert dora.metrics["weights/source=0"] > 1.0 > dora.metrics["weights/source=1"]


def test_chi2_dro_with_equal_losses_has_a_finite_gradient():
    losses = torch.full((4,), 25.0, dtype=torch.float64, requires_grad=True)
    result = aggregate("chi2_dro", losses, radius=1.0)
    result.loss.backward()
    assert result.loss.item() == pytest.approx(25.0)
    torch.testing.assert_close(losses.grad, torch.full((4,), 0.25, dtype=torch.float64))
